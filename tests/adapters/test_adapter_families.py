"""LoRA on the Gemma 2/3 and Phi-3 models of homebake's decoder, against PEFT on transformers' models with the
same weights: forward and backward (Phi-3's fused qkv_proj / gate_up_proj included, targeted by those
names), the saved PEFT adapter loaded by PEFT, the merged weights loaded by transformers, and the GGUF LoRA's
tensor names."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import peft, randomize_adapters, transformers
from tiny_models import load_hf_reference, save_tiny_hf_model

from homebake.adapters import LoraConfig, inject_lora, lora_state_dict, merge_lora
from homebake.adapters.lora import lora_modules
from homebake.adapters.peft import save_peft_adapter
from homebake.model.load import load_model

FAMILIES = ["gemma2", "gemma3", "phi3", "phi3_longrope"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = save_tiny_hf_model(tmp_path_factory.mktemp(variant) / "m", variant)
        return cache[variant]

    return get


def adapted(folder, config):
    model = load_model(folder, with_tokenizer=False).model
    paths = inject_lora(model, config)
    randomize_adapters(model)
    return model, paths


def peft_reference(folder, config, paths, ours):
    base = load_hf_reference(folder)
    twin = peft.get_peft_model(base, peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=0.0,
                                                     target_modules=list(paths), use_dora=config.use_dora,
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for path, module in lora_modules(ours).items():
            peft_module = twin.base_model.model.get_submodule(path)
            peft_module.lora_A["default"].weight.copy_(module.lora_A.weight)
            peft_module.lora_B["default"].weight.copy_(module.lora_B.weight)
            if module.lora_magnitude is not None:
                peft_module.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude)
    return twin


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("variant", FAMILIES)
def test_forward_and_backward_equal_peft(variant, use_dora, folders, input_ids):
    config = LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    ours, paths = adapted(folders(variant), config)
    short = {p.rpartition(".")[2] for p in paths}
    if variant.startswith("phi3"):
        assert short == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # the fused projections, by HF name
    else:
        assert short == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    twin = peft_reference(folders(variant), config, paths, ours)
    logits = ours.logits(ours(input_ids))
    reference = twin(input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = load_hf_reference(folders(variant))(input_ids).logits
    assert (logits - plain).abs().max() > 1e-2  # the adapters really act
    logits.square().mean().backward()
    reference.square().mean().backward()
    for path, module in lora_modules(ours).items():
        peft_module = twin.base_model.model.get_submodule(path)
        torch.testing.assert_close(module.lora_A.weight.grad, peft_module.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.lora_B.weight.grad, peft_module.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["gemma3", "phi3"])
def test_peft_adapter_and_merged_weights_load_in_peft_and_transformers(variant, folders, input_ids, tmp_path):
    from homebake.model.save import save_hf_model

    config = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["qkv_proj", "gate_up_proj"]
                        if variant == "phi3" else "all-linear")
    loaded = load_model(folders(variant), with_tokenizer=False)
    model = loaded.model
    inject_lora(model, config)
    randomize_adapters(model)
    with torch.no_grad():
        ours = model.logits(model(input_ids))
    adapter = save_peft_adapter(tmp_path / "adapter", lora_state_dict(model), config, str(folders(variant)))
    peft_model = peft.PeftModel.from_pretrained(load_hf_reference(folders(variant)), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, ours, rtol=1e-4, atol=1e-4)

    base_state = {k: v for k, v in load_model(folders(variant), with_tokenizer=False).model.state_dict().items()}
    merged = merge_lora(base_state, lora_state_dict(model), config)
    out = save_hf_model(loaded, tmp_path / "merged", state_dict=merged, dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, ours, rtol=1e-4, atol=1e-4)
    again = load_model(out, with_tokenizer=False).model  # and homebake reads its own export back
    torch.testing.assert_close(again.logits(again(input_ids)).detach(), ours, rtol=1e-4, atol=1e-4)


def test_gguf_lora_of_phi3_names_the_fused_tensors(folders, tmp_path):
    from homebake.export.gguf_lora import write_gguf_lora

    config = LoraConfig(r=4, alpha=8, dropout=0.0)
    loaded = load_model(folders("phi3"), with_tokenizer=False)
    inject_lora(loaded.model, config)
    written = write_gguf_lora(tmp_path / "lora.gguf", lora_state_dict(loaded.model), config, loaded.args)
    assert written["blk.0.attn_qkv.weight.lora_a"] == (4, 64)
    assert written["blk.0.attn_qkv.weight.lora_b"] == ((4 + 2 * 2) * 16, 4)
    assert written["blk.1.ffn_up.weight.lora_b"] == (2 * loaded.args.intermediate_size, 4)
    assert not any("attn_q." in name for name in written)
