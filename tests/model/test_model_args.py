"""ModelArgs from config.json (both transformers 4.x and 5.x styles), to config.json, and from GGUF metadata."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ARCH_VARIANTS, VARIANTS, tiny_hf_config

from homebake.errors import ModelLoadError, UnsupportedArchitectureError
from homebake.model.args import ModelArgs
from homebake.model.decoder import CausalLM
from homebake.model.load import load_model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_from_hf_config_agrees_with_transformers(variant):
    from transformers import AutoConfig

    config = tiny_hf_config(variant)
    args = ModelArgs.from_hf_config(config)
    ref = AutoConfig.for_model(**config)
    assert args.model_type == ref.model_type
    assert args.head_dim == getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert args.num_key_value_heads == ref.num_key_value_heads
    assert args.tie_word_embeddings == ref.tie_word_embeddings
    rope = ref.rope_parameters.get("full_attention", ref.rope_parameters)  # Gemma 3: per layer type
    assert args.rope_theta == rope["rope_theta"]
    assert args.rope_type == rope["rope_type"]
    assert args.rotary_dim == int(args.head_dim * rope.get("partial_rotary_factor", 1.0))
    ref_window = getattr(ref, "sliding_window", None)
    for layer in range(args.num_hidden_layers):
        layer_types = getattr(ref, "layer_types", None)
        expected = ref_window if (layer_types is None or layer_types[layer] == "sliding_attention") else None
        assert args.layer_window(layer) == expected


@pytest.mark.parametrize("variant", ["llama3_rope", "qwen2_window", "mistral_window", "qwen3", "qwen2_yarn",
                                     "gemma2", "gemma3", "phi3", "phi3_longrope"])
def test_v4_and_v5_config_styles_give_the_same_args(variant, tiny_dir):
    """Hub checkpoints use rope_theta/rope_scaling (v4); transformers 5 writes rope_parameters."""
    v4 = tiny_hf_config(variant)
    v5 = json.loads((tiny_dir(variant) / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert ModelArgs.from_hf_config(v4) == ModelArgs.from_hf_config(v5)


def test_unknown_keys_are_ignored():
    config = {**tiny_hf_config("llama"), "some_future_field": [1, 2], "quantization_hint": "x"}
    assert ModelArgs.from_hf_config(config) == ModelArgs.from_hf_config(tiny_hf_config("llama"))


def test_qwen2_bias_and_qwen3_qk_norm_flags():
    qwen2 = ModelArgs.from_hf_config(tiny_hf_config("qwen2"))
    assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.qk_norm
    qwen3 = ModelArgs.from_hf_config(tiny_hf_config("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_attention_heads


def test_unsupported_model_type_lists_supported_and_names_the_file():
    config = {**tiny_hf_config("llama"), "model_type": "mixtral"}  # a mixture-of-experts model
    with pytest.raises(UnsupportedArchitectureError) as info:
        ModelArgs.from_hf_config(config, where="/models/x/config.json")
    text = str(info.value)
    assert "mixtral" in text and "/models/x/config.json" in text
    assert "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3, phi3" in text
    assert "\n" not in text


@pytest.mark.parametrize("change,field", [
    ({"rope_scaling": {"rope_type": "mrope", "mrope_section": [2, 2, 4]}}, "rope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_features_are_refused(change, field):
    with pytest.raises(UnsupportedArchitectureError, match=field):
        ModelArgs.from_hf_config({**tiny_hf_config("llama"), **change})


def test_missing_required_field_is_a_load_error():
    config = tiny_hf_config("llama")
    del config["hidden_size"]
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelArgs.from_hf_config(config)


@pytest.mark.parametrize("variant", ["llama3_rope", "llama_linear_rope", "mistral_window", "qwen2_window", "qwen3",
                                     "llama_tied", "qwen2_yarn", "gemma2", "gemma3", "phi3", "phi3_longrope"])
def test_to_hf_config_round_trips_through_homebake_and_transformers(variant, tiny_dir, tmp_path, token_ids):
    """A folder with our to_hf_config() + the original weights loads in transformers to the same model."""
    from tiny_models import load_hf_reference

    args = ModelArgs.from_hf_config(tiny_hf_config(variant))
    config = args.to_hf_config()
    assert ModelArgs.from_hf_config(config) == args
    source = tiny_dir(variant)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    ours = load_model(source, with_tokenizer=False).model
    theirs = load_hf_reference(tmp_path)
    with torch.no_grad():
        diff = (theirs(token_ids).logits - ours.logits(ours(token_ids))).abs().max().item()
    assert diff <= 1e-4


def test_from_gguf_metadata_reads_llama_cpp_keys():
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.block_count": 2,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 256,
        "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0, "llama.vocab_size": 320,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    args = ModelArgs.from_gguf_metadata(metadata)
    assert (args.model_type, args.hidden_size, args.head_dim, args.num_key_value_heads) == ("llama", 64, 16, 2)
    assert args.rope_theta == 500000.0 and args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (args.bos_token_id, args.eos_token_id, args.vocab_size) == (1, 2, 320)
    CausalLM(args)  # builds


def test_from_gguf_metadata_refuses_unknown_architecture():
    with pytest.raises(UnsupportedArchitectureError,
                       match="qwen2moe.*supported: gemma2, gemma3, llama, phi3, qwen2, qwen3"):
        ModelArgs.from_gguf_metadata({"general.architecture": "qwen2moe"}, where="m.gguf")


def test_every_arch_variant_is_in_the_variant_table():
    assert set(ARCH_VARIANTS) <= set(VARIANTS)
