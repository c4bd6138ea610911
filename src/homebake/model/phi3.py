"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the shared Llama-family decoder with fused projections.

The blocks are Llama's (pre-norm RMSNorm, SwiGLU, RoPE, GQA) except that Q, K and V come from one fused
``self_attn.qkv_proj`` (rows: Q heads, then K, then V) and gate and up from one ``mlp.gate_up_proj``
(rows: gate, then up) — HF's names, so LoRA targets ``qkv_proj`` / ``gate_up_proj`` as PEFT does and
the state dict loads as is. RoPE may be partial (``partial_rotary_factor``, Phi-4-mini 0.75) and LongRoPE
(short/long factors) — both handled by the shared RoPE factory and decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import gated_activation
from .args import ModelArgs
from .attention import AttentionPlan, attention
from .decoder import CausalLM, DecoderLayer, KVCache
from .rope import apply_rope


class Phi3Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_window(layer)
        rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, rows, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_out_bias)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_rows, kv_rows, kv_rows), dim=-1)
        q = apply_rope(q.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.store(layer, k, v)
        return self.o_proj(attention(q, k, v, plan, window=self.window))


class Phi3MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(gated_activation(gate, up))


class Phi3DecoderLayer(DecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP


class Phi3CausalLM(CausalLM):
    """Phi-3 family model; same API as ``CausalLM``."""

    layer_class = Phi3DecoderLayer

