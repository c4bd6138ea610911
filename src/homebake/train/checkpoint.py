"""Training checkpoints: written atomically, the last K and the best kept, exactly resumable.

Layout of ``<out>/checkpoints/step-00000120/``:

- ``trainable.safetensors``: the trainable parameters under their model names (fp32 master copies);
- ``optimizer.pt``: ``optimizer.state_dict()`` (tensors and numbers only, loaded with ``weights_only=True``);
- ``rng.safetensors`` + the ``rng`` entry of ``trainer_state.json``: torch (CPU and each CUDA device),
  Python ``random`` and NumPy generator states, so dropout after resume draws what it would have drawn;
- ``trainer_state.json``: step, data position (epoch, micro-batch index), token count, validation and
  early-stopping bookkeeping, and the ordered names of the optimised parameters (checked on resume).

Each directory appears only once complete (``fsutil.atomic_dir``), so a crash at any moment leaves
the previous checkpoints intact and never a half-written one that resume could pick up.

Several ranks (``train.distributed``): rank 0 creates the temporary folder and writes everything, with every
rank's RNG states (gathered; rank r's tensors under ``rankR.`` in ``rng.safetensors``, its plain states in
``trainer_state.json``'s ``rank_rng``); under FSDP2 the weights and optimizer state are instead ``sharded/``
in torch.distributed.checkpoint format, each rank writing its own shards. The folder is renamed into place
once every rank has written, and every rank waits for that before training on.

``Checkpointer`` is the run's one owner of its checkpoints: it decides with a ``CheckpointPolicy``
when to save, writes the trainable weights, optimizer, RNGs and data position (plus the PEFT-format
``adapter/`` copy), prunes to the last K and the best, remembers the step it last saved, and loads
a checkpoint back (the best one, for early stopping's export).
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, ExportError, WriteError
from ..fsutil import atomic_dir, describe_os_error
from ..run_folder import CHECKPOINT_STATE as STATE_FILE
from ..run_folder import checkpoint_dir, latest_checkpoint, list_checkpoints
from .distributed import SHARDED_DIR, SINGLE

__all__ = ["Checkpointer", "TrainerState", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints",
           "save_checkpoint"]

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue where this one stopped."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0  # non-padding input tokens processed
    trained_tokens: int = 0  # tokens that contributed to the loss
    elapsed_s: float = 0.0  # training wall time so far, across resumes
    val_loss: float | None = None  # latest validation loss
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    param_names: list[str] = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    world_size: int = 1  # ranks that trained it (each has its RNG states and data share)
    rank_rng: list = field(default_factory=list)  # plain RNG states of ranks 1..N-1

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states as (tensors for safetensors, JSON-able dict)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if "python" in plain:
        version, state, gauss = plain["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in plain:
        kind, keys, pos, has_gauss, gauss = plain["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(
    out_dir: str | Path,
    state: TrainerState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    extra_files=None,
    world=SINGLE,
    sharded=None,
) -> Path:
    """Write ``out_dir/checkpoints/step-N`` atomically and return its path (every rank calls it).

    ``extra_files(tmp_dir)``, when given, writes more files into the checkpoint before it appears
    (e.g. a PEFT-format adapter a user can load from an intermediate step). ``sharded``: an FSDP2 model's
    ``distributed.ShardedState``, whose shards every rank writes.
    """
    target = checkpoint_dir(out_dir, state.step)
    rng_tensors, rng_plain = capture_rng()
    if world.distributed:
        ranks = world.gather((rng_tensors, rng_plain))
        if world.is_main:
            for rank, (tensors, plain) in enumerate(ranks[1:], start=1):
                rng_tensors.update({f"rank{rank}.{key}": value for key, value in tensors.items()})
            state.rank_rng = [plain for _, plain in ranks[1:]]
    state.rng, state.world_size = rng_plain, world.world_size
    try:
        with atomic_dir(target, overwrite=True) if world.is_main else nullcontext() as tmp:
            if sharded is not None:
                sharded.save(Path(world.broadcast(str(tmp) if world.is_main else None)) / SHARDED_DIR)
            if world.is_main:
                if sharded is None:
                    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                              str(tmp / TRAINABLE_FILE))
                    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
                save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
                if extra_files is not None:
                    extra_files(tmp)
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    except (OSError, ExportError) as error:  # disk full, permissions (ExportError: the adapter copy's folder)
        raise _checkpoint_write_error(error, out_dir, state.step, target) from None
    world.barrier("waiting for rank 0 to finish the checkpoint")
    return target


def _checkpoint_write_error(error: Exception, out_dir: str | Path, step: int, target: Path) -> WriteError:
    previous = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint, {previous}, is intact" if previous else "no checkpoint was written yet"
    reason = describe_os_error(error) if isinstance(error, OSError) else error.message
    return WriteError(f"cannot write the checkpoint of step {step} ({reason}); {kept}", where=str(target),
                      fix=f"free disk space, then continue with `homebake train --out {out_dir} --resume`")


def load_trainer_state(path: str | Path) -> TrainerState:
    path = Path(path)
    try:
        return TrainerState.from_dict(json.loads((path / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ConfigError(f"unreadable checkpoint state ({error})", where=str(path / STATE_FILE),
                          fix="resume from another checkpoint or start a new run") from error


def load_checkpoint(
    path: str | Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    restore_random: bool = True,
    world=SINGLE,
    sharded=None,
) -> TrainerState:
    """Load a checkpoint into the trainable ``params`` (name -> parameter) and ``optimizer``; every rank
    reads its own RNG states (and, under FSDP2 (``sharded``), its own shards)."""
    path = Path(path)
    state = load_trainer_state(path)
    if state.param_names and state.param_names != list(params):
        missing = sorted(set(state.param_names) ^ set(params))[:3]
        raise ConfigError(
            f"checkpoint trains different parameters than this run (e.g. {missing})",
            where=str(path),
            fix="resume with the same method, target modules and model as the original run (see its config.yaml)",
        )
    if state.world_size != world.world_size or (sharded is not None) != (path / SHARDED_DIR).is_dir():
        layout = "FSDP2 shards" if (path / SHARDED_DIR).is_dir() else "whole weights"
        raise world.quiet(ConfigError(  # every rank finds it: rank 0 says it
            f"the checkpoint was written by {state.world_size} rank(s) ({layout}); this run has "
            f"{world.world_size}{' with FSDP2' if sharded is not None else ''}", where=str(path),
            fix=("resume in one process (without --nproc-per-node or torchrun)" if state.world_size == 1 else
                 f"resume with the same number of ranks (--nproc-per-node {state.world_size}, or torchrun's)")
            + " and the same --fsdp setting"))
    if sharded is not None:
        sharded.load(path / SHARDED_DIR)
    else:
        weights = load_file(str(path / TRAINABLE_FILE))
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
    if restore_random:
        tensors = load_file(str(path / RNG_FILE))
        if world.rank:
            prefix = f"rank{world.rank}."
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        restore_rng(tensors, state.rank_rng[world.rank - 1] if world.rank else state.rng)
    return state


def prune_checkpoints(out_dir: str | Path, keep_last: int, best_step: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the best one; returns what was removed.

    A doomed directory is first renamed to a hidden name, so a crash mid-delete never leaves a
    partial checkpoint under a ``step-N`` name.
    """
    found = list_checkpoints(out_dir)
    keep = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    if best_step is not None:
        keep.add(best_step)
    removed = []
    for step, path in found:
        if step in keep:
            continue
        trash = path.with_name(f".{path.name}.deleting")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


class Checkpointer:
    """Saves, prunes and reloads one run's checkpoints under ``out/checkpoints``.

    ``stream`` is the training batch stream (its ``epoch`` and ``index`` are the data position saved
    with each checkpoint); ``write_adapter(folder)``, when given, writes the PEFT-format adapter into
    each checkpoint's ``adapter/``; ``policy`` (a ``CheckpointPolicy``) says when to save and how
    many to keep; ``last_saved`` is the step of the newest checkpoint this run holds (-1: none yet).
    """

    def __init__(self, out_dir: str | Path, trainable: dict[str, torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, stream, policy, *,
                 write_adapter: Callable[[Path], None] | None = None, last_saved: int = -1, world=SINGLE,
                 sharded=None):
        self.out = Path(out_dir)
        self.world, self.sharded = world, sharded  # several ranks: see save_checkpoint
        self.trainable = trainable
        self.optimizer = optimizer
        self.stream = stream
        self.policy = policy
        self.write_adapter = write_adapter
        self.last_saved = last_saved

    def save(self, state: TrainerState) -> Path:
        """A checkpoint of ``state.step`` now; then prune to the last ``keep_last`` and the best."""
        state.epoch, state.batch_in_epoch = self.stream.epoch, self.stream.index
        extra = self._adapter_copy if self.write_adapter is not None else None
        path = save_checkpoint(self.out, state, self.trainable, self.optimizer, extra_files=extra,
                               world=self.world, sharded=self.sharded)
        self.prune(state)
        self.last_saved = state.step
        return path

    def prune(self, state: TrainerState) -> None:
        """Keep the last ``keep_last`` checkpoints and the best one."""
        if self.world.is_main:
            prune_checkpoints(self.out, self.policy.keep_last, state.best_step)

    def _adapter_copy(self, folder: Path) -> None:
        self.write_adapter(folder / "adapter")

    def maybe_save(self, state: TrainerState, *, final: bool, improved: bool) -> Path | None:
        """Save when the policy says so (final step, improvement, every ``save_every``)."""
        if self.policy.due(state.step, final=final, improved=improved):
            return self.save(state)
        return None

    def save_if_unsaved(self, state: TrainerState) -> Path | None:
        """Save ``state.step`` unless it already is (a run that stopped between checkpoints)."""
        return self.save(state) if self.last_saved != state.step else None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out)

    def restore(self, step: int) -> TrainerState:
        """Load checkpoint ``step`` into the parameters and optimizer (random states left as they are)."""
        return load_checkpoint(checkpoint_dir(self.out, step), self.trainable, self.optimizer,
                               restore_random=False, world=self.world, sharded=self.sharded)
