"""Causal attention whose cost follows the examples, not the packed row.

A packed row holds several examples, each attending only to itself (block-diagonal causal attention). A
dense masked kernel would still compute the whole T x T score matrix (~T / example length times the
necessary work, and a B x H x T x T mask held in memory). Here a packed batch is cut at its example
boundaries once per forward (``AttentionPlan``): the examples are grouped into length buckets, each bucket
gathered into a dense (examples, heads, length, head_dim) block padded at the end, attended with a plain
causal (or sliding-window) mask, and the outputs gathered back in token order. Right padding needs no mask:
a causal query never sees keys after it, and padded queries' outputs are dropped (their gradients are zero).
Cost and memory are then proportional to the sum of squared example lengths.

The kernel is chosen per block: bf16/fp16 on a CPU runs batched matmuls + an additive mask + softmax
(grouped-query heads folded into the matmul rows, so keys/values are never repeated), which is several times
faster than the CPU flash kernel's reduced-precision backward; fp32 and other devices use
``scaled_dot_product_attention`` with ``is_causal`` (flash / memory-efficient kernels on CUDA). Generation
with a KV cache or left padding (``key_mask``) uses one dense boolean mask, as before.

``attention(q, k, v, plan, window=...)`` is the entry point every decoder family calls with its own
projections; ``AttentionPlan`` is built once per forward and shared by the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# bf16/fp16 CPU blocks use the matmul kernel while the score tensor of one block batch stays below this size
# (its probabilities are kept for backward); longer blocks use the flash kernel, whose memory is O(length).
MATMUL_SCORES_BYTES = 256 * 2**20
# A length bucket may cost up to this factor of the work its examples need (padding to the longest one).
BUCKET_SLACK = 1.25
BUCKET_ALIGN = 8


@dataclass
class Bucket:
    """Examples of similar length, attended as ``count`` blocks of ``length`` tokens (padded at the end)."""

    length: int
    count: int
    tokens: torch.Tensor  # (count, length) flat token positions; padding repeats the example's last token
    valid: torch.Tensor  # (count, length) bool, False at padding


class _RowGather(torch.autograd.Function):
    """rows = x.index_select(0, index) whose backward is another gather (``grad_index``), not a scatter-add.

    Exact when every row of x that receives gradient is gathered once; rows that were gathered more than
    once (padding copies) get zero gradient through their copies. ``zero_row``: ``grad_index`` may point
    one past the end, at a zero row (slots that carry no gradient).
    """

    @staticmethod
    def forward(ctx, x, index, grad_index, zero_row: bool):
        ctx.save_for_backward(grad_index)
        ctx.zero_row = zero_row
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (grad_index,) = ctx.saved_tensors
        if ctx.zero_row:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad.index_select(0, grad_index), None, None, None


@dataclass
class AttentionPlan:
    """How one forward's attention runs, shared by all layers: segments, masks, positions."""

    batch: int
    length: int
    start: int = 0
    key_mask: torch.Tensor | None = None
    buckets: list[Bucket] | None = None  # packed rows cut at example boundaries
    position_ids: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, position_ids: torch.Tensor | None, batch: int, length: int, *, start: int = 0,
              key_mask: torch.Tensor | None = None, packed: bool | None = None) -> "AttentionPlan":
        """The plan for queries ``start .. start + length - 1``; ``packed`` (default: detected from
        ``position_ids`` restarting at 0 inside a row, without a cache) cuts rows into examples."""
        if packed is None:
            packed = (position_ids is not None and start == 0 and length > 1
                      and bool((position_ids[:, 1:] == 0).any()))
        plan = cls(batch, length, start, key_mask, position_ids=position_ids)
        if packed and key_mask is None and start == 0:
            plan.buckets = _bucket_segments(position_ids)
        return plan

    def gather_index(self, heads: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices between token-major rows (B*T*heads, D) and the buckets' block rows (count, heads, L, D).

        Returns (block_from_token, block_from_token_or_zero, token_from_block): the first gathers blocks
        (padding repeats a real token), the second is the same with padding pointing at a zero row (one past
        the end), the third gathers tokens back from the concatenated blocks (each token's real slot).
        """
        key = ("gather", heads, str(device))
        if key not in self._masks:
            heads_range = torch.arange(heads)
            blocks, blocks_or_zero = [], []
            token_rows = torch.empty(self.batch * self.length * heads, dtype=torch.long)
            offset = 0
            for bucket in self.buckets:
                rows = bucket.tokens[:, None, :] * heads + heads_range[None, :, None]  # (count, heads, L)
                blocks.append(rows.flatten())
                valid = bucket.valid[:, None, :].expand_as(rows)
                blocks_or_zero.append(torch.where(valid, rows, self.batch * self.length * heads).flatten())
                positions = offset + torch.arange(rows.numel()).view_as(rows)
                token_rows[rows[valid]] = positions[valid]
                offset += rows.numel()
            self._masks[key] = tuple(torch.cat(t).to(device) for t in (blocks, blocks_or_zero)) + (
                token_rows.to(device),)
        return self._masks[key]

    def dense_mask(self, window: int | None, device) -> torch.Tensor | None:
        """The boolean (B|1, 1, T, start+T) mask of the general path (True = may attend), cached per window."""
        key = ("dense", window)
        if key not in self._masks:
            self._masks[key] = attention_mask(self.position_ids, self.start, self.length, window,
                                              self.buckets is not None, device, self.key_mask)
        return self._masks[key]

    def block_mask(self, length: int, window: int | None, dtype: torch.dtype, device, repeat: int = 1,
                   additive: bool = True) -> torch.Tensor:
        """Causal (+ window) mask of one block: additive (0 / -inf, rows tiled ``repeat`` times) or boolean."""
        key = ("block", length, window, dtype, str(device), repeat, additive)
        if key not in self._masks:
            q_idx = torch.arange(length, device=device)[:, None]
            k_idx = torch.arange(length, device=device)[None, :]
            allowed = k_idx <= q_idx
            if window is not None:
                allowed = allowed & (q_idx - k_idx < window)
            if additive:
                mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
                self._masks[key] = mask.repeat(repeat, 1) if repeat > 1 else mask
            else:
                self._masks[key] = allowed
        return self._masks[key]


def _bucket_segments(position_ids: torch.Tensor) -> list[Bucket]:
    """Cut rows where position ids restart at 0 and group the examples into length buckets."""
    batch, length = position_ids.shape
    starts = (position_ids == 0).cpu()
    starts[:, 0] = True
    segments = []  # (flat start, length)
    for row, cols in enumerate(_row_starts(starts)):
        bounds = cols + [length]
        segments += [(row * length + a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    segments.sort(key=lambda s: -s[1])
    groups: list[list[tuple[int, int]]] = []
    need = 0
    for segment in segments:
        if groups:
            longest = _aligned(groups[-1][0][1])
            if longest ** 2 * (len(groups[-1]) + 1) <= BUCKET_SLACK * (need + segment[1] ** 2) + 64 ** 2:
                groups[-1].append(segment)
                need += segment[1] ** 2
                continue
        groups.append([segment])
        need = segment[1] ** 2
    buckets = []
    for group in groups:
        block = _aligned(group[0][1])
        steps = torch.arange(block)
        first = torch.tensor([f for f, _ in group])[:, None]
        count = torch.tensor([n for _, n in group])[:, None]
        tokens = first + torch.minimum(steps[None, :], count - 1)
        buckets.append(Bucket(block, len(group), tokens, steps[None, :] < count))
    return buckets


def _row_starts(starts: torch.Tensor) -> list[list[int]]:
    rows, cols = starts.nonzero(as_tuple=True)
    per_row: list[list[int]] = [[] for _ in range(starts.shape[0])]
    for r, c in zip(rows.tolist(), cols.tolist()):
        per_row[r].append(c)
    return per_row


def _aligned(n: int) -> int:
    return -(-n // BUCKET_ALIGN) * BUCKET_ALIGN


def attention_mask(
    position_ids: torch.Tensor | None, start: int, length: int, window: int | None, packed: bool, device,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, start+T), True = may attend; None when plain causal attention suffices.

    Queries are tokens start..start+T-1, keys 0..start+T-1. Packed rows restrict attention to the
    query's own example (a new example starts wherever position_ids is 0). ``key_mask`` (B, start+T),
    False at padding, hides left-padded keys in batched generation; a padding query sees only itself,
    so its (unused) output stays finite.
    """
    if start == 0 and window is None and not packed and key_mask is None:
        return None
    q_idx = torch.arange(start, start + length, device=device)[:, None]
    k_idx = torch.arange(start + length, device=device)[None, :]
    mask = k_idx <= q_idx
    if window is not None:
        mask = mask & (q_idx - k_idx < window)
    mask = mask[None, None]
    if packed:
        segment = torch.cumsum((position_ids == 0).int(), dim=1)  # (B, T); only used without a cache
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :]) | (q_idx == k_idx)[None, None]
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
              window: int | None = None, scale: float | None = None, softcap: float | None = None,
              kernel: str = "auto") -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, KV, S, D), S = plan.start + T; returns (B, T, H * D).

    Packed rows attend within their examples only, ``window`` limits how far back a query looks (sliding
    window), grouped-query heads (H a multiple of KV) share keys/values, ``scale`` defaults to D^-1/2.
    ``softcap`` applies tanh soft-capping to the scores (Gemma 2: ``softcap * tanh(scores / softcap)``, softmax in
    float32), which only the matmul kernel does. ``kernel`` ("auto", "matmul" or "sdpa") picks the block kernel;
    "auto" chooses per dtype, device and length.
    """
    batch, heads, length, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    if plan.start == 0 and plan.key_mask is None:
        if plan.buckets is None:  # each row is one causal block
            out = causal_blocks(q, k, v, plan, window, scale, kernel, softcap)
            return out.transpose(1, 2).reshape(batch, length, heads * dim)
        return _packed(q, k, v, plan, window, scale, kernel, softcap)
    if length == 1 and window is None and plan.key_mask is None:
        mask = None  # one new token with a cache sees every key
    else:
        mask = plan.dense_mask(window, q.device)
    if softcap is not None:
        out = _explicit_attention(q, k, v, scale, softcap, allowed=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != k.shape[1])
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def _packed(q, k, v, plan: AttentionPlan, window, scale, kernel, softcap) -> torch.Tensor:
    batch, heads, length, dim = q.shape
    gathered = []
    for t in (q, k, v):  # (B, h, T, D) -> token-major rows (B*T*h, D) -> every bucket's blocks, one gather
        rows = t.transpose(1, 2).reshape(batch * length * t.shape[1], dim)
        block_from_token, _, token_from_block = plan.gather_index(t.shape[1], t.device)
        gathered.append(_RowGather.apply(rows, block_from_token, token_from_block, False))
    q_rows, k_rows, v_rows = gathered
    kv_heads = k.shape[1]
    outputs, q_at, kv_at = [], 0, 0
    for bucket in plan.buckets:  # each bucket's blocks are consecutive rows of the gathered tensors
        q_size, kv_size = (bucket.count * h * bucket.length for h in (heads, kv_heads))
        shape = (bucket.count, -1, bucket.length, dim)
        out = causal_blocks(q_rows[q_at:q_at + q_size].view(shape), k_rows[kv_at:kv_at + kv_size].view(shape),
                            v_rows[kv_at:kv_at + kv_size].view(shape), plan, window, scale, kernel, softcap)
        outputs.append(out.reshape(-1, dim))
        q_at, kv_at = q_at + q_size, kv_at + kv_size
    merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    _, block_from_token_or_zero, token_from_block = plan.gather_index(heads, q.device)
    out = _RowGather.apply(merged, token_from_block, block_from_token_or_zero, True)
    return out.view(batch, length, heads * dim)


def causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, window: int | None,
                  scale: float, kernel: str = "auto", softcap: float | None = None) -> torch.Tensor:
    """Causal (+ window) attention within each of n blocks: q (n, H, L, D), k/v (n, KV, L, D) -> (n, H, L, D)."""
    n, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    if kernel not in ("auto", "matmul", "sdpa"):
        raise ValueError(f"unknown attention kernel {kernel!r} (auto, matmul or sdpa)")
    if softcap is not None or kernel == "matmul" or (kernel == "auto" and _use_matmul(q, heads, length)):
        mask = plan.block_mask(length, window, q.dtype, q.device, repeat=heads // kv_heads)
        return _explicit_attention(q, k, v, scale, softcap, additive=mask)
    gqa = heads != kv_heads
    if window is None or window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = plan.block_mask(length, window, q.dtype, q.device, additive=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _explicit_attention(q, k, v, scale: float, softcap: float | None, *, additive: torch.Tensor | None = None,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v as batched matmuls, grouped-query heads folded into rows.

    ``additive``: (group * L, S) 0/-inf mask; ``allowed``: boolean (B|1, 1, L, S) mask; neither: no mask.
    """
    n, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q3 = q.reshape(n * kv_heads, group * length, dim)
    k3 = k.reshape(n * kv_heads, keys, dim)
    v3 = v.reshape(n * kv_heads, keys, dim)
    if softcap is None and additive is not None:
        scores = torch.baddbmm(additive, q3, k3.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(q3, k3.transpose(1, 2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if additive is not None:
            scores = scores + additive
        elif allowed is not None:
            hidden = ~allowed[:, :, None].expand(n, 1, 1, length, keys).expand(n, kv_heads, group, length, keys)
            scores = scores.masked_fill(hidden.reshape(n * kv_heads, group * length, keys), float("-inf"))
    if softcap is not None and scores.dtype != torch.float32:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v3).view(n, heads, length, dim)


def _use_matmul(q: torch.Tensor, heads: int, length: int) -> bool:
    """bf16/fp16 on a CPU: batched matmuls + softmax beat the flash kernel's backward, while scores stay small."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return q.shape[0] * heads * length * length * q.element_size() <= MATMUL_SCORES_BYTES


__all__ = ["AttentionPlan", "Bucket", "attention", "attention_mask", "causal_blocks"]
