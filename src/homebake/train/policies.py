"""The loop's decisions, each a small object that answers one question from the step and the run's state.

- ``EvalPolicy``: evaluate now? (every N steps and at the final step; step 0 for a fresh run) and did the
  validation loss improve (by more than ``early_stopping_min_delta``)? ``record`` keeps the bookkeeping
  in ``TrainerState`` (latest/best validation loss, best step, evaluations without improvement).
- ``CheckpointPolicy``: checkpoint now? (at the final step, when the validation loss improved, every
  ``save_every`` steps) and how many to keep (``keep_last`` besides the best).
- ``StopPolicy``: how many micro-batches this step takes (an epoch limit may end inside the last
  accumulation window) and stop now? -- the step limit completes the run (even when a stop was
  requested during the last step), then a stop request, early stopping and the time limit, in that order.
- ``StopRequest``: Ctrl-C / SIGTERM turned into a request the loop polls between steps; a second one aborts.

None of them touches the model, the optimizer or the disk.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

from .checkpoint import TrainerState
from .config import TrainConfig


@dataclass(frozen=True)
class EvalPolicy:
    every: int = 0  # evaluate every N optimizer steps; 0: only at the final step
    early_stopping_min_delta: float = 0.0  # a smaller decrease of the validation loss is no improvement
    at_start: bool = True  # evaluate the untrained model first (step 0); False when resuming

    @classmethod
    def from_config(cls, config: TrainConfig, *, resumed: bool = False) -> "EvalPolicy":
        return cls(config.eval_every, config.early_stopping_min_delta, at_start=not resumed)

    def due(self, step: int, *, final: bool) -> bool:
        return final or bool(self.every and step % self.every == 0)

    def is_improvement(self, val_loss: float, best: float | None) -> bool:
        return best is None or val_loss < best - self.early_stopping_min_delta

    def record(self, state: TrainerState, val_loss: float) -> bool:
        """Note ``val_loss`` at ``state.step`` in ``state``; returns whether it improved on the best so far."""
        state.val_loss = val_loss
        improved = self.is_improvement(val_loss, state.best_val_loss)
        if improved:
            state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
        else:
            state.evals_without_improvement += 1
        return improved


@dataclass(frozen=True)
class CheckpointPolicy:
    save_every: int  # a checkpoint every N optimizer steps
    keep_last: int = 2  # checkpoints kept besides the best one

    @classmethod
    def from_config(cls, config: TrainConfig) -> "CheckpointPolicy":
        return cls(config.save_every, config.keep_last)

    def due(self, step: int, *, final: bool, improved: bool) -> bool:
        return final or improved or step % self.save_every == 0


@dataclass(frozen=True)
class Stop:
    reason: str  # completed | interrupted | early_stopping | time_limit
    message: str | None = None  # what to tell the user (None: nothing more to say)


@dataclass(frozen=True)
class StopPolicy:
    total_steps: int  # optimizer steps of the whole run (the step limit, or the epochs' worth)
    micro_budget: int | None = None  # micro-batches of the whole run under an epoch limit (None: step limit)
    patience: int = 0  # early stopping after this many evaluations without improvement (0: off)
    max_minutes: float | None = None  # training wall time, across resumes

    @classmethod
    def from_config(cls, config: TrainConfig, total_steps: int, micro_budget: int | None) -> "StopPolicy":
        return cls(total_steps, micro_budget, config.early_stopping_patience, config.max_minutes)

    def is_final(self, step: int) -> bool:
        return step >= self.total_steps

    def micro_batches(self, grad_accum: int, consumed: int) -> int:
        """Micro-batches for the next step, given those ``consumed`` so far (never past an epoch limit)."""
        if self.micro_budget is None:
            return grad_accum
        return max(1, min(grad_accum, self.micro_budget - consumed))

    def check(self, state: TrainerState, requested: str | None = None) -> Stop | None:
        """After a step: the reason to stop now, or None to go on. ``requested``: a pending stop request."""
        if self.is_final(state.step):  # a stop request during the last step still completes the run
            return Stop("completed")
        if requested is not None:
            return Stop("interrupted")
        if self.patience and state.evals_without_improvement >= self.patience:
            return Stop("early_stopping",
                        f"homebake: early stopping at step {state.step}: validation loss has not improved for "
                        f"{state.evals_without_improvement} evaluations (best {state.best_val_loss:.4f} at step "
                        f"{state.best_step})")
        if self.max_minutes and state.elapsed_s >= self.max_minutes * 60:
            return Stop("time_limit", f"homebake: time limit of {self.max_minutes} min reached at step {state.step}")
        return None


class StopRequest:
    """Ctrl-C / SIGTERM: the first one finishes the current step, saves a checkpoint and exits cleanly;
    a second one aborts at once (the last checkpoint stands)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.reason: str | None = None
        self.announce = announce  # several ranks: rank 0 says it once
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        if self.announce:
            print(f"\nhomebake: {self.reason}: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to quit without saving)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
