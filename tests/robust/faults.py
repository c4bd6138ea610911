"""Fault injection at homebake's write calls, for the disk-full tests and the kill campaign.

``DiskFull(pattern, after_calls=0)``: the first write to a path matching ``pattern`` (a regex searched in the path)
after ``after_calls`` earlier matching writes fails with ENOSPC, as a full disk does: a file opened for writing takes
half of the data passed to the failing ``write`` and then raises; safetensors' ``serialize_file`` and ``torch.save``
leave a truncated file and raise. Patched: ``builtins.open``/``io.open`` (Python file writes, pathlib, yaml, gguf's
writer), ``safetensors.torch.serialize_file`` (every ``save_file``) and ``torch.save``.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re

import safetensors.torch
import torch

_REAL_OPEN = builtins.open
_REAL_SERIALIZE = safetensors.torch.serialize_file
_REAL_TORCH_SAVE = torch.save


def _writes(mode: str) -> bool:
    return any(flag in mode for flag in "wax+")


class _FullFile:
    """Wraps a real binary/text file; fails with ENOSPC at the write that exhausts the budget."""

    def __init__(self, handle, injector, path):
        self._handle, self._injector, self._path = handle, injector, path

    def write(self, data):
        if self._injector.should_fail(self._path):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def close(self):
        self._handle.close()

    def fileno(self):
        return self._handle.fileno()

    def flush(self):
        self._handle.flush()


class DiskFull:
    def __init__(self, pattern: str, *, after_calls: int = 0):
        self.pattern = re.compile(pattern)
        self.after_calls = after_calls
        self.matched = 0
        self.failed: list[str] = []
        self._saved: list = []

    def should_fail(self, path) -> bool:
        path = os.fspath(path) if not isinstance(path, int) else ""
        if not isinstance(path, str) or not self.pattern.search(path):
            return False
        self.matched += 1
        if self.matched > self.after_calls and not self.failed:
            self.failed.append(path)
            return True
        return False

    # ------------------------------------------------------------------ patched entry points
    def _open(self, file, mode="r", *args, **kwargs):
        handle = _REAL_OPEN(file, mode, *args, **kwargs)
        if _writes(mode) and not isinstance(file, int) and self.pattern.search(os.fspath(file)):
            return _FullFile(handle, self, os.fspath(file))
        return handle

    def _serialize(self, tensors, filename, metadata=None):
        if self.should_fail(filename):
            _REAL_SERIALIZE(tensors, filename, metadata=metadata)
            with _REAL_OPEN(filename, "r+b") as handle:
                handle.truncate(max(0, os.path.getsize(filename) // 2))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return _REAL_SERIALIZE(tensors, filename, metadata=metadata)

    def _torch_save(self, obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and self.should_fail(f):
            _REAL_TORCH_SAVE(obj, f, *args, **kwargs)
            with _REAL_OPEN(f, "r+b") as handle:
                handle.truncate(max(0, os.path.getsize(f) // 2))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return _REAL_TORCH_SAVE(obj, f, *args, **kwargs)

    def __enter__(self):
        self._saved = [(builtins, "open", builtins.open), (io, "open", io.open),
                       (safetensors.torch, "serialize_file", safetensors.torch.serialize_file),
                       (torch, "save", torch.save)]
        builtins.open = io.open = self._open
        safetensors.torch.serialize_file = self._serialize
        torch.save = self._torch_save
        return self

    def __exit__(self, *exc):
        for module, name, value in self._saved:
            setattr(module, name, value)
