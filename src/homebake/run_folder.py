"""The training run folder (``homebake train --out DIR``): the one place that knows its layout.

```
DIR/config.yaml                 the resolved training config (TrainConfig.save)
DIR/metrics.jsonl               one JSON line per logged step (train: loss, ...; validation: val_loss)
DIR/loss.png                    train and validation loss against the step
DIR/report.html, compare.json   the report and the before/after numbers (homebake compare / demo)
DIR/checkpoints/step-00000120/  resumable checkpoints (train.checkpoint writes their contents)
DIR/adapter_config.json + adapter_model.safetensors   the adapter in PEFT format (LoRA, DoRA, QLoRA)
DIR/model/                      the merged HF folder of a full fine-tune
DIR/.homebake.lock              held by the `homebake train` using the folder (homebake.run_lock)
```

Train, evaluate, export, report and the commands read and write runs through these names only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
REPORT_FILE = "report.html"
COMPARE_FILE = "compare.json"
CHECKPOINTS = "checkpoints"
FULL_MODEL_DIR = "model"
ADAPTER_CONFIG = "adapter_config.json"  # the PEFT format's names (homebake.adapters.peft writes them)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT_STATE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
STEP_DIR = re.compile(r"^step-(\d+)$")
LOCK_FILE = ".homebake.lock"  # one training run per folder (homebake.run_lock)
STAGING_ADAPTER = ".adapter.tmp"  # the final adapter is written here, then its files are moved into the run


def is_run(folder: str | Path) -> bool:
    """Whether ``folder`` is a training run (it holds the run's config.yaml)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def run_kind(folder: str | Path) -> str | None:
    """"adapter" (PEFT files), "full" (model/ holds an HF folder), or None (neither written yet)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / FULL_MODEL_DIR / "config.json").is_file():
        return "full"
    return None


def previous_run_files(folder: str | Path) -> list[Path]:
    """What a new run in ``folder`` would mix with: existing checkpoints and metrics."""
    folder = Path(folder)
    return [p for p in (folder / CHECKPOINTS, folder / METRICS_FILE) if p.exists()]


def checkpoint_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``folder/checkpoints``, oldest first."""
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / CHECKPOINT_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def leftovers(folder: str | Path) -> list[Path]:
    """What a killed run leaves behind in its folder: the final adapter's staging folder, temporaries of its
    atomic writes (``.config.yaml.<pid>@<host>.*.tmp``, ...) and of checkpoints, and checkpoints caught being
    deleted. None of it is ever read; the next run in the folder deletes it while holding the run lock."""
    folder = Path(folder)
    found = [folder / STAGING_ADAPTER] if (folder / STAGING_ADAPTER).exists() else []
    names = (CONFIG_FILE, METRICS_FILE, PLOT_FILE, REPORT_FILE, COMPARE_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
             FULL_MODEL_DIR, STAGING_ADAPTER)
    own = re.compile(r"^\.(?:" + "|".join(re.escape(n) for n in names) + r")\.(?:.+\.tmp|old)$")
    step = re.compile(r"^\.step-\d+\.(?:.+\.tmp|deleting|old)$")
    for parent, pattern in ((folder, own), (folder / CHECKPOINTS, step)):
        if parent.is_dir():
            found += sorted(p for p in parent.iterdir() if pattern.match(p.name))
    return found


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (``path`` is the run folder or the file itself).

    A line cut short by a crash ends the usable log; a missing file is an empty log.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run_config(folder: str | Path) -> dict | None:
    """The run's config.yaml as a dict (None when absent); unreadable YAML raises ``ValueError``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(" ".join(str(error).split())[:120]) from None
    return data if isinstance(data, dict) else {}
