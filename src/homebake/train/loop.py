"""The training loop: one explicit function from a TrainConfig to checkpoints, metrics and an adapter.

Per optimizer step: set the learning rate, take ``grad_accum`` micro-batches, count their trained
tokens, and for each run the decoder, the chunked trained-positions-only loss (summed), and backward
of ``sum / trained tokens of the whole step`` — so accumulation equals a bigger batch. Then clip,
check for a non-finite loss/gradient (stop, keep the last good checkpoint), AdamW step, log, evaluate,
checkpoint, and test the stop conditions (steps/epochs, wall time, early stopping, Ctrl-C).

Precision: in bf16 the frozen weights are stored in bf16 (no per-step casts) and the forward runs
under autocast; trainable weights and AdamW state stay fp32. A full fine-tune keeps fp32 weights.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..device import has_fast_bf16, pick_device, supports_bf16
from ..errors import ConfigError, HomebakeError
from ..run_folder import checkpoint_dir, latest_checkpoint, previous_run_files
from .checkpoint import TrainerState, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainConfig
from .data_stream import BatchStream, evaluation_batches
from .loss import chunked_cross_entropy, default_chunk_rows, shift_targets
from .metrics import MetricsLog, memory_stats, peak_rss_bytes, plot_losses
from .plan import GIB, available_memory, estimate_memory
from .schedule import LRSchedule


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


# ---------------------------------------------------------------------------------------------
# Setup: output folder, model + adapters, data
# ---------------------------------------------------------------------------------------------

def prepare_out_dir(config: TrainConfig) -> Path | None:
    """Check the --out folder against --resume/--overwrite; return the checkpoint to resume from."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path is a file", where=f"out {out}", fix="choose a folder for --out")
    previous = previous_run_files(out)
    if config.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            print(f"homebake: no checkpoint in {out} yet; starting from the beginning", file=sys.stderr)
        return checkpoint
    if previous:
        if not config.overwrite:
            raise ConfigError("the output folder already holds a training run", where=f"out {out}",
                              fix="pass --resume to continue it, --overwrite to start over, or another --out")
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def compute_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.precision == "fp32":
        return torch.float32
    if config.precision == "bf16":
        if not supports_bf16(device):
            raise ConfigError(f"{device.type} does not support bf16", where="precision", fix="use --precision fp32")
        if not has_fast_bf16(device):
            print("homebake: warning: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 will be much slower "
                  "than --precision fp32", file=sys.stderr)
        return torch.bfloat16
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class ModelSetup:
    loaded: object  # homebake.model.load.LoadedModel
    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    head_weight: torch.Tensor | None


def head_weight_of(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head matrix (V, H) for the fused loss (the model's ``head_weight``: lm_head or tied embedding).

    None when the model's head is not a plain matrix; the loss then calls ``model.logits`` per chunk.
    """
    weight = getattr(model, "head_weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def build_model(config: TrainConfig, device: torch.device, compute_dtype: torch.dtype) -> ModelSetup:
    from ..model.load import load_model

    full = config.method == "full"
    # Frozen weights live in the compute dtype; a full fine-tune keeps fp32 weights (the AdamW master copy).
    storage_dtype = torch.float32 if full else compute_dtype
    loaded = load_model(config.model, dtype=storage_dtype, device=device)
    model = loaded.model
    if not full:
        from ..adapters.lora import inject_lora

        for param in model.parameters():
            param.requires_grad_(False)
        if config.method == "qlora":
            from ..adapters.lora import quantize_base_to_nf4

            quantize_base_to_nf4(model, config.lora.target_modules)
        inject_lora(model, config.lora)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("nothing to train: no parameter requires a gradient", where="lora.target_modules",
                          fix="check that the target module names exist in this model (or use all-linear)")
    with torch.no_grad():
        for param in trainable.values():
            if param.dtype != torch.float32:
                param.data = param.data.float()
    if config.gradient_checkpointing:
        model.gradient_checkpointing = True
    model.train()
    return ModelSetup(loaded, model, trainable, head_weight_of(model))


def load_examples(config: TrainConfig, tokenizer) -> tuple[list, list, str]:
    """Training and validation examples (encoded, with loss masks) and a one-line summary."""
    from ..data import prepare_dataset

    data = config.data
    if not data.paths:
        raise ConfigError("no training data given", where="data.paths",
                          fix="pass --data FILE.jsonl (or set data: {paths: [...]} in the config file)")
    prepared = prepare_dataset(data, tokenizer)
    if not prepared.train:
        reasons = ", ".join(f"{n} {kind}" for kind, n in prepared.skip_counts().most_common(3)) or "no examples"
        raise ConfigError(f"no usable training example ({reasons})", where=f"data {', '.join(data.paths)}",
                          fix="run `homebake data check` on the data to see why examples were skipped")
    return prepared.train, prepared.validation, prepared.summary()


def make_optimizer(config: TrainConfig, params: dict[str, torch.nn.Parameter], device: torch.device):
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]  # norms, biases, DoRA magnitudes
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.resolved_learning_rate(), betas=(config.adam_beta1, config.adam_beta2),
                  eps=config.adam_eps)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW([g for g in groups if g["params"]], fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW([g for g in groups if g["params"]], foreach=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# One step, one evaluation
# ---------------------------------------------------------------------------------------------

class StepRunner:
    """Forward + loss + backward for micro-batches, under the run's precision."""

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
        batch = batch.to(self.device)
        targets = shift_targets(batch.labels, batch.position_ids)
        with self.autocast():
            hidden = self.model(batch.input_ids, position_ids=batch.position_ids)
        if isinstance(self.head, torch.Tensor) and hidden.dtype != self.head.dtype \
                and self.head.dtype == self.compute_dtype:
            hidden = hidden.to(self.compute_dtype)  # only trained rows are used; the cast is cheap
        if isinstance(self.head, torch.Tensor):
            return chunked_cross_entropy(hidden, targets, self.head, chunk_rows=self.chunk_rows)
        with self.autocast():
            return chunked_cross_entropy(hidden, targets, self.head, chunk_rows=self.chunk_rows)

    @torch.no_grad()
    def evaluate(self, batches) -> float | None:
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


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def adapter_writer(config: TrainConfig, setup: ModelSetup) -> Callable[[Path], None] | None:
    """A function writing the PEFT-format adapter into a new folder (None for a full fine-tune)."""
    if config.method == "full":
        return None
    from ..adapters.lora import lora_state_dict
    from ..adapters.peft import save_peft_adapter

    base = str(config.model) if config.model else str(setup.loaded.source_path)

    def write(folder: Path) -> None:
        save_peft_adapter(folder, lora_state_dict(setup.model), config.lora, base, overwrite=True)

    return write


def write_final_outputs(config: TrainConfig, setup: ModelSetup, out: Path) -> list[Path]:
    """The adapter files (PEFT format) directly in ``out``, or the full model in ``out/model``."""
    writer = adapter_writer(config, setup)
    if writer is not None:
        staging = out / ".adapter.tmp"
        writer(staging)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)  # each file appears complete or not at all
            written.append(out / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        return written
    from ..model.save import save_hf_model

    target = out / "model"
    save_hf_model(setup.loaded, target, state_dict=setup.model.state_dict(), overwrite=True)
    return [target]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _log(message: str, bar) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


class StopRequest:
    """Ctrl-C / SIGTERM: the first one finishes the current step, saves a checkpoint and exits cleanly;
    a second one aborts at once (the last checkpoint stands)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\nhomebake: {self.reason}: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to quit without saving)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _diverged(out: Path, step: int, loss: float, grad_norm: float) -> TrainingDiverged:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    good = latest_checkpoint(out)
    return TrainingDiverged(
        f"the {what} became {value} at step {step}; the last good checkpoint is "
        f"{good if good else 'none (no checkpoint was written yet)'}", where=f"out {out}",
        fix="lower --learning-rate (e.g. by 3-10x), keep --max-grad-norm on, try --precision fp32, "
            "then --resume or start again")


def train(config: TrainConfig) -> TrainResult:
    config.validate()
    out = Path(config.out)
    resume_from = prepare_out_dir(config)
    device = pick_device(config.device)
    compute_dtype = compute_dtype_for(config, device)
    seed_everything(config.seed)

    setup = build_model(config, device, compute_dtype)
    tokenizer = setup.loaded.tokenizer
    train_examples, val_examples, data_summary = load_examples(config, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)

    data = config.data
    batching = dict(batch_size=config.batch_size, max_seq_len=data.max_seq_len,
                    pad_token_id=tokenizer.pad_token_id, packing=data.packing)
    stream = BatchStream(train_examples, seed=data.seed, **batching)
    eval_batches = evaluation_batches(val_examples, limit=config.eval_batches, **batching)
    micro_budget = math.ceil(config.epochs * stream.batches_per_epoch)  # used when max_steps is unset
    total_steps = config.max_steps or math.ceil(micro_budget / config.grad_accum)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    schedule = LRSchedule(config.resolved_learning_rate(), total_steps, warmup, config.schedule,
                          config.min_lr_ratio)
    optimizer = make_optimizer(config, setup.trainable, device)
    runner = StepRunner(setup.model, setup.head_weight, compute_dtype, device, config.loss_chunk_rows)
    state = TrainerState(param_names=list(setup.trainable))
    if resume_from is not None:
        state = load_checkpoint(resume_from, setup.trainable, optimizer)
        stream.epoch, stream.index = state.epoch, state.batch_in_epoch
        _log(f"homebake: resuming from {resume_from} (step {state.step})", None)

    _print_header(config, setup, device, compute_dtype, data_summary, stream, total_steps, runner, len(eval_batches))
    adapter = adapter_writer(config, setup)
    last_saved = state.step if resume_from is not None else -1

    def checkpoint_now() -> Path:
        nonlocal last_saved
        state.epoch, state.batch_in_epoch = stream.epoch, stream.index
        extra = (lambda folder: adapter(folder / "adapter")) if adapter is not None else None
        path = save_checkpoint(out, state, setup.trainable, optimizer, extra_files=extra)
        prune_checkpoints(out, config.keep_last, state.best_step)
        last_saved = state.step
        return path

    metrics = MetricsLog(out, resume_step=state.step if resume_from is not None else None)
    if resume_from is None and eval_batches:  # where the curve starts: the untrained model's validation loss
        start_loss = runner.evaluate(eval_batches)
        metrics.write({"step": 0, "val_loss": start_loss})
        _log(f"step 0: validation loss {start_loss:.4f} (before training)", None)
    bar = _progress_bar(config, total_steps, state.step)
    stopped, last_loss = "completed", None
    run_tokens, run_time = 0, 0.0
    params = list(setup.trainable.values())
    with StopRequest() as stop_request:
        try:
            while state.step < total_steps:
                started = time.perf_counter()
                lr = schedule.apply(optimizer, state.step)
                take = config.grad_accum
                if not config.max_steps:  # an epoch limit may end inside the last accumulation window
                    take = max(1, min(take, micro_budget - stream.consumed))
                micro = [stream.next() for _ in range(take)]
                loss_value, grad_value, step_trained = _accumulate(runner, micro, params, config.max_grad_norm)
                if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                    optimizer.zero_grad(set_to_none=True)
                    metrics.write({"step": state.step + 1, "loss": loss_value, "grad_norm": grad_value, "lr": lr})
                    raise _diverged(out, state.step + 1, loss_value, grad_value)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                elapsed = time.perf_counter() - started
                step_real = sum(b.num_real_tokens for b in micro)
                state.step += 1
                state.tokens_seen += step_real
                state.trained_tokens += step_trained
                state.elapsed_s += elapsed
                run_tokens, run_time, last_loss = run_tokens + step_real, run_time + elapsed, loss_value
                tokens_per_s = step_real / elapsed if elapsed > 0 else 0.0
                if state.step % config.log_every == 0 or state.step == total_steps:
                    metrics.write({"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                                   "tokens_per_s": round(tokens_per_s, 1), "tokens": step_real,
                                   "trained_tokens": step_trained,
                                   "epoch": round(stream.consumed / stream.batches_per_epoch, 4),
                                   "elapsed_s": round(state.elapsed_s, 3), **memory_stats(device)})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
                    bar.update(1)

                final = state.step >= total_steps
                improved = False
                if eval_batches and ((config.eval_every and state.step % config.eval_every == 0) or final):
                    improved = _evaluate(runner, eval_batches, state, config, metrics, bar)
                    plot_losses(out)
                if final or improved or state.step % config.save_every == 0:
                    checkpoint_now()
                if final:  # a stop request during the last step still completes the run
                    break
                stopped = _stop_reason(config, state, stop_request, bar) or stopped
                if stopped != "completed":
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: quit now, keeping the last checkpoint
            _log(f"homebake: aborted at step {state.step}; the last checkpoint is {latest_checkpoint(out)}", bar)
            raise
        finally:
            if bar is not None:
                bar.close()
            metrics.close()

    if last_saved != state.step:
        path = checkpoint_now()
        if stopped == "interrupted":
            _log(f"homebake: saved {path}; continue with --resume", None)
    if stopped != "interrupted":
        if stopped == "early_stopping" and state.best_step is not None and state.best_step != state.step:
            best = checkpoint_dir(out, state.best_step)
            load_checkpoint(best, setup.trainable, optimizer, restore_random=False)
            _log(f"homebake: exporting the best checkpoint (step {state.best_step})", None)
        written = write_final_outputs(config, setup, out)
        _log(f"homebake: wrote {', '.join(str(p) for p in written)}", None)
    plot_losses(out)
    return TrainResult(out, state.step, stopped, last_loss, state.val_loss, state.best_val_loss, state.best_step,
                       run_tokens / run_time if run_time else 0.0, peak_rss_bytes() / GIB)


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


def _stop_reason(config: TrainConfig, state: TrainerState, stop_request: StopRequest, bar) -> str | None:
    if stop_request.reason is not None:
        return "interrupted"
    if config.early_stopping_patience and state.evals_without_improvement >= config.early_stopping_patience:
        _log(f"homebake: early stopping at step {state.step}: validation loss has not improved for "
             f"{state.evals_without_improvement} evaluations (best {state.best_val_loss:.4f} at step "
             f"{state.best_step})", bar)
        return "early_stopping"
    if config.max_minutes and state.elapsed_s >= config.max_minutes * 60:
        _log(f"homebake: time limit of {config.max_minutes} min reached at step {state.step}", bar)
        return "time_limit"
    return None


def _evaluate(runner: StepRunner, batches, state: TrainerState, config: TrainConfig, metrics, bar) -> bool:
    val = runner.evaluate(batches)
    if val is None:
        return False
    state.val_loss = val
    improved = state.best_val_loss is None or val < state.best_val_loss - config.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val, state.step, 0
    else:
        state.evals_without_improvement += 1
    metrics.write({"step": state.step, "val_loss": val})
    _log(f"step {state.step}: validation loss {val:.4f}" + (" (best)" if improved else ""), bar)
    return improved


def _progress_bar(config: TrainConfig, total: int, initial: int):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                desc="training")


def _print_header(config, setup: ModelSetup, device, dtype, data_summary, stream, total_steps, runner,
                  n_eval_batches) -> None:
    try:
        from ..adapters import describe_parameters

        print(describe_parameters(setup.model), file=sys.stderr)
    except ImportError:
        n_train = sum(p.numel() for p in setup.trainable.values())
        n_total = sum(p.numel() for p in setup.model.parameters())
        print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / max(1, n_total):.3f}%)",
              file=sys.stderr)
    args = setup.loaded.args
    plan = estimate_memory(
        setup.model, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_hidden_layers, vocab_size=args.vocab_size,
        tokens_per_micro_batch=config.batch_size * config.data.max_seq_len,
        activation_bytes=torch.finfo(dtype).bits // 8, gradient_checkpointing=config.gradient_checkpointing,
        adapter_dropout=config.method != "full" and config.lora.dropout > 0, head_chunk_rows=runner.chunk_rows)
    free = available_memory(device)
    print(plan.describe() + (f"; {free / GIB:.1f} GiB available" if free else ""), file=sys.stderr)
    if free and plan.total > free:
        print("homebake: warning: this run may not fit; lower --batch-size or --max-seq-len, or add "
              "--gradient-checkpointing", file=sys.stderr)
    print(f"{config.method} on {device.type} in {str(dtype).replace('torch.', '')}; {data_summary}; "
          f"{stream.batches_per_epoch} batches/epoch of {config.batch_size} rows; {total_steps} steps; "
          f"{n_eval_batches} validation batches", file=sys.stderr)
