"""Gemma 2/3 and Phi-3 specifics: what the shared parity tests (test_model_load / test_model_gguf, which run
every ARCH_VARIANTS entry) do not reach: KV cache, packing, LongRoPE's long factors, dynamic NTK, soft-capping
in the loss path, multimodal Gemma 3 folders, the GGUF layout llama.cpp expects and llama.cpp-made files."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import load_hf_reference, save_tiny_hf_model, tiny_hf_config

from homebake.errors import ExportError, ModelLoadError
from homebake.export.gguf_writer import write_gguf
from homebake.model.args import ModelArgs
from homebake.model.gemma import GemmaCausalLM
from homebake.model.gguf_file import read_gguf
from homebake.model.load import load_model
from homebake.model.phi3 import Phi3CausalLM

from test_model_gguf import rewrite_gguf


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model.logits(model(ids, **kwargs))


def ours(tiny_dir, variant):
    return load_model(tiny_dir(variant), with_tokenizer=False).model


def test_family_classes_and_hf_names(tiny_dir):
    gemma3 = ours(tiny_dir, "gemma3")
    assert isinstance(gemma3, GemmaCausalLM) and isinstance(ours(tiny_dir, "phi3"), Phi3CausalLM)
    names = set(gemma3.state_dict())
    for part in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        assert f"model.layers.0.{part}.weight" in names
    assert "lm_head.weight" not in names  # tied
    phi = set(ours(tiny_dir, "phi3").state_dict())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= phi
    assert not any("q_proj" in n or "gate_proj" in n for n in phi)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3", "phi3_longrope"])
def test_kv_cache_generation_equals_full_sequence(tiny_dir, variant, token_ids):
    model = ours(tiny_dir, variant)
    full = logits(model, token_ids)
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    steps = [logits(model, token_ids[:, :5], kv_cache=cache)]
    for t in range(5, token_ids.shape[1]):
        steps.append(logits(model, token_ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=3e-5)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3"])
def test_packed_rows_equal_each_example_run_alone(tiny_dir, variant):
    model = ours(tiny_dir, variant)
    generator = torch.Generator().manual_seed(3)
    examples = [torch.randint(3, 320, (n,), generator=generator) for n in (7, 4, 9)]
    ids = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    packed = logits(model, ids, position_ids=positions)[0]
    start = 0
    for example in examples:
        alone = logits(model, example[None])[0]
        torch.testing.assert_close(packed[start:start + len(example)], alone, rtol=0, atol=1e-5)
        start += len(example)


def test_longrope_uses_long_factors_beyond_the_original_context(tiny_dir, hf_reference):
    """phi3_longrope's original context is 64: 80 tokens switch both models to the long factors."""
    model = ours(tiny_dir, "phi3_longrope")
    ids = torch.randint(3, 320, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_reference("phi3_longrope")(ids).logits
    long_logits = logits(model, ids)
    assert (long_logits - reference).abs().max() <= 1e-4
    # the first 64 positions differ from a short pass: the table really switched
    assert (long_logits[:, :64] - logits(model, ids[:, :64])).abs().max() > 1e-3
    # generation with a cache longer than the original context uses the long table throughout
    cache = model.new_kv_cache(1, 96)
    steps = [logits(model, ids[:, :70], kv_cache=cache)]
    for t in range(70, 80):
        steps.append(logits(model, ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), long_logits, rtol=0, atol=1e-5)


def test_dynamic_ntk_rope_matches_transformers_beyond_max_positions(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "dyn", "llama", max_position_embeddings=16,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = load_model(folder, with_tokenizer=False).model
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = load_hf_reference(folder)(ids).logits
    assert (logits(model, ids) - reference).abs().max() <= 1e-4


def test_gemma_soft_capping_reaches_the_loss_path(tiny_dir, token_ids):
    """With final soft-capping the head is not a plain matrix: head_weight is None so the training loss
    (train/loss.py) calls model.logits, which caps; capped logits stay within the cap."""
    from homebake.train.loss import chunked_cross_entropy

    model = ours(tiny_dir, "gemma2")
    assert model.head_weight is None
    hidden = model(token_ids)
    capped = model.logits(hidden)
    assert capped.abs().max() < 5.0
    targets = torch.randint(3, 320, token_ids.shape, generator=torch.Generator().manual_seed(4))
    total, count = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), model.logits)
    expected = torch.nn.functional.cross_entropy(capped.reshape(-1, capped.shape[-1]), targets.reshape(-1),
                                                 reduction="sum")
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)
    assert ours(tiny_dir, "gemma3").head_weight is not None  # Gemma 3: no final soft-capping


@pytest.mark.parametrize("variant", ["gemma2", "phi3_longrope"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, token_ids, variant):
    grads = []
    for checkpointing in (False, True):
        model = ours(tiny_dir, variant).train()
        model.gradient_checkpointing = checkpointing
        model.logits(model(token_ids)).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_multimodal_gemma3_folder_loads_its_language_model(layout, tiny_dir, hf_reference, tmp_path, token_ids):
    """Gemma 3 4B+ ships as Gemma3ForConditionalGeneration: config text_config, weights under
    language_model.* (v4) or model.language_model.* (v5), plus a vision tower homebake leaves out."""
    text = json.loads((tiny_dir("gemma3") / "config.json").read_text())
    del text["eos_token_id"]  # as the hub's configs: the end tokens live in the outer config
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8}, "eos_token_id": [1, 106]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tiny_dir("gemma3") / "model.safetensors")
    prefix, head = ("language_model.model.", "language_model.lm_head.") if layout == "transformers4" else \
        ("model.language_model.", "lm_head.")
    renamed = {(prefix + k[len("model."):]) if k.startswith("model.") else head + k[len("lm_head."):]: v
               for k, v in state.items()}
    renamed["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    renamed["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
    save_file(renamed, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, with_tokenizer=False)
    assert loaded.args.model_type == "gemma3_text" and loaded.args.eos_token_id == [1, 106]
    with torch.no_grad():
        assert (logits(loaded.model, token_ids) - hf_reference("gemma3")(token_ids).logits).abs().max() <= 1e-4


def test_multimodal_gemma3_without_text_config_is_a_load_error():
    with pytest.raises(ModelLoadError, match="text_config"):
        ModelArgs.from_hf_config({"model_type": "gemma3"}, where="x/config.json")


def test_su_is_longrope_and_bad_factor_lengths_are_refused():
    config = tiny_hf_config("phi3_longrope")
    config["rope_scaling"] = {**config["rope_scaling"], "type": "su"}
    assert ModelArgs.from_hf_config(config).rope_type == "longrope"
    config["rope_scaling"]["long_factor"] = [1.0, 2.0]
    with pytest.raises(ModelLoadError, match="long_factor.*rotary dimension 12 needs 6"):
        ModelArgs.from_hf_config(config)


def test_family_defaults_for_keys_a_config_leaves_out():
    """save_pretrained omits values equal to the base defaults (Gemma's tie_word_embeddings=True)."""
    config = tiny_hf_config("gemma2")
    for key in ("tie_word_embeddings", "query_pre_attn_scalar", "final_logit_softcapping"):
        config.pop(key)
    args = ModelArgs.from_hf_config(config)
    assert args.tie_word_embeddings and args.query_pre_attn_scalar == 256 and args.final_logit_softcapping == 30.0
    gemma3 = ModelArgs.from_hf_config({"model_type": "gemma3_text"})  # every field a Gemma3TextConfig default
    assert (gemma3.vocab_size, gemma3.head_dim, gemma3.rope_theta, gemma3.rope_local_base_freq) == \
        (262208, 256, 1_000_000.0, 10000.0)
    assert [gemma3.layer_window(i) for i in range(6)] == [4096] * 5 + [None]


def test_gemma_activation_is_checked():
    with pytest.raises(Exception, match="hidden_activation 'silu' is not supported for gemma2"):
        ModelArgs.from_hf_config({**tiny_hf_config("gemma2"), "hidden_activation": "silu"})


# -- the GGUF layout llama.cpp expects --------------------------------------------------------------------


def export(tiny_dir, variant, path):
    loaded = load_model(tiny_dir(variant), with_tokenizer=False)
    return write_gguf(path, loaded.model.state_dict(), loaded.args), loaded


def test_gemma2_gguf_layout(tiny_dir, tmp_path):
    path, loaded = export(tiny_dir, "gemma2", tmp_path / "g.gguf")
    contents = read_gguf(path)
    meta, tensors = contents.metadata, contents.tensors
    assert meta["general.architecture"] == "gemma2"
    assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"]) == (3.0, 5.0)
    assert meta["gemma2.attention.sliding_window"] == 5
    assert meta["gemma2.attention.sliding_window_pattern"] == [True, False]
    assert "output.weight" not in tensors  # tied
    for gguf_name, hf_name in (("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                               ("ffn_norm", "pre_feedforward_layernorm"),
                               ("post_ffw_norm", "post_feedforward_layernorm")):
        stored = tensors[f"blk.1.{gguf_name}.weight"]
        original = loaded.model.state_dict()[f"model.layers.1.{hf_name}.weight"].numpy()
        np.testing.assert_allclose(stored, original + 1.0, rtol=0, atol=1e-7)  # llama.cpp multiplies by 1 + w


def test_phi3_gguf_layout(tiny_dir, tmp_path):
    path, loaded = export(tiny_dir, "phi3_longrope", tmp_path / "p.gguf")
    contents = read_gguf(path)
    meta, tensors = contents.metadata, contents.tensors
    args = loaded.args
    assert meta["general.architecture"] == "phi3" and meta["phi3.rope.dimension_count"] == 12
    assert meta["phi3.rope.scaling.original_context_length"] == 64
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(64)) ** 0.5, rel=1e-6)
    assert tensors["blk.0.attn_qkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert tensors["blk.0.ffn_up.weight"].shape == (2 * args.intermediate_size, 64)  # gate rows, then up rows
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], np.float32(args.rope_scaling["long_factor"]))
    assert "output.weight" not in tensors


def test_phi3_gguf_without_sliding_window_writes_zero(tiny_dir, tmp_path):
    path, _ = export(tiny_dir, "phi3_longrope", tmp_path / "p.gguf")
    meta = read_gguf(path).metadata
    assert meta["phi3.attention.sliding_window"] == 0
    assert load_model(path, with_tokenizer=False).args.sliding_window is None


@pytest.mark.parametrize("variant,drop,expected", [
    # without homebake's extra keys, llama.cpp's rules apply: Gemma 2 alternates (every 2nd layer global),
    # query_pre_attn_scalar = head_dim; Gemma 3 has 5 local layers per global one and a local base of 10000
    ("gemma2", ["gemma2.attention.sliding_window_pattern", "gemma2.attention.scale"],
     {"query_pre_attn_scalar": 32.0, "layer_types": ["sliding_attention", "full_attention"]}),
    ("gemma3", ["gemma3.attention.sliding_window_pattern", "gemma3.attention.scale", "gemma3.rope.freq_base_swa"],
     {"query_pre_attn_scalar": 16.0, "rope_local_base_freq": 10000.0,
      "layer_types": ["sliding_attention", "sliding_attention"]}),
])
def test_llama_cpp_made_gemma_gguf_follows_llama_cpp_defaults(variant, drop, expected, tiny_dir, tmp_path):
    path, _ = export(tiny_dir, variant, tmp_path / "ours.gguf")
    theirs = tmp_path / "theirs.gguf"
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(theirs, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    args = load_model(theirs, with_tokenizer=False).args
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_gemma2_without_soft_capping_has_no_gguf_form(tiny_dir, tmp_path):
    loaded = load_model(tiny_dir("gemma2"), with_tokenizer=False)
    with pytest.raises(ExportError, match="soft-capping"):
        write_gguf(tmp_path / "g.gguf", loaded.model.state_dict(), loaded.args.replace(attn_logit_softcapping=None))


def test_qwen2_yarn_gguf_keys(tiny_dir, tmp_path):
    path, _ = export(tiny_dir, "qwen2_yarn", tmp_path / "y.gguf")
    meta = read_gguf(path).metadata
    assert (meta["qwen2.rope.scaling.type"], meta["qwen2.rope.scaling.factor"],
            meta["qwen2.rope.scaling.original_context_length"]) == ("yarn", 4.0, 64)


def test_gguf_unknown_tensor_of_a_new_family_is_named(tiny_dir, tmp_path):
    path, _ = export(tiny_dir, "phi3", tmp_path / "p.gguf")
    broken = rewrite_gguf(path, tmp_path / "b.gguf", add={"blk.0.attn_q.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ModelLoadError, match="unexpected tensor 'blk.0.attn_q.weight'.*phi3"):
        load_model(broken, with_tokenizer=False)
