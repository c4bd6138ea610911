"""Training objectives on the one trainer: SFT (next-token cross entropy), DPO and ORPO (preference pairs).

``--objective sft`` (default) is the loss of ``train.loss``: the sum over trained tokens, normalised by the
trained tokens of the whole optimizer step. The preference objectives work on `data.pack.PairBatch`
(chosen and rejected of each pair in the same rows, as isolated packed segments) and are normalised **per
pair**: each micro-batch returns the sum of its per-pair losses and ``_accumulate`` divides by the pairs of
the whole step, so every pair weighs the same and 2 x 4 pairs equal 1 x 8.

Both need the log-probability of each response under the model: ``sequence_logps`` sums, per sequence, the
log-prob of the target token at the trained positions only (the response tokens and their end-of-turn;
the prompt is never scored). The hidden states at those positions are gathered first and the LM head runs
over row chunks inside an autograd function that recomputes the chunk's logits in backward, so B x T x V
logits never exist (as for the SFT loss).

- ``DPO(beta, label_smoothing)``: ``-(1-e) log s(b d) - e log s(-b d)`` with
  ``d = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))`` (e = 0 is the original DPO, e > 0 the
  conservative cDPO). The reference is the same base model with its adapters disabled
  (``adapters.lora.adapters_disabled``, no second copy); a full fine-tune keeps a frozen copy of the
  starting weights (counted by the memory plan). Implicit rewards ``b (log pi - log ref)``.
- ``ORPO(lam)``: ``NLL(chosen) - lam log s(log odds(c) - log odds(r))`` with length-normalised log-probs
  (mean per response token) and ``odds(p) = p / (1 - p)``; reference-free. The NLL is the chosen response's
  mean token loss (response tokens only; TRL scores the prompt too, and averages over the batch's tokens).
  Rewards ``lam * mean log-prob``.

Metrics, as means over the step's pairs: ``reward_accuracy`` (chosen reward > rejected reward),
``reward_margin``, ``chosen_reward``/``rejected_reward``, ``chosen_logps``/``rejected_logps`` (summed
log-probs of the responses), and for ORPO ``nll_loss`` and ``log_odds_ratio``.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .loss import IGNORE_INDEX, Head, default_chunk_rows, linear_target_log_probs, shift_targets

OBJECTIVES = ("sft", "dpo", "orpo")
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- log-probs


class _LinearTokenLogProb(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T)[target_i] per row, chunk by chunk; backward recomputes each chunk's
    logits (the upstream gradient per token is only known after the whole pair loss), so at most
    ``chunk_rows x V`` logits exist at a time (``loss.linear_target_log_probs``)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):  # noqa: D401 - autograd signature
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows = chunk_rows
        return linear_target_log_probs(hidden, weight, targets, chunk_rows)[0]

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        # the gradient of Σ g_i logp_i is that of −Σ row_scale_i logp_i with row_scale = −g
        _, grad_hidden, grad_weight = linear_target_log_probs(
            hidden, weight, targets, ctx.chunk_rows, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1], row_scale=-grad_out.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _callable_token_logps(rows: torch.Tensor, tgt: torch.Tensor, head) -> torch.Tensor:
    return torch.log_softmax(head(rows).float(), dim=-1).gather(1, tgt.unsqueeze(1)).squeeze(1)


def token_logps(rows: torch.Tensor, tgt: torch.Tensor, head: Head, chunk_rows: int | None = None) -> torch.Tensor:
    """(N,) fp32 log-probs of ``tgt`` under the head applied to ``rows`` (N, H), in chunks."""
    if rows.shape[0] == 0:
        return rows.sum(dim=-1).float() * 0.0
    if isinstance(head, torch.Tensor):
        return _LinearTokenLogProb.apply(rows, head, tgt,
                                        chunk_rows or default_chunk_rows(head.shape[0], rows.element_size()))
    chunk = chunk_rows or default_chunk_rows(65536)
    parts = []
    for start in range(0, rows.shape[0], chunk):
        part_rows, part_tgt = rows[start:start + chunk], tgt[start:start + chunk]
        if torch.is_grad_enabled() and part_rows.requires_grad:
            parts.append(checkpoint(_callable_token_logps, part_rows, part_tgt, head, use_reentrant=False))
        else:
            parts.append(_callable_token_logps(part_rows, part_tgt, head))
    return torch.cat(parts)


def sequence_logps(hidden: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor, head: Head,
                   num_sequences: int, *, compute_dtype: torch.dtype | None = None,
                   chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-prob of its trained target tokens (S,) fp32, and their count (S,).

    ``hidden`` (B, T, H); ``targets`` shifted (``loss.shift_targets``), IGNORE_INDEX where untrained;
    ``sequence_ids`` (B, T) the sequence of each position (a target never crosses a segment boundary).
    Casting follows ``loss.head_loss``: hidden states go to a head stored in the compute dtype.
    """
    flat = targets.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    tgt, seq = flat.index_select(0, index), sequence_ids.reshape(-1).index_select(0, index)
    if isinstance(head, torch.Tensor):
        if rows.dtype != head.dtype and (compute_dtype is None or head.dtype == compute_dtype):
            rows = rows.to(head.dtype)
        logps = token_logps(rows, tgt, head, chunk_rows)
    elif compute_dtype is None or compute_dtype == torch.float32:
        logps = token_logps(rows, tgt, head, chunk_rows)
    else:
        with torch.autocast(hidden.device.type, dtype=compute_dtype):
            logps = token_logps(rows, tgt, head, chunk_rows)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device).index_add(0, seq, logps)
    counts = torch.bincount(seq, minlength=num_sequences)
    return sums, counts


# ---------------------------------------------------------------------------------------------- losses


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO losses and the implicit rewards (chosen, rejected), from summed response log-probs."""
    delta = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * delta) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-beta * delta) * label_smoothing
    return losses, beta * (policy_chosen - reference_chosen).detach(), beta * (policy_rejected - reference_rejected).detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    x = x.clamp(max=-1e-12)
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, lam: float):
    """Per-pair ORPO losses from mean response log-probs: ``-chosen_mean - lam * log s(log odds ratio)``;
    also the rewards (``lam * mean log-prob``) and the log odds ratio."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -chosen_mean - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean.detach(), lam * rejected_mean.detach(), log_odds.detach()


# ---------------------------------------------------------------------------------------------- objectives


class PreferenceObjective:
    """Shared by DPO and ORPO: per-pair losses over a `PairBatch`, statistics accumulated until taken."""

    name = "preference"
    preference = True
    stat_keys = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                 "rejected_logps")  # what ``_record`` sums (subclasses add their extras)

    def __init__(self):
        self._sums: dict[str, float] = defaultdict(float)
        self._pairs = 0

    def normaliser(self, batches) -> int:
        return sum(b.num_pairs for b in batches)

    def take_sums(self) -> tuple[dict[str, float], int]:
        """The summed metrics and the pair count since the last call (then reset)."""
        pairs, sums = self._pairs, self._sums
        self._sums, self._pairs = defaultdict(float), 0
        return sums, pairs

    def take_stats(self) -> dict[str, float]:
        """Means over the pairs seen since the last call (then reset); {} when none."""
        sums, pairs = self.take_sums()
        return {key: round(value / pairs, 6) for key, value in sums.items()} if pairs else {}

    @contextmanager
    def unrecorded(self):
        """Pairs scored inside are left out of the metrics (a distributed rank's filler row)."""
        sums, pairs = dict(self._sums), self._pairs
        try:
            yield
        finally:
            self._sums, self._pairs = defaultdict(float, sums), pairs

    def _record(self, chosen_reward, rejected_reward, chosen_logps, rejected_logps, **extra) -> None:
        self._pairs += int(chosen_reward.shape[0])
        margin = chosen_reward - rejected_reward
        self._sums["reward_accuracy"] += float((margin > 0).float().sum())
        self._sums["reward_margin"] += float(margin.sum())
        self._sums["chosen_reward"] += float(chosen_reward.sum())
        self._sums["rejected_reward"] += float(rejected_reward.sum())
        self._sums["chosen_logps"] += float(chosen_logps.detach().sum())
        self._sums["rejected_logps"] += float(rejected_logps.detach().sum())
        for key, value in extra.items():
            self._sums[key] += float(value.detach().sum())

    def logps(self, runner, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, token counts), each (2 P,): chosen at even, rejected at odd indices."""
        if not hasattr(batch, "sequence_ids"):
            raise ConfigError(f"--objective {self.name} needs preference pairs, got a plain batch", where="objective",
                              fix="train on prompt/chosen/rejected data, or use --objective sft")
        targets = shift_targets(batch.labels, batch.position_ids)
        with runner.autocast():
            hidden = model(batch.input_ids, position_ids=batch.position_ids)
        return sequence_logps(hidden, targets, batch.sequence_ids, runner.head, 2 * batch.num_pairs,
                              compute_dtype=runner.compute_dtype, chunk_rows=runner.chunk_rows)

    def loss_sum(self, runner, batch) -> tuple[torch.Tensor, int]:
        batch = batch.to(runner.device)
        sums, counts = self.logps(runner, runner.model, batch)
        losses = self.pair_losses(runner, batch, sums, counts)
        return losses.sum(), batch.num_pairs

    def pair_losses(self, runner, batch, sums, counts) -> torch.Tensor:
        raise NotImplementedError


class DPO(PreferenceObjective):
    name = "dpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference_model: torch.nn.Module | None = None):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing
        self.reference_model = reference_model  # full fine-tune: a frozen copy; None: the model, adapters off

    @torch.no_grad()
    def reference_logps(self, runner, batch) -> torch.Tensor:
        if self.reference_model is not None:
            sums, _ = self.logps(runner, self.reference_model, batch)
            return sums
        from ..adapters.lora import adapters_disabled

        with adapters_disabled(runner.model):
            sums, _ = self.logps(runner, runner.model, batch)
        return sums

    def pair_losses(self, runner, batch, sums, counts) -> torch.Tensor:
        reference = self.reference_logps(runner, batch)
        losses, chosen_reward, rejected_reward = dpo_losses(
            sums[0::2], sums[1::2], reference[0::2], reference[1::2], beta=self.beta,
            label_smoothing=self.label_smoothing)
        self._record(chosen_reward, rejected_reward, sums[0::2], sums[1::2])
        return losses


class ORPO(PreferenceObjective):
    name = "orpo"
    stat_keys = PreferenceObjective.stat_keys + ("nll_loss", "log_odds_ratio")

    def __init__(self, lam: float = 0.1):
        super().__init__()
        self.lam = lam

    def pair_losses(self, runner, batch, sums, counts) -> torch.Tensor:
        means = sums / counts.clamp(min=1)
        losses, chosen_reward, rejected_reward, log_odds = orpo_losses(means[0::2], means[1::2], lam=self.lam)
        self._record(chosen_reward, rejected_reward, sums[0::2], sums[1::2], nll_loss=-means[0::2],
                     log_odds_ratio=log_odds)
        return losses


def frozen_reference(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` (full-fine-tune DPO's reference), stored in ``dtype``, in eval mode."""
    reference = copy.deepcopy(model)
    reference.gradient_checkpointing = False
    reference.requires_grad_(False)
    return reference.to(dtype).eval()


def build_objective(config, model: torch.nn.Module, compute_dtype: torch.dtype):
    """The run's objective: None for SFT (``StepRunner``'s own loss), else DPO / ORPO (before resuming, so a full
    fine-tune's DPO reference is the starting model)."""
    if config.objective == "sft":
        return None
    if config.objective == "orpo":
        return ORPO(config.orpo_lambda)
    reference = None
    if config.method == "full":
        reference = frozen_reference(model, compute_dtype)
    else:
        from ..adapters.lora import lora_modules

        if not lora_modules(model):
            raise ConfigError("DPO's reference is the model with its adapters disabled, but it has no adapter",
                              where="objective", fix="use --method lora/dora/qlora, or full")
    return DPO(config.dpo_beta, config.dpo_label_smoothing, reference)


def check_examples(objective: str, examples, *, where: str) -> None:
    """Preference objectives need pairs, SFT needs no pairs: a one-line error naming the setting."""
    pairs = sum(1 for e in examples if hasattr(e, "rejected"))
    if objective in ("dpo", "orpo") and pairs < len(examples):
        raise ConfigError(f"--objective {objective} needs preference pairs, but {len(examples) - pairs:,} of "
                          f"{len(examples):,} examples are not pairs", where=where,
                          fix='use {"prompt", "chosen", "rejected"} examples (see docs/data.md), or --objective sft')
    if objective == "sft" and pairs:
        raise ConfigError(f"the data holds {pairs:,} preference pairs (chosen/rejected), which SFT cannot train",
                          where=where, fix="pass --objective dpo or --objective orpo")
