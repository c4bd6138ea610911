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

from .data_stream import is_filler
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
        self._head = head_weight if head_weight is not None else model.logits
        self.compute_dtype = compute_dtype
        self.device = device
        vocab = head_weight.shape[0] if head_weight is not None else 65536
        self.chunk_rows = chunk_rows or default_chunk_rows(vocab, compute_dtype.itemsize)

    # One process: the identities below. ``train.distributed.DistributedStepRunner`` overrides them to cover
    # every rank (sums over ranks, gradient sync at the step's last micro-batch, sharded gradient norms).
    loss_scale = 1.0  # DDP/FSDP2 average gradients over N ranks: N turns the average back into the sum

    @property
    def head(self):
        return self._head

    def sum_over_ranks(self, *values: float) -> tuple[float, ...]:
        return values

    def sync_gradients(self, last: bool):
        return nullcontext()

    def full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

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
        total, count = self.sum_over_ranks(total, count)
        return total / count if count else None


def _accumulate(runner: StepRunner, micro: list, params: list,
                max_grad_norm: float) -> tuple[float, float, int, int]:
    """Forward/backward over the micro-batches of one optimizer step; returns (loss, grad norm, trained tokens,
    real tokens), each of the whole step (every rank's share of it, under torch.distributed).

    Each micro-batch's summed loss is divided by the trained tokens of the *whole step*, so the
    accumulated gradient is that of the mean over every trained token (2 x 4 rows == 1 x 8 rows, and
    2 ranks x 4 rows == 1 process x 8 rows); with a preference objective, by the pairs of the whole step
    (the mean over pairs).
    """
    counted = [b for b in micro if not is_filler(b)]  # a rank's filler row (empty share) counts nothing
    local_trained = sum(int((shift_targets(b.labels, b.position_ids) != -100).sum()) for b in counted)
    local_norm = local_trained if runner.objective is None else runner.normaliser(counted)
    local_real = sum(b.num_real_tokens for b in counted)
    step_trained, step_norm = (int(v) for v in runner.sum_over_ranks(local_trained, local_norm))
    loss_total = 0.0
    for index, batch in enumerate(micro):
        with runner.sync_gradients(index == len(micro) - 1):
            loss_sum, _ = runner.loss_sum(batch)
            if step_norm:
                (loss_sum * runner.loss_scale / step_norm).backward()
        loss_total = loss_total + loss_sum.detach()
    loss_total, step_real = runner.sum_over_ranks(float(loss_total), local_real)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = runner.full_norm(torch.nn.utils.get_total_norm(grads, foreach=True))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm, foreach=True)
    return loss_total / max(1, step_norm), float(grad_norm), step_trained, int(step_real)
