"""One optimizer step's arithmetic: forward, chunked loss and backward under the run's precision.

``StepRunner`` runs the decoder on a micro-batch and the trained-positions-only chunked loss (summed);
``_accumulate`` takes the micro-batches of one optimizer step and divides each one's summed loss by
the trained tokens of the *whole step* before backward, so accumulation equals a bigger batch, then
clips (or measures) the gradient norm. Neither touches the optimizer, the schedule or the disk.

Objectives (``train.objectives``): with ``objective`` None the runner computes the SFT loss itself; a DPO/ORPO
objective computes per-pair losses over preference batches, and ``_accumulate`` then normalises by the pairs
of the whole step instead of its trained tokens. ``take_stats()`` hands over the objective's metrics (reward
accuracy, margin, log-probs) since the last call; ``evaluate`` leaves the validation ones in ``eval_stats``.

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
                 chunk_rows: int | None, objective=None):
        self.model = model
        self.objective = objective  # None: SFT; else train.objectives.DPO / ORPO
        self.eval_stats: dict[str, float] = {}
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
        """Summed loss over the batch's trained tokens and their count (``loss.head_loss`` under the precision);
        for a preference objective, the summed per-pair loss and the number of pairs."""
        if self.objective is not None:
            return self.objective.loss_sum(self, batch)
        batch = batch.to(self.device)
        targets = shift_targets(batch.labels, batch.position_ids)
        with self.autocast():
            hidden = self.model(batch.input_ids, position_ids=batch.position_ids)
        return head_loss(hidden, targets, self.head, compute_dtype=self.compute_dtype, chunk_rows=self.chunk_rows)

    def normaliser(self, micro: list) -> int:
        """What one step's summed loss is divided by: trained tokens (SFT) or pairs (DPO/ORPO)."""
        if self.objective is None:
            return sum(int((shift_targets(b.labels, b.position_ids) != -100).sum()) for b in micro)
        return self.objective.normaliser(micro)

    def take_stats(self) -> dict[str, float]:
        """The objective's metrics since the last call (means over pairs); {} for SFT."""
        return self.objective.take_stats() if self.objective is not None else {}

    @torch.no_grad()
    def evaluate(self, batches) -> float | None:
        """Mean loss per trained token (per pair for DPO/ORPO) over ``batches`` (eval mode, no gradients); None
        when nothing is trained. The objective's validation metrics are left in ``eval_stats``."""
        if not batches:
            return None
        self.take_stats()  # start clean: only this evaluation's pairs
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, n = self.loss_sum(batch)
            total += float(loss)
            count += n
        self.model.train(was_training)
        self.eval_stats = self.take_stats()
        return total / count if count else None


def _accumulate(runner: StepRunner, micro: list, params: list, max_grad_norm: float) -> tuple[float, float, int]:
    """Forward/backward over the micro-batches of one optimizer step; returns (loss, grad norm, trained tokens).

    Each micro-batch's summed loss is divided by the trained tokens of the *whole step*, so the
    accumulated gradient is that of the mean over every trained token (2 x 4 rows == 1 x 8 rows); with a
    preference objective, by the pairs of the whole step (the mean over pairs).
    """
    step_trained = sum(int((shift_targets(b.labels, b.position_ids) != -100).sum()) for b in micro)
    step_norm = step_trained if runner.objective is None else runner.normaliser(micro)
    loss_total = 0.0
    for batch in micro:
        loss_sum, _ = runner.loss_sum(batch)
        if step_norm:
            (loss_sum / step_norm).backward()
        loss_total = loss_total + loss_sum.detach()
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(loss_total) / max(1, step_norm), float(grad_norm), step_trained
