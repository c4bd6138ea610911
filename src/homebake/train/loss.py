"""Cross entropy computed only at trained positions, with the LM head applied in chunks.

A causal LM step over B×T tokens with a 49k vocabulary would materialise B×T×V logits (and as many
gradients) if the head ran on every position; most positions are prompts or padding that the loss
ignores. Here the hidden states at trained positions are gathered first, then the head and the
cross entropy run over row chunks, so at most ``chunk_rows × V`` logits exist at a time.

When the head is a plain weight matrix (the usual tied/untied LM head) a fused autograd function
computes the loss *and* its gradients in the same pass (softmax − one-hot, times the weight), so the
chunk's logits are freed immediately instead of being kept for backward. Any other head (a callable,
e.g. one with logit soft-capping) runs chunk by chunk under activation checkpointing.

The functions return the **sum** of token losses and the token count: the training loop divides by
the number of trained tokens across all accumulation micro-batches, so 2 micro-batches × 4 rows equal
1 batch × 8 rows.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logits budget per chunk (rows × vocab × the matmul dtype's bytes): big enough that the head matmul is not
# bound by reading the (V, H) weight again for every chunk, small enough to stay one reused buffer.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
# The fp32 softmax runs over this many rows of a chunk at a time: 8 × V × 4 bytes (1.5 MiB at a 49k vocab)
# stays in cache, where a whole chunk's fp32 pass did not (it was most of the loss's time on a CPU).
SOFTMAX_BLOCK_ROWS = 8

Head = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def shift_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction from labels aligned with ``input_ids`` (HF convention).

    ``targets[:, t] = labels[:, t + 1]``; the last column gets IGNORE_INDEX. In packed rows, a position
    whose *next* position starts a new example (position id 0) must not predict that example's first
    token, so it is ignored too.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts_next = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(starts_next, IGNORE_INDEX)
    return targets


def gather_trained(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (N, H) and target ids (N,) at the positions whose target is not IGNORE_INDEX."""
    flat_targets = targets.reshape(-1)
    index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), flat_targets.index_select(0, index)


def default_chunk_rows(vocab_size: int, element_bytes: int = 4, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per LM-head chunk whose logits, in a dtype of ``element_bytes``, fill the budget."""
    return max(16, budget_bytes // (element_bytes * max(1, vocab_size)))


def head_loss_bytes(chunk_rows: int, vocab_size: int, element_bytes: int) -> int:
    """Peak extra memory of the fused head: the chunk's logits buffer and one block's fp32 softmax with its
    input copy and result (``target_log_probs``)."""
    return chunk_rows * vocab_size * element_bytes + 3 * SOFTMAX_BLOCK_ROWS * vocab_size * 4


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor, *, gradient: bool,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log softmax(logits)[target] per row of a chunk's ``logits`` (r, V, the matmul dtype), block by block.

    With ``gradient``, ``logits`` is overwritten in place by d(-Σ logp_i)/d logits = softmax − one-hot,
    each row multiplied by ``row_scale`` (r,) when given, ready for the matmuls back to the hidden states
    and the weight.
    """
    picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block_index = torch.arange(SOFTMAX_BLOCK_ROWS, device=logits.device)
    for start in range(0, logits.shape[0], SOFTMAX_BLOCK_ROWS):
        block = logits[start:start + SOFTMAX_BLOCK_ROWS]
        tgt = targets[start:start + SOFTMAX_BLOCK_ROWS]
        log_probs = torch.log_softmax(block, dim=-1, dtype=torch.float32)
        picked[start:start + block.shape[0]] = log_probs.gather(1, tgt.unsqueeze(1)).squeeze(1)
        if gradient:
            grad = log_probs.exp_()
            grad[block_index[:block.shape[0]], tgt] -= 1.0
            if row_scale is not None:
                grad.mul_(row_scale[start:start + block.shape[0]].unsqueeze(1))
            block.copy_(grad)
    return picked


def linear_target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, *,
                            grad_hidden: bool = False, grad_weight: bool = False,
                            row_scale: torch.Tensor | None = None):
    """log softmax(hidden_i @ weight.T)[target_i] (N,) fp32, chunk by chunk, and with ``grad_hidden`` /
    ``grad_weight`` the gradients of −Σ row_scale_i · logp_i (row_scale 1 when None) for the hidden states (their
    dtype) and the weight (fp32), else None.

    The chunk's logits live in one reused buffer of the matmul dtype (bf16 halves it against fp32 and feeds
    the gradient matmuls without a cast); only the per-block softmax is fp32 (:func:`target_log_probs`).
    """
    matmul_weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    picked = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hidden_gradient = torch.empty_like(hidden) if grad_hidden else None
    weight_gradient = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None
    buffer = hidden.new_empty(min(chunk_rows, hidden.shape[0]), weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = start + chunk_rows
        rows = hidden[start:stop]
        logits = torch.matmul(rows, matmul_weight.t(), out=buffer[:rows.shape[0]])
        picked[start:stop] = target_log_probs(logits, targets[start:stop], gradient=grad_hidden or grad_weight,
                                              row_scale=None if row_scale is None else row_scale[start:stop])
        if grad_hidden:  # ``logits`` now holds their gradient
            torch.matmul(logits, matmul_weight, out=hidden_gradient[start:stop])
        if grad_weight:
            weight_gradient += (logits.t() @ rows).float()
    return picked, hidden_gradient, weight_gradient


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients computed during forward (:func:`linear_target_log_probs`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):  # noqa: D401 - autograd signature
        log_probs, grad_hidden, grad_weight = linear_target_log_probs(
            hidden, weight, targets, chunk_rows, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return -log_probs.sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(torch.float32)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _callable_head_loss(rows: torch.Tensor, tgt: torch.Tensor, head: Callable) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), tgt, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Head,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over trained positions, and how many there were.

    ``hidden`` is (B, T, H) (or (N, H)); ``targets`` has the same leading shape, already shifted (see
    :func:`shift_targets`), IGNORE_INDEX where nothing is trained. ``head`` is the LM head weight
    (V, H) — the fused fast path — or any callable mapping (N, H) hidden states to (N, V) logits.
    """
    rows, tgt = gather_trained(hidden, targets)
    count = int(tgt.shape[0])
    if count == 0:
        # Keep the graph connected so backward works on a batch with nothing to train.
        return hidden.sum() * 0.0, 0
    if isinstance(head, torch.Tensor):
        chunk = chunk_rows or default_chunk_rows(head.shape[0], rows.element_size())
        return _LinearCrossEntropy.apply(rows, head, tgt, chunk), count
    chunk = chunk_rows or default_chunk_rows(65536)
    total = None
    for start in range(0, count, chunk):
        part_rows, part_tgt = rows[start:start + chunk], tgt[start:start + chunk]
        if torch.is_grad_enabled() and part_rows.requires_grad:
            part = checkpoint(_callable_head_loss, part_rows, part_tgt, head, use_reentrant=False)
        else:
            part = _callable_head_loss(part_rows, part_tgt, head)
        total = part if total is None else total + part
    return total, count


def lm_head(model) -> Head:
    """The LM head for the loss: the model's (V, H) ``head_weight`` matrix (the fused fast path), else
    ``model.logits`` (a head that is not a plain matrix, e.g. one with logit soft-capping)."""
    weight = getattr(model, "head_weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.ndim == 2 else model.logits


def head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: Head, *, compute_dtype: torch.dtype | None = None,
              chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """:func:`chunked_cross_entropy` under the run's precision, for training and evaluation alike.

    A matrix head stored in the compute dtype (frozen bf16 weights) gets the hidden states cast to it (only
    trained rows are used, so the cast is cheap); an fp32 master head (full fine-tune) is cast per chunk
    inside the fused loss instead. A callable head runs under autocast. ``compute_dtype`` None: the head's own.
    """
    if isinstance(head, torch.Tensor):
        if hidden.dtype != head.dtype and (compute_dtype is None or head.dtype == compute_dtype):
            hidden = hidden.to(head.dtype)
        return chunked_cross_entropy(hidden, targets, head, chunk_rows=chunk_rows)
    if compute_dtype is None or compute_dtype == torch.float32:
        return chunked_cross_entropy(hidden, targets, head, chunk_rows=chunk_rows)
    with torch.autocast(hidden.device.type, dtype=compute_dtype):
        return chunked_cross_entropy(hidden, targets, head, chunk_rows=chunk_rows)
