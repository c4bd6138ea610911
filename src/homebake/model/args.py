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

# "gemma3" is the multimodal Gemma 3 wrapper (4B and up): its text_config is read, its vision tower ignored.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
GEMMA_TYPES = frozenset({"gemma2", "gemma3_text"})
# GGUF architecture names llama.cpp uses for these model types (Mistral is converted as "llama").
GGUF_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                           "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
MODEL_TYPE_OF_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                           "gemma3": "gemma3_text", "phi3": "phi3"}
HF_ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# What a config.json that omits a key means for each family (its transformers config class defaults;
# save_pretrained leaves out values equal to the base defaults, e.g. Gemma's tie_word_embeddings=True).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(tie_word_embeddings=True, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, rope_theta=10000.0, max_position_embeddings=8192,
                   pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=None,
                        final_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                        sliding_window_pattern=6, max_position_embeddings=131072,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "phi3": dict(tie_word_embeddings=False, original_max_position_embeddings=4096, sliding_window=None,
                 max_position_embeddings=4096),
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_tanh": "gelu_pytorch_tanh"}
_FAMILY_ACTIVATIONS = {"gemma2": "gelu_pytorch_tanh", "gemma3_text": "gelu_pytorch_tanh"}


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
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_pytorch_tanh" (Gemma's GeGLU)
    partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Phi-4-mini: 0.75)
    # Gemma 2/3: attention scores scale by query_pre_attn_scalar**-0.5; tanh soft-capping of scores and logits
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None  # Gemma 3: plain RoPE base of the sliding-window layers

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

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_gemma(self) -> bool:
        return self.model_type in GEMMA_TYPES

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
        if model_type == "gemma3":  # multimodal wrapper: the language model is described by text_config
            config = text_config_of(config, where)
            model_type = "gemma3_text"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
                where=f"{where} field 'model_type'",
                fix="use a Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 2/3 or Phi-3/3.5/4-mini checkpoint",
            )
        defaults = _FAMILY_DEFAULTS.get(model_type, {})

        def get(key: str, fallback: Any = KeyError) -> Any:
            if key in config:
                return config[key]
            if key in defaults:
                return defaults[key]
            if fallback is KeyError:
                raise KeyError(key)
            return fallback

        act_field = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
        act = _ACTIVATIONS.get(config.get(act_field) or defaults.get("hidden_activation", "silu"))
        wanted = _FAMILY_ACTIVATIONS.get(model_type, "silu")
        if act != wanted:
            raise UnsupportedArchitectureError(
                f"{act_field} {config.get(act_field)!r} is not supported for {model_type} (only {wanted})",
                where=f"{where} field '{act_field}'",
                fix="use the model's own config.json" if model_type in _FAMILY_ACTIVATIONS
                else "use a checkpoint with SwiGLU (silu) MLPs",
            )
        if config.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError("bidirectional attention (an embedding model) is not supported",
                                               where=f"{where} field 'use_bidirectional_attention'",
                                               fix="use a causal (generative) checkpoint")
        try:
            hidden = int(get("hidden_size"))
            heads = int(get("num_attention_heads"))
            layers = int(get("num_hidden_layers"))
            kwargs: dict[str, Any] = dict(
                model_type=model_type,
                vocab_size=int(get("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(get("num_key_value_heads", None) or heads),
                head_dim=int(get("head_dim", None) or hidden // heads),
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                bos_token_id=get("bos_token_id", None),
                eos_token_id=get("eos_token_id", None),
                pad_token_id=get("pad_token_id", None),
                hidden_act=act,
            )
            if model_type in GEMMA_TYPES:
                kwargs.update(
                    query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
                    attn_logit_softcapping=_optional_float(get("attn_logit_softcapping")),
                    final_logit_softcapping=_optional_float(get("final_logit_softcapping")),
                )
        except KeyError as exc:
            raise ModelLoadError(f"missing required field {exc.args[0]!r}", where=where,
                                 fix="use the model's own, complete config.json") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid value: {exc}", where=where, fix="use the model's own config.json") from None

        rope = _hf_rope(config, model_type, defaults, kwargs, where)
        kwargs["rope_theta"], kwargs["rope_scaling"] = rope.theta, rope.scaling
        kwargs["partial_rotary_factor"] = rope.partial_rotary_factor
        if model_type == "gemma3_text":
            kwargs["rope_local_base_freq"] = rope.local_theta
        if model_type == "qwen2":
            kwargs.update(attention_bias=True, attention_out_bias=False)
        elif model_type in ("llama", "qwen3", *GEMMA_TYPES):
            bias = bool(config.get("attention_bias", False))
            kwargs.update(attention_bias=bias, attention_out_bias=bias)
        kwargs["mlp_bias"] = bool(config.get("mlp_bias", False))
        kwargs["qk_norm"] = model_type in ("qwen3", "gemma3_text")
        kwargs["sliding_window"], kwargs["layer_types"] = _hf_sliding_window(config, model_type, layers, defaults)
        args = cls(**kwargs)
        _check_rope_factors(args, where)
        return args

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
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("llama", "qwen3", *GEMMA_TYPES):
            config["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            config["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "phi3"):
            config["sliding_window"] = self.sliding_window
        layer_types = ["sliding_attention" if self.layer_window(i) else "full_attention"
                       for i in range(self.num_hidden_layers)]
        if self.model_type in ("qwen2", "qwen3"):
            config["use_sliding_window"] = self.sliding_window is not None
            config["sliding_window"] = self.sliding_window
            config["layer_types"] = layer_types
            # max_window_layers only matters when layer_types is absent; keep it consistent anyway
            config["max_window_layers"] = next(
                (i for i in range(self.num_hidden_layers) if self.layer_window(i)), self.num_hidden_layers
            )
        if self.is_gemma:
            scalar = self.query_pre_attn_scalar
            config.update(hidden_activation=self.hidden_act,
                          query_pre_attn_scalar=int(scalar) if scalar is not None and scalar.is_integer() else scalar,
                          attn_logit_softcapping=self.attn_logit_softcapping,
                          final_logit_softcapping=self.final_logit_softcapping,
                          sliding_window=self.sliding_window, layer_types=layer_types)
        if self.model_type == "gemma3_text":
            config["rope_local_base_freq"] = self.rope_local_base_freq
        if self.model_type == "phi3":
            config["partial_rotary_factor"] = self.partial_rotary_factor
            scaling = dict(self.rope_scaling or {})
            # Phi-3 keeps the pretraining length at the top level (transformers prefers it there)
            config["original_max_position_embeddings"] = int(scaling.pop("original_max_position_embeddings",
                                                                         self.max_position_embeddings))
            if scaling:
                config["rope_scaling"] = {"type": scaling["rope_type"], **scaling}
        return config

    # -- from GGUF -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], tensors: Mapping[str, Any] | None = None, *, where: str = "GGUF file"
    ) -> "ModelArgs":
        """Build from GGUF metadata (plain Python values). ``tensors`` (GGUF names -> arrays), when given,
        settles what only the tensors say: vocab size, tied head, biases, Llama 3 ``rope_freqs`` and
        Phi-3's LongRoPE factors."""
        arch = metadata.get("general.architecture")
        supported = sorted(MODEL_TYPE_OF_GGUF_ARCH)
        if arch not in supported:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(supported)})",
                where=f"{where} key 'general.architecture'",
                fix="use a Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 2/3 or Phi-3 GGUF",
            )

        def get(key: str, default: Any = KeyError) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is KeyError:
                raise ModelLoadError(f"missing metadata key '{arch}.{key}'", where=where,
                                     fix="re-convert the model with a current llama.cpp convert_hf_to_gguf.py")
            return value

        tensors = tensors or {}
        model_type = MODEL_TYPE_OF_GGUF_ARCH[arch]
        gemma = model_type in GEMMA_TYPES
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        layers = int(get("block_count"))
        kv_heads = get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # some converters store one count per layer
            if len(set(kv_heads)) != 1:
                raise UnsupportedArchitectureError("per-layer KV head counts are not supported", where=where)
            kv_heads = kv_heads[0]
        head_dim = int(get("attention.key_length", hidden // heads))
        rope_dim = int(get("rope.dimension_count", head_dim))
        partial = 1.0
        if rope_dim != head_dim:
            if arch != "phi3" or not 0 < rope_dim < head_dim:
                raise UnsupportedArchitectureError(
                    f"partial rotary embeddings (rope.dimension_count {rope_dim} != head dim {head_dim}) are not "
                    f"supported for architecture {arch!r}", where=where,
                )
            partial = rope_dim / head_dim
        embed = tensors.get("token_embd.weight")
        vocab = get("vocab_size", None)
        if embed is not None:
            vocab = embed.shape[0]
        elif vocab is None:
            vocab = len(metadata.get("tokenizer.ggml.tokens") or []) or None
        if not vocab:
            raise ModelLoadError("cannot tell the vocabulary size", where=where,
                                 fix="the GGUF has no token_embd tensor or vocab size; re-convert it")

        sliding_window = get("attention.sliding_window", None) or None
        if arch == "llama" and sliding_window:
            model_type = "mistral"  # Mistral = Llama blocks + sliding-window attention
        defaults = _FAMILY_DEFAULTS.get(model_type, {})
        rope_theta = float(get("rope.freq_base", defaults.get("rope_theta", 10000.0)))
        max_positions = int(get("context_length", 2048))
        rope_scaling = _gguf_rope_scaling(get, tensors, rope_theta, head_dim, rope_dim, max_positions, where)
        bias = "blk.0.attn_q.bias" in tensors if tensors else arch == "qwen2"
        extra: dict[str, Any] = {}
        layer_types = None
        if gemma:
            if sliding_window is None and get("attention.sliding_window", None) is None:
                sliding_window = defaults["sliding_window"]
            layer_types = _gguf_layer_types(get("attention.sliding_window_pattern", None), layers,
                                            2 if arch == "gemma2" else 6, where)
            scale = get("attention.scale", None)
            # llama.cpp's rule when the file does not say: head_dim, except the 27B models (hidden / heads)
            big = layers == (46 if arch == "gemma2" else 62)
            scalar = _tidy_float(1.0 / float(scale) ** 2) if scale else float(hidden // heads if big else head_dim)
            extra = dict(
                hidden_act="gelu_pytorch_tanh",
                query_pre_attn_scalar=scalar,
                # llama.cpp soft-caps Gemma 2 with 50 / 30 when the file has no keys; Gemma 3 only if given
                attn_logit_softcapping=_optional_float(get("attn_logit_softcapping", defaults["attn_logit_softcapping"])),
                final_logit_softcapping=_optional_float(get("final_logit_softcapping",
                                                            defaults["final_logit_softcapping"])),
            )
            if arch == "gemma3":
                extra["rope_local_base_freq"] = float(get("rope.freq_base_swa", defaults["rope_local_base_freq"]))
        return cls(
            model_type=model_type,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=("output.weight" not in tensors) if tensors else gemma,
            attention_bias=bias,
            attention_out_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            qk_norm=arch in ("qwen3", "gemma3"),
            sliding_window=int(sliding_window) if sliding_window else None,
            layer_types=layer_types,
            partial_rotary_factor=partial,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
            **extra,
        )

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def text_config_of(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The language-model config inside a multimodal Gemma 3 config.json (special ids from the outer one)."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        raise ModelLoadError("model_type 'gemma3' without a 'text_config' object", where=f"{where} field 'text_config'",
                             fix="use the model's own config.json")
    text = dict(text)
    text["model_type"] = "gemma3_text"
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config and key not in text:
            text[key] = config[key]
    return text


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _tidy_float(value: float) -> float:
    nearest = float(round(value))
    return nearest if abs(value - nearest) <= 1e-4 * max(1.0, abs(value)) else float(value)


@dataclass
class _Rope:
    theta: float
    scaling: dict | None
    partial_rotary_factor: float = 1.0
    local_theta: float | None = None


def _hf_rope(config: Mapping[str, Any], model_type: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any],
             where: str) -> _Rope:
    """RoPE settings from either config style (v5 ``rope_parameters``, possibly per layer type, or v4
    ``rope_theta``/``rope_scaling``); validates the rope type and fills what the scaling needs."""
    default_theta = defaults.get("rope_theta", 10000.0)
    params = config.get("rope_parameters")
    local_theta = config.get("rope_local_base_freq", defaults.get("rope_local_base_freq"))
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):  # per layer type
        local = params.get("sliding_attention") or {}
        if isinstance(local, Mapping) and local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(
                f"rope_type {local.get('rope_type')!r} on sliding-window layers is not supported",
                where=f"{where} field 'rope_parameters'", fix="use the model's own config.json")
        local_theta = local.get("rope_theta", local_theta) if isinstance(local, Mapping) else local_theta
        params = params["full_attention"]
    if isinstance(params, Mapping) and "rope_type" in params:
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", default_theta)
        scaling = {k: v for k, v in (config.get("rope_scaling") or {}).items() if k != "rope_theta"}
    partial = scaling.pop("partial_rotary_factor", None)
    partial = float(config.get("partial_rotary_factor", partial if partial is not None else 1.0))
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if rope_type == "su" or (model_type == "phi3" and rope_type == "yarn"):
        rope_type = "longrope"  # the old name (and transformers reads Phi-3's yarn configs as longrope)
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
            where=f"{where} field 'rope_scaling'",
            fix="use a checkpoint with one of the supported RoPE types",
        )
    top_original = config.get("original_max_position_embeddings")
    if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = top_original or 8192
    elif rope_type == "longrope":
        # Phi-3 keeps the pretraining length at the top level, and transformers gives it priority
        original = top_original or scaling.get("original_max_position_embeddings") or \
            defaults.get("original_max_position_embeddings") or kwargs["max_position_embeddings"]
        scaling["original_max_position_embeddings"] = int(original)
        for key in ("short_factor", "long_factor"):
            if not isinstance(scaling.get(key), (list, tuple)):
                raise ModelLoadError(f"longrope scaling needs a '{key}' list", where=f"{where} field 'rope_scaling'",
                                     fix="use the model's own config.json")
            scaling[key] = [float(v) for v in scaling[key]]
    elif rope_type == "yarn":
        scaling["original_max_position_embeddings"] = int(
            top_original or scaling.get("original_max_position_embeddings") or kwargs["max_position_embeddings"])
    if rope_type in ("linear", "dynamic", "yarn") and scaling.get("factor") is None:
        if rope_type != "yarn":
            raise ModelLoadError(f"{rope_type} RoPE scaling needs a 'factor'", where=f"{where} field 'rope_scaling'",
                                 fix="use the model's own config.json")
        scaling["factor"] = kwargs["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return _Rope(float(theta), None if rope_type == "default" else scaling, partial,
                 None if local_theta is None else float(local_theta))


def _check_rope_factors(args: "ModelArgs", where: str) -> None:
    if args.rope_type != "longrope":
        return
    half = args.rotary_dim // 2
    for key in ("short_factor", "long_factor"):
        if len(args.rope_scaling[key]) != half:
            raise ModelLoadError(f"rope_scaling '{key}' has {len(args.rope_scaling[key])} values, the rotary "
                                 f"dimension {args.rotary_dim} needs {half}", where=f"{where} field 'rope_scaling'",
                                 fix="use the model's own config.json")


def _hf_sliding_window(config: Mapping[str, Any], model_type: str, layers: int,
                       defaults: Mapping[str, Any]) -> tuple[int | None, list | None]:
    window = config.get("sliding_window", defaults.get("sliding_window"))
    if model_type in ("llama",) or not window:
        return None, None
    if model_type in ("mistral", "phi3"):
        return int(window), None
    if model_type in GEMMA_TYPES:
        pattern = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern",
                                                                  defaults.get("sliding_window_pattern", 6)))
        layer_types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        return int(window), list(layer_types)
    # Qwen2/3: the window applies only with use_sliding_window, to the layers layer_types marks
    if not config.get("use_sliding_window", False):
        return None, None
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= config.get("max_window_layers", layers) else "full_attention" for i in range(layers)
    ]
    return int(window), list(layer_types)


def _gguf_layer_types(pattern: Any, layers: int, default_period: int, where: str) -> list[str]:
    """Per-layer attention kinds from ``attention.sliding_window_pattern`` (a per-layer bool array or a
    period, as llama.cpp's set_swa_pattern: every period-th layer is global), or the family's period."""
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ModelLoadError(f"attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers",
                                 where=where, fix="re-convert the model")
        return ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
    period = int(pattern) if pattern else default_period
    return ["sliding_attention" if period and i % period < period - 1 else "full_attention" for i in range(layers)]


def _gguf_rope_scaling(get, tensors, rope_theta: float, head_dim: int, rope_dim: int, max_positions: int,
                       where: str) -> dict | None:
    from .rope import llama3_scaling_from_factors, longrope_default_attention_factor

    kind = get("rope.scaling.type", None)
    if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama 3 scaling as per-frequency divisors
        return llama3_scaling_from_factors(tensors["rope_freqs.weight"], rope_theta, head_dim, where=where)
    if "rope_factors_long.weight" in tensors:  # Phi-3 LongRoPE: the two factor sets as tensors
        original = int(get("rope.scaling.original_context_length", max_positions))
        # float32 in the file: the shortest decimal that round-trips (1.05, not 1.0499999523)
        scaling = {"rope_type": "longrope",
                   "short_factor": [float(str(v)) for v in tensors["rope_factors_short.weight"].reshape(-1)],
                   "long_factor": [float(str(v)) for v in tensors["rope_factors_long.weight"].reshape(-1)],
                   "original_max_position_embeddings": original}
        if len(scaling["long_factor"]) != rope_dim // 2 or len(scaling["short_factor"]) != rope_dim // 2:
            raise ModelLoadError(f"rope_factors tensors do not have {rope_dim // 2} values", where=where,
                                 fix="re-convert the model")
        attn = get("rope.scaling.attn_factor", None)
        default = longrope_default_attention_factor(max_positions, original)
        if attn is not None and abs(float(attn) - default) > 1e-5:
            scaling["attention_factor"] = float(attn)
        return scaling
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
                   "original_max_position_embeddings": int(get("rope.scaling.original_context_length", max_positions))}
        for ours, key in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")):
            if get(key, None) is not None:
                scaling[ours] = float(get(key))
        return scaling
    raise UnsupportedArchitectureError(
        f"rope scaling {kind!r} is not supported (supported: linear, yarn, llama3, longrope)",
        where=f"{where} key 'rope.scaling.type'",
    )
