"""Atomic output helpers: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ExportError


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced only when ``overwrite`` is true, and only after the new
    contents are complete, so a failed export never destroys a good one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_dir(out_dir: str | os.PathLike, *, overwrite: bool, what: str = "export") -> Iterator[Path]:
    """``atomic_dir`` whose failures are one-line ExportErrors naming the folder: an existing output that
    may not be replaced, or an OS error (permissions, disk full) while writing ``what``.

    Every output folder a user asks for (an export, a merged model, an adapter) is created through it."""
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            yield tmp
    except FileExistsError:
        raise ExportError("the output folder already exists", where=str(out_dir),
                          fix="choose another --out, or pass --force to replace it") from None
    except OSError as error:
        raise ExportError(f"cannot write the {what} ({error.strerror or error})", where=str(out_dir),
                          fix="check the folder's permissions and free disk space") from None
