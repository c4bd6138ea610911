"""Everything a training run needs before its first step, built from a ``TrainConfig``.

``setup_training(config) -> TrainingSetup``, in this order: validate the config, join the job when torchrun
started several ranks (``distributed.init_world``; ``World`` says which rank this is), then on rank 0 only take the
run folder's lock (``run_lock.RunLock``: one run per folder; a killed run's lock is taken over) and delete what a
killed run left there (``run_folder.leftovers``), check the output
folder against --resume/--overwrite (``prepare_out_dir``), pick the device and compute dtype
(``compute_dtype_for``), load and encode the data with the model's tokenizer (``load_examples``), choose what
the data and the memory decide (``defaults``; ``fit``, planned on the architecture alone, so a run that cannot
fit is refused before a weight is read), seed, build the model and its adapters (``build_model``), write
``config.yaml``, build the batch stream, the evaluation batches, the
learning-rate schedule, the optimizer (``make_optimizer``) and the step runner, and, when resuming,
load the checkpoint into the trainable parameters, the optimizer, the RNGs and the data position.
Several ranks: each gets its share of every micro-batch (``BatchStream(rank=, world_size=)``), the model goes
under DDP or FSDP2 (``distributed.step_runner``) before the optimizer is built, and only rank 0 writes.
Nothing here runs a training step.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..device import has_fast_bf16, supports_bf16
from ..errors import ConfigError
from ..fsutil import recover_interrupted_replace
from ..run_folder import CHECKPOINTS, FULL_MODEL_DIR, latest_checkpoint, leftovers, previous_run_files
from ..run_lock import RunLock
from .allocator import return_large_blocks
from .checkpoint import TrainerState, load_checkpoint
from .config import TrainConfig
from .data_stream import BatchStream, evaluation_batches, widest_row
from .defaults import resolve_epochs, resolve_max_seq_len
from .distributed import SINGLE, ShardedState, World, init_world, step_runner, strategy_for
from .fit import fit_to_memory, memory_budget
from .forecast import planner
from .loss import lm_head
from .objectives import build_objective, check_examples
from .plan import MemoryPlan, available_memory, weight_file_bytes
from .schedule import LRSchedule
from .step import StepRunner


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


def clean_leftovers(out: Path) -> list[Path]:
    """With the run lock held: put back a folder a killed run was replacing, delete its temporaries."""
    recover_interrupted_replace(out / FULL_MODEL_DIR)
    for old in (out / CHECKPOINTS).glob(".step-*.old"):
        recover_interrupted_replace(old.with_name(old.name[1:-len(".old")]))
    found = leftovers(out)
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def compute_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    """fp32 or bf16 from --precision (auto: bf16 where ``device.has_fast_bf16`` says it is fast)."""
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
    """The LM head matrix (V, H) for the fused loss (``loss.lm_head``: lm_head or the tied embedding).

    None when the model's head is not a plain matrix; the loss then calls ``model.logits`` per chunk.
    """
    head = lm_head(model)
    return head if isinstance(head, torch.Tensor) else None


def build_model(config: TrainConfig, device: torch.device, compute_dtype: torch.dtype,
                tokenizer=None) -> ModelSetup:
    """Load the base model (and its tokenizer, unless given) and make it trainable: LoRA/DoRA (over an NF4 base
    for QLoRA) or every weight."""
    from ..model.load import load_model

    full = config.method == "full"
    # Frozen weights live in the compute dtype; a full fine-tune keeps fp32 weights (the AdamW master copy).
    storage_dtype = torch.float32 if full else compute_dtype
    loaded = load_model(config.model, dtype=storage_dtype, device=device, with_tokenizer=tokenizer is None)
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    model = loaded.model
    if not full:
        from ..adapters.lora import inject_lora

        for param in model.parameters():
            param.requires_grad_(False)
        if config.method == "qlora":
            from ..adapters.lora import quantize_base_to_nf4

            quantize_base_to_nf4(model, config.lora.target_modules)
        inject_lora(model, config.lora, fast_dropout=True)  # masks from 32-bit integer draws (adapters.fused.keep_mask)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("nothing to train: no parameter requires a gradient", where="lora.target_modules",
                          fix="check that the target module names exist in this model (or use all-linear)")
    with torch.no_grad():
        for param in trainable.values():
            if param.dtype != torch.float32:
                param.data = param.data.float()
    if config.gradient_checkpointing:  # resolved by auto-fit (train.fit) before a run loads the model
        model.gradient_checkpointing = True
    model.train()
    return ModelSetup(loaded, model, trainable, head_weight_of(model))


def load_examples(config: TrainConfig, tokenizer, context: int | None = None) -> tuple[list, list, str]:
    """Training and validation examples (encoded, with loss masks) and a one-line summary; ``context`` (the
    model's) caps the examples kept when max_seq_len is unset."""
    from ..data import prepare_dataset

    data = config.data
    if not data.paths:
        raise ConfigError("no training data given", where="data.paths",
                          fix="pass --data FILE.jsonl (or set data: {paths: [...]} in the config file)")
    prepared = prepare_dataset(data, tokenizer, context=context)
    if not prepared.train:
        reasons = ", ".join(f"{n} {kind}" for kind, n in prepared.skip_counts().most_common(3)) or "no examples"
        raise ConfigError(f"no usable training example ({reasons})", where=f"data {', '.join(data.paths)}",
                          fix="run `homebake data check` on the data to see why examples were skipped")
    return prepared.train, prepared.validation, prepared.summary()


def make_optimizer(config: TrainConfig, params: dict[str, torch.nn.Parameter], device: torch.device):
    """AdamW (fused where the device has it), weight decay only on matrices."""
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


def resume_from_checkpoint(path: Path, setup: ModelSetup, optimizer, stream: BatchStream, world: World = SINGLE,
                           sharded: ShardedState | None = None) -> TrainerState:
    """Load ``path`` into the trainable parameters, the optimizer and the RNGs; move the stream to its position."""
    state = load_checkpoint(path, setup.trainable, optimizer, world=world, sharded=sharded)
    stream.epoch, stream.index = state.epoch, state.batch_in_epoch
    if world.is_main:
        print(f"homebake: resuming from {path} (step {state.step})", file=sys.stderr)
    return state


@dataclass
class TrainingSetup:
    """What the loop and the outputs need, built once by ``setup_training``."""

    config: TrainConfig
    out: Path
    device: torch.device
    compute_dtype: torch.dtype
    model: ModelSetup
    data_summary: str  # one line for the header
    stream: BatchStream  # training micro-batches, positioned after the resumed step
    eval_batches: list  # the validation set as fixed batches (empty: no validation)
    total_steps: int  # optimizer steps of the whole run (--max-steps, or --epochs worth)
    micro_budget: int | None  # micro-batches of the whole run under an epoch limit; None under --max-steps
    schedule: LRSchedule
    optimizer: torch.optim.Optimizer
    runner: StepRunner
    state: TrainerState  # fresh, or the resumed checkpoint's
    resumed_from: Path | None  # the checkpoint resumed from
    lock: RunLock | None = None  # rank 0's, held until train() ends (released by the process's death at the latest)
    world: World = field(default_factory=World)  # this process's rank in the job (world size 1: alone)
    strategy: str | None = None  # None (one process), "ddp" or "fsdp"
    sharded: ShardedState | None = None  # FSDP2: the weights and optimizer as shards (checkpoints, final model)
    chosen: list[str] = field(default_factory=list)  # settings chosen (from the data, to fit), with why: the header
    plan: MemoryPlan | None = None  # the memory plan of the settings chosen (per rank when several share the job)


def setup_training(config: TrainConfig) -> TrainingSetup:
    """Everything before the first step, holding the run folder's lock (``TrainingSetup.lock``, rank 0's); the
    caller releases it and leaves the process group (``TrainingSetup.world``) when the run ends. Any failure
    here does both."""
    config.validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path is a file", where=f"out {out}", fix="choose a folder for --out")
    world = init_world(config)
    held: list[RunLock] = []

    def claim_out_dir() -> Path | None:  # rank 0 alone: lock, clean up, check --resume/--overwrite
        held.append(RunLock(out).acquire())
        clean_leftovers(out)
        return prepare_out_dir(config)

    try:
        resume_from = world.run_on_main(claim_out_dir)
        return _setup(config, out, held[0] if held else None, world, resume_from)
    except BaseException:
        if held:
            held[0].release()
        world.close()
        raise


def _setup(config: TrainConfig, out: Path, lock: RunLock | None, world: World,
           resume_from: Path | None) -> TrainingSetup:
    device = world.device
    strategy = strategy_for(config, world)
    compute_dtype = compute_dtype_for(config, device)

    # The data and the memory plan come first, from the architecture alone: a run that cannot fit is refused
    # before its weights are read.
    from ..model.load import read_model_header

    args, tokenizer, source_path, source_kind = read_model_header(config.model)
    context = args.max_position_embeddings
    train_examples, val_examples, data_summary = load_examples(config, tokenizer, context)
    check_examples(config.objective, train_examples + val_examples, where=f"data {', '.join(config.data.paths)}")
    length = resolve_max_seq_len(config, train_examples + val_examples, context)
    chosen = [f"chosen from the data: {length}" if length else None]
    data = config.data
    widest = widest_row(train_examples + val_examples, max_seq_len=data.max_seq_len, packing=data.packing)
    file_bytes = weight_file_bytes(source_path)

    plan_for = planner(args, config, source_kind=source_kind, file_bytes=file_bytes, device_type=device.type,
                       compute_dtype=compute_dtype, widest_row=widest)

    def fit():  # rank 0 decides for every rank (their memory may differ; the batch shape must not)
        budget, budget_text = memory_budget(config.memory_limit, available_memory(device))
        reason = fit_to_memory(config, plan_for, budget, budget_text)
        return config.batch_size, config.grad_accum, config.gradient_checkpointing, reason

    config.batch_size, config.grad_accum, config.gradient_checkpointing, reason = world.run_on_main(fit)
    chosen.append(f"fitted to memory: {reason}")
    plan = plan_for(config.batch_size, config.gradient_checkpointing)

    seed_everything(config.seed)
    model = build_model(config, device, compute_dtype, tokenizer=tokenizer)
    objective = build_objective(config, model.model, compute_dtype)
    if config.gradient_checkpointing and device.type == "cpu":
        return_large_blocks()  # else glibc's heap keeps what checkpointing frees (see train/allocator.py)

    batching = dict(batch_size=config.batch_size, max_seq_len=data.max_seq_len,
                    pad_token_id=tokenizer.pad_token_id, packing=data.packing, rank=world.rank,
                    world_size=world.world_size)
    stream = BatchStream(train_examples, seed=data.seed, **batching)
    eval_batches = evaluation_batches(val_examples, limit=config.eval_batches, **batching)
    epochs = resolve_epochs(config, stream.batches_per_epoch)
    chosen.append(f"chosen from the data: {epochs}" if epochs else None)
    if world.is_main:  # after the data-derived defaults, so config.yaml (the --resume base) holds them
        out.mkdir(parents=True, exist_ok=True)
        config.save(out)
    micro_budget = math.ceil(config.epochs * stream.batches_per_epoch)
    total_steps = config.max_steps or math.ceil(micro_budget / config.grad_accum)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    schedule = LRSchedule(config.resolved_learning_rate(), total_steps, warmup, config.schedule,
                          config.min_lr_ratio)
    # DDP / FSDP2 first: FSDP2 replaces the parameters with their shards, which the optimizer must hold
    runner = step_runner(world, model, compute_dtype, config.loss_chunk_rows, strategy=strategy,
                         objective=objective)
    optimizer = make_optimizer(config, model.trainable, device)
    sharded = ShardedState(runner.model, optimizer) if strategy == "fsdp" else None
    if world.rank:  # the same start everywhere (above), then each rank its own dropout masks
        torch.manual_seed(config.seed + 7919 * world.rank)
    state = TrainerState(param_names=list(model.trainable))
    if resume_from is not None:
        state = resume_from_checkpoint(resume_from, model, optimizer, stream, world, sharded)
    return TrainingSetup(config, out, device, compute_dtype, model, data_summary, stream, eval_batches,
                         total_steps, None if config.max_steps else micro_budget, schedule, optimizer, runner,
                         state, resume_from, lock, world, strategy, sharded, [c for c in chosen if c], plan)
