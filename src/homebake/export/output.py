"""The one way exports create their output folder: atomically, with one-line errors a user can act on."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import ExportError
from ..fsutil import atomic_dir


@contextlib.contextmanager
def export_dir(out_dir: str | os.PathLike, *, overwrite: bool, what: str = "export") -> Iterator[Path]:
    """``fsutil.atomic_dir`` whose failures are ExportErrors naming the folder: an existing output that
    may not be replaced, or an OS error (permissions, disk full) while writing ``what``."""
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            yield tmp
    except FileExistsError:
        raise ExportError("the output folder already exists", where=str(out_dir),
                          fix="choose another --out, or pass --force to replace it") from None
    except OSError as error:
        raise ExportError(f"cannot write the {what} ({error.strerror or error})", where=str(out_dir),
                          fix="check the folder's permissions and free disk space") from None
