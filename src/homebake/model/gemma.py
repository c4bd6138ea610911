"""Gemma 2 and Gemma 3 (text): the shared decoder's loop, masks, KV cache and packing with Gemma's blocks.

What differs from the Llama-family blocks in decoder.py (HF parameter names throughout):
- RMSNorm scales by ``(1 + weight)`` and computes in float32 (weights stored as offsets from 1);
- token embeddings are multiplied by sqrt(hidden_size) (in the embedding dtype);
- four norms per block: input, post-attention, pre-feedforward and post-feedforward;
- GeGLU MLP (gelu with the tanh approximation);
- attention scores scale by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``;
- Gemma 2: tanh soft-capping of attention scores (``attn_logit_softcapping``) and of the final logits
  (``final_logit_softcapping``); layers alternate sliding-window and global attention;
- Gemma 3: per-head q/k norms, and two RoPE tables: ``rope_theta`` (+ ``rope_scaling``) on global layers,
  plain ``rope_local_base_freq`` on sliding-window layers (five local layers per global one).
The embeddings are tied to the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import AttentionPlan, attention
from .decoder import MLP, CausalLM, KVCache, project
from .rope import apply_rope, base_inv_freq, rope_cos_sin


class GemmaRMSNorm(nn.Module):
    """RMSNorm with ``(1 + weight)``, computed in float32 and cast back (as transformers' Gemma)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings multiplied by sqrt(hidden_size), rounded to the embedding dtype first."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype, device=self.weight.device)
        return super().forward(input_ids) * scale


class GemmaAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_window(layer)
        self.rope_kind = "sliding" if self.window is not None else "full"
        self.scale = float(args.query_pre_attn_scalar or args.head_dim) ** -0.5
        self.softcap = args.attn_logit_softcapping
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_out_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        if isinstance(cos, dict):  # Gemma 3: one RoPE table per attention kind
            cos, sin = cos[self.rope_kind], sin[self.rope_kind]
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
        return self.o_proj(attention(q, k, v, plan, window=self.window, scale=self.scale, softcap=self.softcap))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = GemmaAttention(args, layer)
        self.mlp = MLP(args)  # GeGLU: args.hidden_act is the tanh gelu
        self.input_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, plan, kv_cache, self.layer)
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaCausalLM(CausalLM):
    """Gemma 2 / Gemma 3 text model; same API as ``CausalLM`` (logits soft-capped when configured)."""

    layer_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm
    embedding_class = ScaledEmbedding

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self._local_inv_freq = None
        if args.rope_local_base_freq is not None:
            self._local_inv_freq = base_inv_freq(args.rope_local_base_freq, args.rotary_dim)

    @property
    def head_weight(self) -> torch.Tensor | None:
        """The LM head matrix, or None when logits are soft-capped (the loss then calls ``logits``)."""
        if self.args.final_logit_softcapping:
            return None
        return self._head_matrix()

    def _head_matrix(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self._head_matrix())
        cap = self.args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, kv_cache: KVCache | None = None):
        cos, sin = super().rope(position_ids, dtype, kv_cache)
        if self._local_inv_freq is None:
            return cos, sin
        if self._local_inv_freq.device != position_ids.device:
            self._local_inv_freq = self._local_inv_freq.to(position_ids.device)
        local_cos, local_sin = rope_cos_sin(self._local_inv_freq, position_ids, 1.0, dtype)
        return {"full": cos, "sliding": local_cos}, {"full": sin, "sliding": local_sin}
