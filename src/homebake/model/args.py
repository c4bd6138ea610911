"""ModelArgs: the decoder's shape and flags, read from the checkpoint's own config.json or GGUF metadata.

Field names follow Hugging Face config names so a config.json maps onto them directly. Unknown keys are
ignored; there is no registry of model sizes and no dispatch on model names — only on ``model_type``
(config.json) or ``general.architecture`` (GGUF), which say which block structure the weights need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# GGUF architecture names llama.cpp uses for these model types (Mistral is converted as "llama").
GGUF_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
HF_ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF form: {"rope_type": ..., "factor": ..., ...}; None = plain RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 tie it to attention_bias; Qwen2 never)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None = all sliding
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
                where="model config",
                fix="check the checkpoint's config.json / GGUF metadata",
            )

    # -- derived ---------------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def layer_window(self, layer: int) -> int | None:
        """The sliding-window size layer ``layer`` attends with, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    # -- from config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, where: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face config.json dict (v4 ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``)."""
        if not isinstance(config, Mapping):
            raise ModelLoadError("config is not a JSON object", where=where, fix="use the model's own config.json")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
                where=f"{where} field 'model_type'",
                fix="use a Llama, Mistral, Qwen2/2.5, Qwen3 or SmolLM2 checkpoint",
            )
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(
                f"hidden_act {act!r} is not supported (only silu)", where=f"{where} field 'hidden_act'",
                fix="use a checkpoint with SwiGLU (silu) MLPs",
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            kwargs: dict[str, Any] = dict(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                pad_token_id=config.get("pad_token_id"),
            )
        except KeyError as exc:
            raise ModelLoadError(f"missing required field {exc.args[0]!r}", where=where,
                                 fix="use the model's own, complete config.json") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid value: {exc}", where=where, fix="use the model's own config.json") from None

        kwargs["rope_theta"], kwargs["rope_scaling"] = _hf_rope(config, where)
        if model_type == "qwen2":
            kwargs.update(attention_bias=True, attention_out_bias=False)
        elif model_type in ("llama", "qwen3"):
            bias = bool(config.get("attention_bias", False))
            kwargs.update(attention_bias=bias, attention_out_bias=bias)
        kwargs["mlp_bias"] = bool(config.get("mlp_bias", False))
        kwargs["qk_norm"] = model_type == "qwen3"
        kwargs["sliding_window"], kwargs["layer_types"] = _hf_sliding_window(config, model_type, layers)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict transformers (4.x and 5.x) and homebake both read back to the same model."""
        config: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURE_CLASS[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("llama", "qwen3"):
            config["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            config["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            config["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            config["use_sliding_window"] = self.sliding_window is not None
            config["sliding_window"] = self.sliding_window
            config["layer_types"] = [
                "sliding_attention" if self.layer_window(i) else "full_attention" for i in range(self.num_hidden_layers)
            ]
            # max_window_layers only matters when layer_types is absent; keep it consistent anyway
            config["max_window_layers"] = next(
                (i for i in range(self.num_hidden_layers) if self.layer_window(i)), self.num_hidden_layers
            )
        return config

    # -- from GGUF -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], tensors: Mapping[str, Any] | None = None, *, where: str = "GGUF file"
    ) -> "ModelArgs":
        """Build from GGUF metadata (plain Python values). ``tensors`` (GGUF names -> arrays), when given,
        settles what only the tensors say: vocab size, tied head, biases, and Llama 3 ``rope_freqs``."""
        arch = metadata.get("general.architecture")
        supported = sorted(set(GGUF_ARCH_OF_MODEL_TYPE.values()))
        if arch not in supported:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(supported)})",
                where=f"{where} key 'general.architecture'",
                fix="use a Llama, Mistral, Qwen2/2.5, Qwen3 or SmolLM2 GGUF",
            )

        def get(key: str, default: Any = KeyError) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is KeyError:
                raise ModelLoadError(f"missing metadata key '{arch}.{key}'", where=where,
                                     fix="re-convert the model with a current llama.cpp convert_hf_to_gguf.py")
            return value

        tensors = tensors or {}
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # some converters store one count per layer
            if len(set(kv_heads)) != 1:
                raise UnsupportedArchitectureError("per-layer KV head counts are not supported", where=where)
            kv_heads = kv_heads[0]
        head_dim = int(get("attention.key_length", hidden // heads))
        rope_dim = int(get("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise UnsupportedArchitectureError(
                f"partial rotary embeddings (rope.dimension_count {rope_dim} != head dim {head_dim}) are not supported",
                where=where,
            )
        embed = tensors.get("token_embd.weight")
        vocab = get("vocab_size", None)
        if embed is not None:
            vocab = embed.shape[0]
        elif vocab is None:
            vocab = len(metadata.get("tokenizer.ggml.tokens") or []) or None
        if not vocab:
            raise ModelLoadError("cannot tell the vocabulary size", where=where,
                                 fix="the GGUF has no token_embd tensor or vocab size; re-convert it")

        model_type = arch
        sliding_window = get("attention.sliding_window", None)
        if arch == "llama" and sliding_window:
            model_type = "mistral"  # Mistral = Llama blocks + sliding-window attention
        rope_theta = float(get("rope.freq_base", 10000.0))
        rope_scaling = _gguf_rope_scaling(get, tensors, rope_theta, head_dim, where)
        bias = "blk.0.attn_q.bias" in tensors if tensors else arch == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=bool(tensors) and "output.weight" not in tensors,
            attention_bias=bias,
            attention_out_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            qk_norm=arch == "qwen3",
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        )

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _hf_rope(config: Mapping[str, Any], where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config style; validates the rope type."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" in params and "full_attention" not in params:
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in (config.get("rope_scaling") or {}).items() if k != "rope_theta"}
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
            where=f"{where} field 'rope_scaling'",
            fix="use a checkpoint with default, linear or llama3 RoPE",
        )
    if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = config.get("original_max_position_embeddings", 8192)
    return float(theta), (None if rope_type == "default" else scaling)


def _hf_sliding_window(config: Mapping[str, Any], model_type: str, layers: int) -> tuple[int | None, list | None]:
    window = config.get("sliding_window")
    if model_type in ("llama",) or not window:
        return None, None
    if model_type == "mistral":
        return int(window), None
    # Qwen2/3: the window applies only with use_sliding_window, to the layers layer_types marks
    if not config.get("use_sliding_window", False):
        return None, None
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= config.get("max_window_layers", layers) else "full_attention" for i in range(layers)
    ]
    return int(window), list(layer_types)


def _gguf_rope_scaling(get, tensors, rope_theta: float, head_dim: int, where: str) -> dict | None:
    from .rope import llama3_scaling_from_factors

    kind = get("rope.scaling.type", None)
    if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama 3 scaling as per-frequency divisors
        return llama3_scaling_from_factors(tensors["rope_freqs.weight"], rope_theta, head_dim, where=where)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    raise UnsupportedArchitectureError(
        f"rope scaling {kind!r} is not supported (supported: linear, llama3)",
        where=f"{where} key 'rope.scaling.type'",
    )
