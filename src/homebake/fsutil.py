"""Atomic output helpers: write to a temporary sibling, then rename over the target.

What survives what:
- a crash or SIGKILL at any moment leaves either the previous file/folder or the new complete one under the
  final name, never a half-written one (on Linux a replaced folder is swapped with ``renameat2(RENAME_EXCHANGE)``,
  so there is no moment without one; elsewhere a folder caught between its two renames is restored from its
  ``.NAME.old`` copy by the next write);
- the temporary sibling of a writer that died (``.NAME.<pid>@<host>.*.tmp``) is removed by the next write of the
  same name, so a killed export does not keep its disk space;
- files and folders get the mode of the umask, as ``open()`` would create them (not ``mkstemp``'s 0600), so an
  exported GGUF is readable by an Ollama or llama.cpp server running under its own account;
- contents are fsynced before the rename and the folder after it, so a power loss does not leave an empty file
  under the final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ExportError, WriteError

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by a set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def normal_mode(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode ``open()``/``mkdir()`` would have given it (0666/0777 less the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_HOST}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True when it cannot be told, e.g. on Windows)."""
    if os.name == "nt" or pid <= 0:
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's) or cannot tell
    return True


def host_name() -> str:
    """This machine's name as recorded in temporary and lock file names."""
    return _HOST


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` left by writers on this host that have died."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@{re.escape(_HOST)}\..*\.tmp$")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
            removed.append(sibling)
    return removed


def temp_file_for(path: str | os.PathLike) -> Path:
    """A new empty temporary file next to ``path`` (same folder, so the final rename is atomic), normal mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    return Path(tmp)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder entry to the disk (best effort where the OS cannot fsync folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    tmp = temp_file_for(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a completely written temporary file (from :func:`temp_file_for`) over ``path``, durably."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _old_copy(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_replace(path: str | os.PathLike) -> None:
    """A folder replaced by a writer that died between its two renames: put the previous one back."""
    path = Path(path)
    old = _old_copy(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced only when ``overwrite`` is true, and only after the new
    contents are complete, so a failed export never destroys a good one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_replace(path)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(path)
            if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous contents
            else:
                old = _old_copy(path)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_os_error(error: OSError) -> str:
    """'no space left on device' rather than '[Errno 28] No space left on device: ...'."""
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


def write_error(error: OSError, what: str, where: str | os.PathLike, *, fix: str | None = None) -> WriteError:
    """The one-line error for an OS error while writing ``what`` at ``where`` (e.g. disk full)."""
    return WriteError(f"cannot write {what} ({describe_os_error(error)})", where=str(where),
                      fix=fix or "free disk space or check the folder's permissions, then run the command again")


def os_error_path(error: OSError, default: str | os.PathLike) -> str:
    """The file an OS error names, else ``default``."""
    return str(error.filename) if error.filename else str(default)


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
        keeps = "the previous one is unchanged" if Path(out_dir).exists() else "nothing was written"
        raise ExportError(f"cannot write the {what} ({describe_os_error(error)}; {keeps})", where=str(out_dir),
                          fix="free disk space or check the folder's permissions, then run the command again") from None


__all__ = ["atomic_dir", "atomic_file", "describe_os_error", "fsync_path", "host_name", "normal_mode", "output_dir",
           "pid_alive",
           "os_error_path", "recover_interrupted_replace", "remove_stale_temporaries", "replace_file",
           "temp_file_for", "umask", "write_error"]
