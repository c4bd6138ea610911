"""Run metrics: one JSON line per logged step in ``metrics.jsonl``, and ``loss.png`` (train + validation).

Train lines hold ``step, loss, lr, grad_norm, tokens_per_s, trained_tokens, tokens, epoch, elapsed_s``
and memory (``rss_gib``, ``peak_rss_gib``, plus ``device_gib``/``peak_device_gib`` on GPUs);
validation lines hold ``step, val_loss``. Preference objectives (DPO/ORPO) add ``reward_accuracy,
reward_margin, chosen_reward, rejected_reward, chosen_logps, rejected_logps`` to train lines and the same
keys prefixed ``val_`` to validation lines; ``loss.png`` then gets a second panel with the reward accuracy
and margin. A resumed run first drops the lines its crashed predecessor
wrote after the checkpoint it resumes from, so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from ..fsutil import atomic_file, describe_os_error, write_error
from ..run_folder import METRICS_FILE, PLOT_FILE, read_metrics

GIB = 1024 ** 3


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux from /proc's VmHWM: ``ru_maxrss`` survives exec, so a run started by a
    big process (a test runner, a notebook) would report its parent's size."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def peak_memory_bytes(device: torch.device) -> int:
    """The peak the memory plan predicts: device memory on CUDA (allocated, as the plan counts it), else the
    process's peak RSS (CPU, and MPS's unified memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"rss_gib": round(rss_bytes() / GIB, 3), "peak_rss_gib": round(peak_rss_bytes() / GIB, 3)}
    if device.type == "cuda":
        stats["device_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
        stats["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
    elif device.type == "mps" and hasattr(torch, "mps"):
        stats["device_gib"] = round(torch.mps.current_allocated_memory() / GIB, 3)
    return stats


class MetricsLog:
    """Appends records to ``out/metrics.jsonl`` (flushed per line, so a crash loses nothing written)."""

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        self._failed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.unlink(missing_ok=True)
            else:
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                with atomic_file(self.path, "w") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in kept)
            self._handle = open(self.path, "a", encoding="utf-8")
        except OSError as error:
            raise self._error(error) from None

    def _error(self, error: OSError):
        self._failed = True
        return write_error(error, "the metrics", self.path,
                           fix="free disk space, then continue with `homebake train --out "
                               f"{self.path.parent} --resume` (the last checkpoint is intact)")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._handle.write(json.dumps(clean) + "\n")
            self._handle.flush()
        except OSError as error:  # a partial line ends the readable log; --resume rewrites the file
            raise self._error(error) from None

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError as error:
            if not self._failed:  # after a failed write the same error was already reported
                raise self._error(error) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_losses(out_dir: str | Path) -> Path | None:
    """Draw train and validation loss against the step into ``loss.png``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(out_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    preference = any("reward_accuracy" in r or "val_reward_accuracy" in r for r in records)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per pair)" if preference else "loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        _plot_rewards(axes[0][1], records)
    fig.tight_layout()
    target = Path(out_dir) / PLOT_FILE
    try:
        with atomic_file(target, "wb") as handle:
            fig.savefig(handle, format="png")
    except OSError as error:  # the plot is a picture of metrics.jsonl: training goes on without it
        print(f"homebake: warning: could not write {target} ({describe_os_error(error)})", file=sys.stderr)
        return None
    finally:
        plt.close(fig)
    return target


def _plot_rewards(ax, records: list[dict]) -> None:
    """Reward accuracy (left axis) and reward margin (right axis), train and validation."""
    for key, label, style in (("reward_accuracy", "train accuracy", {"linewidth": 1}),
                              ("val_reward_accuracy", "validation accuracy", {"marker": "o", "linewidth": 1.5})):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("reward accuracy (chosen beats rejected)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    margin = ax.twinx()
    for key, label in (("reward_margin", "train margin"), ("val_reward_margin", "validation margin")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            margin.plot(*zip(*points), label=label, linestyle="--", linewidth=1)
    margin.set_ylabel("reward margin")
    lines = ax.get_legend_handles_labels(), margin.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="small")
