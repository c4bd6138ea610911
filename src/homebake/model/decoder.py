"""One compact Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) with explicit flags.

Parameter names are exactly Hugging Face's, so a safetensors checkpoint loads by name. The LM head is
applied separately (``logits``) so training can compute it only at trained positions.

Packing: when ``position_ids`` restarts at 0 inside a row, each restart begins a new example and
attention is block-diagonal causal, so no example sees another (``model/attention.py``: the rows are cut at
example boundaries, so attention costs what the examples need, not T^2).

Other families reuse the pieces: ``RMSNorm``, ``MLP``, ``KVCache``, ``AttentionPlan.build`` once per forward
and ``attention(q, k, v, plan, window=..., scale=...)`` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activation import gated_activation
from .args import ModelArgs
from .attention import AttentionPlan, attention, attention_mask  # noqa: F401 (attention_mask: re-exported)
from .norm import rms_norm
from .rope import apply_rope, length_dependent, rope_cos_sin, rope_inv_freq


def project(x: torch.Tensor, modules) -> list[torch.Tensor]:
    """Each projection module applied to the same input ``x``. A module class that computes several projections
    of one input together provides ``project_shared(x, modules)`` (the adapters' LoRA wrapper: one dropout mask
    and one adapter matmul for a layer's q/k/v); the decoder stays unaware of what is wrapped."""
    for module in modules:
        shared = getattr(type(module), "project_shared", None)
        if shared is not None:
            return shared(x, modules)
    return [module(x) for module in modules]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one autograd function; reduced-precision inputs are normalised in float32 internally (model/norm.py)
        return rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Per-layer key/value buffers (B, kv_heads, max_len, head_dim); ``length`` tokens are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k/v after the filled part; return everything up to and including them."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (in that order): finished rows leave a batched generation."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def copy_prefix(self, other: "KVCache") -> None:
        """Fill every row with ``other``'s filled part (one row: a prompt prefix all rows share)."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:, :, :other.length] = theirs[:, :, :other.length]
        self.length = other.length


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_window(layer)
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_out_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.store(layer, k, v)
        return self.o_proj(attention(q, k, v, plan, window=self.window))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.activation = args.hidden_act
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(gated_activation(gate, up, self.activation))


class DecoderLayer(nn.Module):
    attention_class = Attention  # Phi-3 swaps in its fused-projection classes (model/phi3.py)
    mlp_class = MLP

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = self.attention_class(args, layer)
        self.mlp = self.mlp_class(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, plan, kv_cache, self.layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """The ``model.`` prefix of HF's *ForCausalLM: embeddings, layers, final norm. Families with other
    blocks (model/gemma.py, model/phi3.py) pass their own layer, norm and embedding classes."""

    def __init__(self, args: ModelArgs, layer_class=None, norm_class=None, embedding_class=None):
        super().__init__()
        layer_class, norm_class = layer_class or DecoderLayer, norm_class or RMSNorm
        self.embed_tokens = (embedding_class or nn.Embedding)(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layer_class(args, i) for i in range(args.num_hidden_layers))
        self.norm = norm_class(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head with HF parameter names; ``forward`` returns final-norm hidden states."""

    # what a family file overrides (model/gemma.py, model/phi3.py); None = this file's Llama-family pieces
    layer_class = None
    norm_class = None
    embedding_class = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args, self.layer_class, self.norm_class, self.embedding_class)
        # Tied models have no lm_head parameter (HF omits it from the state dict); logits use embed_tokens.
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # RoPE frequencies stay float32 and outside the state dict, so model.to(bfloat16) cannot round them.
        self._inv_freq, self._rope_scaling = rope_inv_freq(args)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, kv_cache: KVCache | None = None):
        """cos/sin for ``position_ids``. Length-dependent RoPE (longrope, dynamic) picks its table by the
        longest position of the call, or by the KV cache's capacity while generating (so cached keys and
        new queries always share one table)."""
        device = position_ids.device
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        inv_freq, scaling = self._inv_freq, self._rope_scaling
        threshold = length_dependent(self.args)
        if threshold is not None:
            length = kv_cache.max_len if kv_cache is not None else int(position_ids.max()) + 1
            if length > threshold:
                inv_freq, scaling = rope_inv_freq(self.args, seq_len=length)
                inv_freq = inv_freq.to(device)
        return rope_cos_sin(inv_freq, position_ids, scaling, dtype)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        shape = (batch_size, self.args.num_key_value_heads, max_len, self.args.head_dim)
        layers = self.args.num_hidden_layers
        return KVCache(
            keys=[torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)],
        )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length = input_ids.shape
        device = input_ids.device
        start = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and start + length > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} tokens; {start} + {length} do not fit")
        packed = False
        if position_ids is None:
            position_ids = torch.arange(start, start + length, device=device).expand(batch, length)
        elif kv_cache is None and length > 1:
            packed = bool((position_ids[:, 1:] == 0).any())

        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype, kv_cache)
        plan = AttentionPlan.build(position_ids, batch, length, start=start, key_mask=key_mask, packed=packed)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_checkpoint and kv_cache is None:
                h = checkpoint(layer, h, cos, sin, plan, use_reentrant=False)
            else:
                h = layer(h, cos, sin, plan, kv_cache)
        if kv_cache is not None:
            kv_cache.length = start + length
        return self.model.norm(h)
