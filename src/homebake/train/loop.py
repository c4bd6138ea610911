"""The training loop, and ``train(config)``: setup, then the loop, then the outputs.

``run_loop`` takes what it needs -- the step runner, optimizer, batch stream, evaluation batches,
learning-rate schedule, trainer state, metrics log and the policies -- and per optimizer step: sets
the learning rate, takes the step's micro-batches (``StopPolicy.micro_batches``), runs forward/backward
over them (``step._accumulate``: the loss normalised by the whole step's trained tokens), stops on a
non-finite loss or gradient (``TrainingDiverged``, naming the last good checkpoint), takes the AdamW
step, writes a metrics line every ``log_every`` steps and at the last, then asks ``EvalPolicy`` whether
to evaluate, the ``Checkpointer`` whether to save, and ``StopPolicy`` whether to stop. A first Ctrl-C /
SIGTERM (``StopRequest``) stops after the current step; a second aborts at once.

``train(config) -> TrainResult`` is the one training entry point (``homebake train``, the demo):
``setup.setup_training`` -> ``outputs.print_header`` -> ``run_loop`` -> a last checkpoint if the run
stopped between two -> the best checkpoint reloaded after early stopping -> ``outputs.write_final_outputs``.

Several ranks (torchrun): every rank runs the same loop on its share of each step; counts and losses are
summed over the ranks (``step._accumulate``), the ranks agree after each step whether any was asked to stop
(and on the slowest clock, for --max-minutes), so all stop at the same step, and rank 0 alone prints, logs
metrics, plots and writes the outputs. A failed collective (a rank died) ends the rank with ``RankLost``.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..errors import HomebakeError
from ..run_folder import latest_checkpoint
from .checkpoint import Checkpointer, TrainerState
from .config import TrainConfig
from .data_stream import BatchStream
from .distributed import SINGLE, World, collective
from .metrics import MetricsLog, memory_stats, peak_memory_bytes, peak_rss_bytes, plot_losses
from .outputs import adapter_writer, print_header, write_final_outputs
from .plan import GIB
from .policies import CheckpointPolicy, EvalPolicy, StopPolicy, StopRequest
from .schedule import LRSchedule
from .setup import setup_training
from .step import StepRunner, _accumulate


class TrainingDiverged(HomebakeError):
    """The loss or the gradient became NaN/inf."""

    exit_code = 3


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    stopped: str  # completed | time_limit | early_stopping | interrupted
    last_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    tokens_per_s: float
    peak_rss_gib: float
    is_main: bool = True  # rank 0 (or the only process): the one that reports
    peak_memory_gib: float | None = None  # what the plan predicts (device memory on CUDA, else peak RSS)
    planned_gib: float | None = None  # the memory plan's total (per rank)
    bound_gib: float | None = None  # ... and its bound over a long run (CPU heap growth)


@dataclass
class LoopOutcome:
    stopped: str  # completed | time_limit | early_stopping | interrupted
    last_loss: float | None  # the last step's training loss (None: no step ran)
    tokens: int  # non-padding tokens trained on, all ranks (a resumed run counts from its resume)
    seconds: float  # time spent in those steps


def _log(message: str, bar) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _diverged(out: Path, step: int, loss: float, grad_norm: float) -> TrainingDiverged:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    good = latest_checkpoint(out)
    return TrainingDiverged(
        f"the {what} became {value} at step {step}; the last good checkpoint is "
        f"{good if good else 'none (no checkpoint was written yet)'}", where=f"out {out}",
        fix="lower --learning-rate (e.g. by 3-10x), keep --max-grad-norm on, try --precision fp32, "
            "then --resume or start again")


def _silent(message: str, bar) -> None:
    """``_log`` of the ranks other than 0: rank 0 says it once."""


class _Unlogged:
    """The metrics log of ranks other than 0 (rank 0 writes metrics.jsonl)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, record: dict) -> None:
        pass


def _evaluate(runner: StepRunner, batches, state: TrainerState, policy: EvalPolicy, metrics, bar,
              log=_log) -> bool:
    """Validation loss at ``state.step``: recorded in ``state`` and metrics.jsonl, printed; returns improved."""
    val = runner.evaluate(batches)
    if val is None:
        return False
    improved = policy.record(state, val)
    metrics.write({"step": state.step, "val_loss": val, **_val_stats(runner)})
    log(f"step {state.step}: validation loss {val:.4f}{_accuracy_note(runner)}" + (" (best)" if improved else ""), bar)
    return improved


def _val_stats(runner: StepRunner) -> dict[str, float]:
    """A preference objective's validation metrics as ``val_reward_accuracy``, ``val_reward_margin``, ..."""
    return {f"val_{key}": value for key, value in getattr(runner, "eval_stats", {}).items()}


def _accuracy_note(runner: StepRunner) -> str:
    accuracy = getattr(runner, "eval_stats", {}).get("reward_accuracy")
    return f", reward accuracy {accuracy:.1%}" if accuracy is not None else ""


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                desc="training")


def run_loop(runner: StepRunner, optimizer, stream: BatchStream, eval_batches: list, schedule: LRSchedule,
             state: TrainerState, metrics: MetricsLog, *, params: list, grad_accum: int, max_grad_norm: float,
             log_every: int, evaluation: EvalPolicy, checkpointer: Checkpointer, stop: StopPolicy, out: Path,
             progress: bool = True, world: World = SINGLE) -> LoopOutcome:
    """Optimizer steps from ``state.step`` until ``stop`` says so; ``state`` is updated in place.

    Raises ``TrainingDiverged`` on a non-finite loss or gradient (its metrics line is written first) and
    lets a second Ctrl-C's ``KeyboardInterrupt`` through; the last checkpoint stands in both cases.
    """
    log = _log if world.is_main else _silent
    if evaluation.at_start and eval_batches:  # where the curve starts: the untrained model's validation loss
        start_loss = runner.evaluate(eval_batches)
        metrics.write({"step": 0, "val_loss": start_loss, **_val_stats(runner)})
        log(f"step 0: validation loss {start_loss:.4f}{_accuracy_note(runner)} (before training)", None)
    bar = _progress_bar(progress and world.is_main, stop.total_steps, state.step)
    stopped, last_loss = "completed", None
    run_tokens, run_time = 0, 0.0
    with StopRequest(announce=world.is_main) as request:
        try:
            while not stop.is_final(state.step):
                started = time.perf_counter()
                lr = schedule.apply(optimizer, state.step)
                micro = [stream.next() for _ in range(stop.micro_batches(grad_accum, stream.consumed))]
                loss_value, grad_value, step_trained, step_real = _accumulate(runner, micro, params, max_grad_norm)
                step_stats = runner.take_stats()  # DPO/ORPO: reward accuracy, margin, log-probs ({} for SFT)
                if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                    optimizer.zero_grad(set_to_none=True)
                    metrics.write({"step": state.step + 1, "loss": loss_value, "grad_norm": grad_value, "lr": lr})
                    raise world.quiet(_diverged(out, state.step + 1, loss_value, grad_value))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                elapsed = time.perf_counter() - started
                state.step += 1
                state.tokens_seen += step_real
                state.trained_tokens += step_trained
                state.elapsed_s += elapsed
                run_tokens, run_time, last_loss = run_tokens + step_real, run_time + elapsed, loss_value
                tokens_per_s = step_real / elapsed if elapsed > 0 else 0.0
                final = stop.is_final(state.step)
                if state.step % log_every == 0 or final:
                    metrics.write({"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                                   "tokens_per_s": round(tokens_per_s, 1), "tokens": step_real,
                                   "trained_tokens": step_trained,
                                   "epoch": round(stream.consumed / stream.batches_per_epoch, 4),
                                   "elapsed_s": round(state.elapsed_s, 3), **memory_stats(runner.device),
                                   **step_stats})
                if bar is not None:
                    accuracy = {"acc": f"{step_stats['reward_accuracy']:.2f}"} if step_stats else {}
                    bar.set_postfix(loss=f"{loss_value:.4f}", **accuracy, tok_s=f"{tokens_per_s:.0f}", refresh=False)
                    bar.update(1)

                improved = False
                if eval_batches and evaluation.due(state.step, final=final):
                    improved = _evaluate(runner, eval_batches, state, evaluation, metrics, bar, log)
                    if world.is_main:
                        plot_losses(out)
                checkpointer.maybe_save(state, final=final, improved=improved)
                requested = request.reason
                if world.distributed:  # all stop at the same step: any rank's request, the slowest clock
                    anyone, state.elapsed_s = world.max(requested is not None, state.elapsed_s)
                    requested = requested or ("requested by another rank" if anyone else None)
                decision = stop.check(state, requested)
                if decision is not None:
                    if decision.message:
                        log(decision.message, bar)
                    stopped = decision.reason
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: quit now, keeping the last checkpoint
            log(f"homebake: aborted at step {state.step}; the last checkpoint is {latest_checkpoint(out)}", bar)
            raise
        finally:
            if bar is not None:
                bar.close()
    return LoopOutcome(stopped, last_loss, run_tokens, run_time)


def train(config: TrainConfig) -> TrainResult:
    setup = setup_training(config)  # takes the run folder's lock (rank 0), joins the job (several ranks)
    try:
        with collective("training") if setup.world.distributed else nullcontext():
            result = _train(config, setup)
        # Leave together: a rank tearing down gloo while a peer still has a transfer in flight can abort the
        # peer ("terminate called without an active exception", SIGABRT) after a good run.
        setup.world.barrier("leaving the job")
        setup.world.close()  # not after a failure: a dead peer can make leaving the group hang
        return result
    finally:
        if setup.lock is not None:
            setup.lock.release()


def _train(config: TrainConfig, setup) -> TrainResult:
    out, state, model, world = setup.out, setup.state, setup.model, setup.world
    log = _log if world.is_main else _silent
    if world.is_main:
        print_header(setup)
    resumed = setup.resumed_from is not None
    checkpointer = Checkpointer(out, model.trainable, setup.optimizer, setup.stream,
                                CheckpointPolicy.from_config(config), write_adapter=adapter_writer(config, model),
                                last_saved=state.step if resumed else -1, world=world, sharded=setup.sharded)
    if resumed:
        checkpointer.prune(state)  # a kill between the save and its prune left one too many
    metrics_log = MetricsLog(out, resume_step=state.step if resumed else None) if world.is_main else _Unlogged()
    with metrics_log as metrics:
        outcome = run_loop(
            setup.runner, setup.optimizer, setup.stream, setup.eval_batches, setup.schedule, state, metrics,
            params=list(model.trainable.values()), grad_accum=config.grad_accum,
            max_grad_norm=config.max_grad_norm, log_every=config.log_every,
            evaluation=EvalPolicy.from_config(config, resumed=resumed), checkpointer=checkpointer,
            stop=StopPolicy.from_config(config, setup.total_steps, setup.micro_budget), out=out,
            progress=config.progress, world=world)

    stopped = outcome.stopped
    saved = checkpointer.save_if_unsaved(state)
    if saved is not None and stopped == "interrupted":
        log(f"homebake: saved {saved}; continue with --resume", None)
    if stopped != "interrupted":
        if stopped == "early_stopping" and state.best_step is not None and state.best_step != state.step:
            checkpointer.restore(state.best_step)
            log(f"homebake: exporting the best checkpoint (step {state.best_step})", None)
        # FSDP2: every rank hands its shards to rank 0, which writes the whole model
        full_weights = setup.sharded.full_state_dict() if setup.sharded is not None else None
        if world.is_main:
            written = write_final_outputs(config, model, out, state_dict=full_weights)
            log(f"homebake: wrote {', '.join(str(p) for p in written)}", None)
        world.barrier("waiting for rank 0 to write the outputs")
    if world.is_main:
        plot_losses(out)
    return TrainResult(out, state.step, stopped, outcome.last_loss, state.val_loss, state.best_val_loss,
                       state.best_step, outcome.tokens / outcome.seconds if outcome.seconds else 0.0,
                       peak_rss_bytes() / GIB, world.is_main, peak_memory_bytes(setup.device) / GIB,
                       setup.plan.total / GIB if setup.plan is not None else None,
                       setup.plan.bound / GIB if setup.plan is not None else None)
