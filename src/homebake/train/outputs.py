"""What a run writes besides checkpoints and metrics: the final adapter or model, and the header it prints.

- ``adapter_writer(config, model)``: a function writing the PEFT-format adapter
  (``homebake.adapters.peft.save_peft_adapter``) into a new folder; None for a full fine-tune. The
  checkpointer uses it for each checkpoint's ``adapter/`` copy, ``write_final_outputs`` for the run's own.
- ``write_final_outputs(config, model, out, state_dict=None)``: the adapter files directly in ``out`` (each file
  replaced atomically), or the full model as an HF folder in ``out/model`` (``homebake.model.save.save_hf_model``;
  ``state_dict``: the weights FSDP2 gathered from the ranks). Several ranks: rank 0 calls it.
- ``print_header(setup)``: trainable parameters, the memory plan (per rank), the settings chosen from the data and
  to fit the memory, one line describing the run and,
  with several ranks, one for the job: world size, strategy, per-rank and global batch.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ..errors import ExportError, WriteError
from ..run_folder import FULL_MODEL_DIR, STAGING_ADAPTER, latest_checkpoint
from .config import TrainConfig
from .plan import GIB, available_memory
from .setup import ModelSetup, TrainingSetup


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


def write_final_outputs(config: TrainConfig, setup: ModelSetup, out: Path, *,
                        state_dict: dict | None = None) -> list[Path]:
    """The adapter files (PEFT format) directly in ``out``, or the full model in ``out/model`` (``state_dict``,
    when given, instead of the model's own: an FSDP2 model's gathered weights).

    A failure (disk full) is a one-line ``WriteError``; the final checkpoint is already saved, so
    ``--resume`` writes the outputs again once there is space."""
    try:
        return _write_final_outputs(config, setup, out, state_dict)
    except (OSError, ExportError) as error:
        from ..fsutil import describe_os_error

        reason = describe_os_error(error) if isinstance(error, OSError) else error.message
        what = "adapter" if config.method != "full" else "model"
        raise WriteError(f"cannot write the final {what} ({reason}); the last checkpoint, {latest_checkpoint(out)}, "
                         "is intact", where=str(out),
                         fix=f"free disk space, then run `homebake train --out {out} --resume` to write it") from None


def _write_final_outputs(config: TrainConfig, setup: ModelSetup, out: Path, state_dict: dict | None) -> list[Path]:
    writer = adapter_writer(config, setup)
    if writer is not None:
        staging = out / STAGING_ADAPTER
        writer(staging)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)  # each file appears complete or not at all
            written.append(out / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        return written
    from ..model.save import save_hf_model

    target = out / FULL_MODEL_DIR
    save_hf_model(setup.loaded, target, state_dict=state_dict if state_dict is not None else setup.model.state_dict(),
                  overwrite=True)
    return [target]


def print_header(setup: TrainingSetup) -> None:
    """The run's opening lines on stderr: parameters, the memory plan, the settings chosen (from the data, to fit
    the memory) and why, the run."""
    config, model = setup.config, setup.model
    try:
        from ..adapters import describe_parameters

        print(describe_parameters(model.model), file=sys.stderr)
    except ImportError:
        n_train = sum(p.numel() for p in model.trainable.values())
        n_total = sum(p.numel() for p in model.model.parameters())
        print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / max(1, n_total):.3f}%)",
              file=sys.stderr)
    plan = setup.plan
    free = available_memory(setup.device)
    per_rank = " per rank" if setup.world.distributed else ""
    print(plan.describe() + per_rank + (f"; {free / GIB:.1f} GiB available" if free else ""), file=sys.stderr)
    for line in setup.chosen:
        print(line, file=sys.stderr)
    rows = config.batch_size * setup.world.world_size
    print(f"{config.method} on {setup.device.type} in {str(setup.compute_dtype).replace('torch.', '')}; "
          f"{setup.data_summary}; {setup.stream.batches_per_epoch} batches/epoch of {rows} rows; "
          f"{setup.total_steps} steps; {len(setup.eval_batches)} validation batches", file=sys.stderr)
    if setup.world.distributed:
        print(f"{setup.world.describe()}, {setup.strategy.upper()}: {config.batch_size} rows per rank x "
              f"{setup.world.world_size} ranks x {config.grad_accum} accumulation = {rows * config.grad_accum} "
              "rows per optimizer step (global batch)", file=sys.stderr)
