"""LoRA / DoRA wrappers against PEFT 0.21 on identical weights, merging, targeting and accounting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adapter_helpers import (SEVEN_PROJECTIONS, copy_adapters_into_peft, peft_twin, randomize_adapters,
                             tiny_model)

from homebake.adapters import (LoraConfig, LoraLinear, describe_parameters, inject_lora, load_lora_state_dict,
                               lora_state_dict, merge_lora)
from homebake.adapters.lora import lora_modules
from homebake.errors import ConfigError, ExportError, ModelLoadError

VARIANTS = {
    "lora": dict(use_dora=False, use_rslora=False),
    "rslora": dict(use_dora=False, use_rslora=True),
    "dora": dict(use_dora=True, use_rslora=False),
}


def _config(variant: str, **overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **VARIANTS[variant], **overrides})


def _adapted(variant: str, model_variant: str = "llama", **overrides):
    base = tiny_model(model_variant)
    ours = copy.deepcopy(base)
    config = _config(variant, **overrides)
    paths = inject_lora(ours, config)
    randomize_adapters(ours)
    return base, ours, config, paths


@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_leaves_the_model_unchanged(input_ids, use_dora):
    base = tiny_model("qwen2")  # q/k/v biases and tied embeddings
    ours = copy.deepcopy(base)
    inject_lora(ours, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    assert all(not m.lora_B.weight.any() for m in lora_modules(ours).values())
    torch.testing.assert_close(ours(input_ids).logits, base(input_ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_variant", ["llama", "qwen2"])
def test_forward_and_backward_equal_peft(input_ids, variant, model_variant):
    base, ours, config, paths = _adapted(variant, model_variant)
    twin = peft_twin(base, config, paths)
    copy_adapters_into_peft(ours, twin)
    logits, reference = ours(input_ids).logits, twin(input_ids).logits
    torch.testing.assert_close(logits, reference)  # fp32 tolerances: equal up to rounding
    assert (logits - base(input_ids).logits).abs().max() > 1e-2  # the adapters really act

    logits.square().mean().backward()
    reference.square().mean().backward()
    for path, module in lora_modules(ours).items():
        peft_module = twin.base_model.model.get_submodule(path)
        torch.testing.assert_close(module.lora_A.weight.grad, peft_module.lora_A["default"].weight.grad)
        torch.testing.assert_close(module.lora_B.weight.grad, peft_module.lora_B["default"].weight.grad)
        if config.use_dora:
            torch.testing.assert_close(module.lora_magnitude.grad,
                                       peft_module.lora_magnitude_vector["default"].weight.grad)
        assert module.weight.grad is None


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_mode_dropout_equals_peft(input_ids, variant):
    base, ours, config, paths = _adapted(variant, dropout=0.3)
    twin = peft_twin(base, config, paths)
    copy_adapters_into_peft(ours, twin)
    twin64 = copy.deepcopy(twin).double()
    ours.train(), twin.train(), twin64.train()
    logits, reference, exact = [_seeded(model, input_ids, seed=3) for model in (ours, twin, twin64)]
    # Same masks, different but equally valid fp32 rounding (the fused kernel folds 1/(1-p) and the scale into the
    # N x r term): the two can differ by the sum of their rounding errors, so each is held to PEFT's own fp32 error.
    peft_error = (reference.double() - exact).abs().max().item()
    assert (logits.double() - exact).abs().max().item() <= 3 * max(peft_error, 1e-6)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=5e-5)
    ours.eval()
    assert (ours(input_ids).logits - logits).abs().max() > 1e-3  # dropout really applied in training


def _seeded(model, input_ids, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(input_ids).logits


def test_rslora_scales_by_alpha_over_sqrt_r(input_ids):
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert LoraConfig(r=16, alpha=8).scaling == 8 / 16
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    for use_rslora, scale in ((False, 6 / 9), (True, 6 / 3)):
        module = LoraLinear(copy.deepcopy(linear), LoraConfig(r=9, alpha=6, dropout=0, use_rslora=use_rslora))
        torch.nn.init.normal_(module.lora_B.weight)
        expected = linear(x) + scale * x @ module.lora_A.weight.T @ module.lora_B.weight.T
        torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_equals_unmerged_forward_and_peft_merge(input_ids, variant):
    base, ours, config, paths = _adapted(variant, "qwen2")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    adapter_state = lora_state_dict(ours)
    merged = merge_lora(base_state, adapter_state, config)
    assert all(torch.equal(base_state[k], v) for k, v in base.state_dict().items())  # inputs untouched
    assert merged.keys() == base_state.keys()

    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(input_ids).logits, ours(input_ids).logits, rtol=1e-4, atol=1e-4)

    twin = peft_twin(base, config, paths)
    copy_adapters_into_peft(ours, twin)
    reference = twin.merge_and_unload().state_dict()
    for path in paths:
        torch.testing.assert_close(merged[f"{path}.weight"], reference[f"{path}.weight"])


def test_merge_keeps_dtype_and_refuses_mismatches():
    base, ours, config, paths = _adapted("lora")
    adapter_state = lora_state_dict(ours)
    bf16_state = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
    merged = merge_lora(bf16_state, adapter_state, config)
    assert merged[f"{paths[0]}.weight"].dtype == torch.bfloat16
    assert merge_lora(bf16_state, adapter_state, config, dtype=torch.float32)[f"{paths[0]}.weight"].dtype == torch.float32

    with pytest.raises(ExportError, match="use_dora"):
        merge_lora(base.state_dict(), adapter_state, _config("dora"))
    with pytest.raises(ExportError, match="does not have"):
        merge_lora({k: v for k, v in base.state_dict().items() if "layers.1." not in k}, adapter_state, config)
    with pytest.raises(ExportError, match="rank"):
        merge_lora(base.state_dict(), adapter_state, _config("lora", r=8))
    with pytest.raises(ExportError, match="unexpected tensor"):
        merge_lora(base.state_dict(), {**adapter_state, "model.norm.weight": torch.ones(64)}, config)


def test_all_linear_picks_the_seven_projections_only():
    model = tiny_model("llama_tied")
    paths = inject_lora(model, LoraConfig(r=2))
    assert len(paths) == 2 * 7
    assert {p.rpartition(".")[2] for p in paths} == SEVEN_PROJECTIONS
    assert not any("lm_head" in p or "embed" in p for p in paths)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert len(trainable) == 2 * len(paths)


def test_named_targets_and_base_names_kept():
    model = tiny_model("llama")
    base_keys = set(model.state_dict())
    paths = inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert paths == [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    keys = set(model.state_dict())
    assert base_keys <= keys  # q_proj.weight etc. still where they were
    assert keys - base_keys == {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    assert set(lora_state_dict(model)) == keys - base_keys
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.shape == (2, 64)
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.shape == (64, 2)


@pytest.mark.parametrize("targets, message", [
    (["q_prj"], "no linear layer is named 'q_prj'"),
    (["embed_tokens"], "not a linear layer"),
    ([], "non-empty list"),
])
def test_bad_targets_raise_config_errors(targets, message):
    with pytest.raises(ConfigError, match=message) as info:
        inject_lora(tiny_model("llama"), LoraConfig(target_modules=targets))
    assert info.value.where == "lora.target_modules" and "\n" not in str(info.value)


def test_injecting_twice_and_bad_settings_are_refused():
    model = tiny_model("llama")
    inject_lora(model, LoraConfig(r=2))
    with pytest.raises(ConfigError, match="already injected"):
        inject_lora(model, LoraConfig(r=2))
    for bad in (dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(init="zeros")):
        with pytest.raises(ConfigError) as info:
            LoraConfig(**bad).validate()
        assert info.value.where == f"lora.{next(iter(bad))}"


def test_bf16_base_with_fp32_adapters_computes_in_bf16_without_copying_the_base():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    module = LoraLinear(linear, LoraConfig(r=4, alpha=8, dropout=0, use_dora=False))
    torch.nn.init.normal_(module.lora_B.weight)
    assert module.lora_A.weight.dtype == torch.float32 and module.weight is linear.weight
    assert module.frozen_weight(torch.bfloat16) is linear.weight  # no per-step cast or copy
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.lora_A.weight.grad.dtype == torch.float32 and module.weight.grad is None
    reference = (x.float() @ linear.weight.float().T + linear.bias.float()
                 + 2 * x.float() @ module.lora_A.weight.T @ module.lora_B.weight.T)
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=5e-2)


def test_state_dict_roundtrip_and_mismatch(input_ids):
    _, ours, config, _ = _adapted("dora")
    fresh = tiny_model("llama")
    inject_lora(fresh, config)
    load_lora_state_dict(fresh, lora_state_dict(ours))
    torch.testing.assert_close(fresh(input_ids).logits, ours(input_ids).logits, rtol=0, atol=0)
    other = tiny_model("llama")
    inject_lora(other, _config("dora", target_modules=["q_proj"]))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_lora_state_dict(other, lora_state_dict(ours))


def test_describe_parameters_counts_adapters_and_frozen_weights():
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoraConfig(r=4, use_dora=True))
    summary = describe_parameters(model)
    adapters = sum(4 * (m.in_features + m.out_features) + m.out_features for m in lora_modules(model).values())
    assert summary.parts["adapters"].params == adapters == summary.trainable_params
    assert summary.parts["frozen"].params == total
    assert summary.total_params == total + adapters
    assert summary.parts["adapters"].bytes == 4 * adapters
    assert "trainable" in str(summary) and "\n" not in str(summary)


def test_homebake_decoder_injection(input_ids):
    decoder = pytest.importorskip("homebake.model.decoder")
    from homebake.model.args import ModelArgs
    from tiny_models import tiny_hf_config

    torch.manual_seed(0)
    model = decoder.CausalLM(ModelArgs.from_hf_config(tiny_hf_config("llama"))).eval()
    before = model.logits(model(input_ids))
    paths = inject_lora(model, LoraConfig(r=4, use_dora=True, dropout=0))
    assert len(paths) == 14 and {p.rpartition(".")[2] for p in paths} == SEVEN_PROJECTIONS
    torch.testing.assert_close(model.logits(model(input_ids)), before, rtol=0, atol=1e-5)
    randomize_adapters(model)
    hidden = model(input_ids)
    model.logits(hidden).square().mean().backward()
    assert all(m.lora_A.weight.grad is not None and m.lora_magnitude.grad is not None
               for m in lora_modules(model).values())
    merged = merge_lora(dict(model.state_dict()), lora_state_dict(model), LoraConfig(r=4, use_dora=True))
    plain = decoder.CausalLM(ModelArgs.from_hf_config(tiny_hf_config("llama"))).eval()
    plain.load_state_dict({k: v for k, v in merged.items() if ".lora_" not in k})
    torch.testing.assert_close(plain.logits(plain(input_ids)), model.logits(hidden), rtol=1e-4, atol=1e-4)


def test_dora_in_bf16_keeps_small_magnitude_updates():
    torch.manual_seed(0)
    module = LoraLinear(torch.nn.Linear(64, 48, dtype=torch.bfloat16),
                        LoraConfig(r=4, alpha=8, dropout=0, use_dora=True))
    torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = module(x)
        module.lora_magnitude.mul_(1.001)  # below bf16's resolution of 2^-8: lost if the scale were bf16
        y_scaled = module(x)
    assert y.dtype == torch.bfloat16
    # Per output row (averaged over tokens, so bf16 output rounding averages out) the change is 0.1%;
    # a bf16 scale gives 0% for some rows and 0.4-0.9% for others.
    y, y_scaled = y.float(), y_scaled.float()
    relative_change = ((y_scaled - y) * y).sum(dim=0) / y.square().sum(dim=0)  # least squares per row
    assert ((relative_change > 0.0002) & (relative_change < 0.0025)).all(), relative_change
    module(x).float().sum().backward()
    assert module.lora_magnitude.grad.dtype == torch.float32 and module.lora_magnitude.grad.abs().sum() > 0
