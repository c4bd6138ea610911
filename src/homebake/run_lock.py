"""One training run per folder: ``homebake train`` holds ``OUT/.homebake.lock`` while it uses ``OUT``.

The lock is an ``fcntl.flock`` on that file, which records the holder (pid, host, start time, command). The
kernel drops a flock when its process dies, however it dies (SIGKILL, OOM killer, power button), so a lock left
by a killed run is stale by construction: the next run takes it over and says whose it was. A second run while
the first is alive is refused with a one-line error naming the holder.

Where flock is unavailable (no ``fcntl``, e.g. Windows, or a filesystem without locks) the file is created
exclusively instead; it is then stale when its holder ran on this host and that pid is gone, and a holder on
another host (a shared folder) is named in the refusal with how to remove the lock once that run is over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .fsutil import host_name, pid_alive
from .run_folder import LOCK_FILE

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunFolderBusy(ConfigError):
    """Another homebake process is using the run folder."""


@dataclass
class LockHolder:
    pid: int
    host: str
    started: str  # local time, ISO 8601
    command: str = "homebake train"

    @classmethod
    def me(cls, command: str) -> "LockHolder":
        return cls(os.getpid(), host_name(), time.strftime("%Y-%m-%dT%H:%M:%S"), command)

    @classmethod
    def parse(cls, text: str) -> "LockHolder | None":
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data.get("started", "?")),
                       str(data.get("command", "homebake train")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on {self.host}, started {self.started})"

    def is_dead(self) -> bool:
        """Known to have died: it ran on this host and its pid is gone."""
        return self.host == host_name() and not pid_alive(self.pid)


class RunLock:
    """``with RunLock(out):`` holds ``out/.homebake.lock`` (creating ``out``); raises RunFolderBusy if held."""

    def __init__(self, folder: str | os.PathLike, *, command: str = "homebake train"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.taken_over: LockHolder | None = None  # the dead holder whose lock this one replaced
        self._fd: int | None = None
        self._exclusive_file = False

    # ------------------------------------------------------------------------------------------ public
    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None or not self._acquire_flock():
            self._acquire_exclusive()
        if self.taken_over is not None:
            print(f"homebake: {self.folder} was locked by {self.taken_over.describe()}, which is no longer "
                  "running; taking the folder over", file=sys.stderr)
        return self

    def release(self) -> None:
        if self._fd is None and not self._exclusive_file:
            return
        with contextlib.suppress(OSError):
            if self._fd is not None or self._holder_is_me():
                self.path.unlink()  # unlink while still holding, so no one locks a file about to vanish
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock
        self._fd, self._exclusive_file = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ flock
    def _acquire_flock(self) -> bool:
        """True when locked; False when this filesystem has no flock (the caller falls back)."""
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = LockHolder.parse(_read_fd(fd))
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(holder) from None
                return False  # ENOLCK, EOPNOTSUPP, ...: no locks on this filesystem
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file while we waited on it: retry on the new one
                os.close(fd)
                continue
            previous = LockHolder.parse(_read_fd(fd))
            if previous is not None and previous.pid != os.getpid():
                self.taken_over = previous  # it held the flock no longer: it died
            _write_fd(fd, LockHolder.me(self.command))
            self._fd = fd
            return True
        raise self._busy(None)

    # ------------------------------------------------------------------------------------------ fallback
    def _acquire_exclusive(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None and time.time() - _mtime(self.path) < 10:
                    raise self._busy(None) from None  # being written right now
                if holder is not None and not holder.is_dead():
                    raise self._busy(holder) from None
                self.taken_over = holder
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: remove it and race for a fresh exclusive create
                continue
            try:
                _write_fd(fd, LockHolder.me(self.command))
            finally:
                os.close(fd)
            self._exclusive_file = True
            return
        raise self._busy(self._read_holder())

    def _read_holder(self) -> LockHolder | None:
        try:
            return LockHolder.parse(self.path.read_text(encoding="utf-8"))
        except OSError:
            return None

    def _holder_is_me(self) -> bool:
        holder = self._read_holder()
        return holder is not None and holder.pid == os.getpid() and holder.host == host_name()

    def _busy(self, holder: LockHolder | None) -> RunFolderBusy:
        who = holder.describe() if holder else "another homebake process"
        fix = "wait for it to finish or stop it, or choose another --out"
        if holder is not None and holder.host != host_name():
            fix += f"; if that run is over, delete {self.path}"
        return RunFolderBusy(f"the run folder is in use by {who}", where=f"out {self.folder}", fix=fix)


def _read_fd(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _write_fd(fd: int, holder: LockHolder) -> None:
    data = (json.dumps(asdict(holder)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


__all__ = ["LockHolder", "RunFolderBusy", "RunLock"]
