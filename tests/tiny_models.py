"""Tiny random models of every supported architecture, built with transformers, for tests across homebake.

``tiny_hf_config(variant)`` returns a config.json dict; ``save_tiny_hf_model(dir, variant)`` builds the
transformers model from it with random O(1) weights (so numerical differences show) and saves it with
``save_pretrained`` (safetensors). ``VARIANTS`` names every flavour the model layer supports.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# variant name -> (model_type, overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # SmolLM2-like
    "llama3_rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama_linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 32, "num_key_value_heads": 1}),  # head_dim != hidden / heads
    # Qwen2.5 long-context style YaRN (original context 64, so the ramp covers several frequencies)
    "qwen2_yarn": ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    # Gemma 2: layer 0 sliding (window 5 < the 13 test tokens), layer 1 global; soft-capping small enough to bite;
    # query_pre_attn_scalar != head_dim so the score scale is tested
    "gemma2": ("gemma2", {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 5,
                          "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0, "tie_word_embeddings": True,
                          "hidden_activation": "gelu_pytorch_tanh"}),
    # Gemma 3 (text): q/k norms, local/global RoPE bases, linear scaling on global layers (as 4B+)
    "gemma3": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                               "sliding_window_pattern": 2, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "tie_word_embeddings": True}),
    # Phi-3 mini: fused qkv_proj / gate_up_proj, a sliding window (as Phi-3-mini-4k's 2047)
    "phi3": ("phi3", {"sliding_window": 6, "original_max_position_embeddings": 256, "pad_token_id": 0}),
    # Phi-4-mini style: partial rotary 0.75, LongRoPE short/long factors (original context 64), tied embeddings
    "phi3_longrope": ("phi3", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True, "pad_token_id": 0,
                               "original_max_position_embeddings": 64,
                               "rope_scaling": {"type": "longrope",
                                                "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0],
                                                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}}),
}
ARCH_VARIANTS = ["llama", "llama_tied", "llama3_rope", "llama_linear_rope", "mistral", "qwen2", "qwen3",
                 "qwen2_yarn", "gemma2", "gemma3", "phi3", "phi3_longrope"]
NEW_FAMILY_VARIANTS = ["gemma2", "gemma3", "phi3", "phi3_longrope"]


def tiny_hf_config(model_type: str = "llama", **overrides: Any) -> dict:
    """config.json dict for a tiny model. ``model_type`` may also be a VARIANTS name."""
    if model_type in VARIANTS:
        model_type, variant_overrides = VARIANTS[model_type]
        overrides = {**variant_overrides, **overrides}
    # deep copy: transformers' config classes mutate nested dicts (rope_scaling) they are given
    config = copy.deepcopy({**_BASE, "model_type": model_type, **overrides})
    if model_type == "mistral":
        config.setdefault("sliding_window", None)
    return config


def build_tiny_hf_model(config: dict, *, seed: int = 0):
    """A transformers *ForCausalLM with random weights of unit-ish scale (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def save_tiny_hf_model(
    directory: str | Path, model_type: str = "llama", *, seed: int = 0, max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Build a tiny random transformers model and ``save_pretrained`` it (safetensors) into ``directory``."""
    directory = Path(directory)
    model = build_tiny_hf_model(tiny_hf_config(model_type, **overrides), seed=seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def load_hf_reference(directory: str | Path, **kwargs: Any):
    """The transformers model saved in ``directory`` (fp32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32,
                                                **kwargs).eval()


TESTS_TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"
CHATML_TEMPLATE = (TESTS_TEMPLATES / "smollm2-chatml.jinja").read_text()
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def save_byte_tokenizer(directory: Path, *, merges: list[tuple[str, str]] = (), bos_token: str | None = None) -> None:
    """A byte-level BPE (one token per byte, plus ``merges``) with ChatML specials and the SmolLM2 template,
    written as tokenizer.json + tokenizer_config.json; vocab < 320, so it fits every tiny model."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(CHATML_SPECIALS)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": bos_token, "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE}))
