"""One optimizer step's arithmetic: forward, chunked loss and backward under the run's precision.

``StepRunner`` runs the decoder on a micro-batch and the trained-positions-only chunked loss (summed);
``_accumulate`` takes the micro-batches of one optimizer step and divides each one's summed loss by
the trained tokens of the *whole step* before backward, so accumulation equals a bigger batch, then
clips (or measures) the gradient norm. Neither touches the optimizer, the schedule or the disk.

Precision: in bf16 the frozen weights are stored in bf16 (no per-step casts) and the forward runs
under autocast; trainable weights and AdamW state stay fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .loss import default_chunk_rows, head_loss, shift_targets


class StepRunner:
    """Forward + loss + backward for micro-batches, under the run's precision.

    ``head_weight``: the model's (V, H) head matrix for the fused loss, or None to call ``model.logits``.
    """

    def __init__(self, model, head_weight, compute_dtype: torch.dtype, device: torch.device,
                 chunk_rows: int | None):
        self.model = model
        self.head = head_weight if head_weight is not None else model.logits
        self.compute_dtype = compute_dtype
        self.device = device
        vocab = head_weight.shape[0] if head_weight is not None else 65536
        self.chunk_rows = chunk_rows or default_chunk_rows(vocab)

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def loss_sum(self, batch) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's trained tokens and their count (``loss.head_loss`` under the precision)."""
        batch = batch.to(self.device)
        targets = shift_targets(batch.labels, batch.position_ids)
        with self.autocast():
            hidden = self.model(batch.input_ids, position_ids=batch.position_ids)
        return head_loss(hidden, targets, self.head, compute_dtype=self.compute_dtype, chunk_rows=self.chunk_rows)

    @torch.no_grad()
    def evaluate(self, batches) -> float | None:
        """Mean loss per trained token over ``batches`` (eval mode, no gradients); None when nothing is trained."""
        if not batches:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, n = self.loss_sum(batch)
            total += float(loss)
            count += n
        self.model.train(was_training)
        return total / count if count else None


def _accumulate(runner: StepRunner, micro: list, params: list, max_grad_norm: float) -> tuple[float, float, int]:
    """Forward/backward over the micro-batches of one optimizer step; returns (loss, grad norm, trained tokens).

    Each micro-batch's summed loss is divided by the trained tokens of the *whole step*, so the
    accumulated gradient is that of the mean over every trained token (2 x 4 rows == 1 x 8 rows).
    """
    step_trained = sum(int((shift_targets(b.labels, b.position_ids) != -100).sum()) for b in micro)
    loss_total = 0.0
    for batch in micro:
        loss_sum, _ = runner.loss_sum(batch)
        if step_trained:
            (loss_sum / step_trained).backward()
        loss_total = loss_total + loss_sum.detach()
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(loss_total) / max(1, step_trained), float(grad_norm), step_trained
