"""A fork server for the kill campaign: imports torch and homebake once, then runs each `homebake ...` command in a
forked child (so a run costs its work, not a Python + torch start-up) and SIGKILLs it at a chosen moment.

Protocol: one JSON job per stdin line, one JSON reply per stdout line.
  job:   {"argv": [...], "log": path, "kill_at": N | null, "kill_after_s": seconds | null, "record": path | null}
  reply: {"rc": exit code (-9 when killed), "killed": bool, "seconds": float, "events": count}

Kill points (``kill_at``): the child counts events at homebake's write calls and model calls and SIGKILLs itself at
event N -- before an open for writing, in the middle of a write (half the data written), before a rename / delete /
temporary creation / folder swap, half-way through a safetensors or torch.save file (the file truncated to half),
and before each forward pass of the model (training steps and evaluation batches). ``record`` writes the event list
("N<TAB>kind<TAB>path") of an uninterrupted run, which is how the campaign chooses its kill points.
``kill_after_s``: the parent SIGKILLs the child after that many seconds (random-time kills).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import homebake.cli  # noqa: E402
import homebake.fsutil  # noqa: E402


def _preload() -> None:
    """Import what a run imports (no torch op runs here, so forking stays safe): each child then costs only its
    own work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import homebake.data  # noqa: F401
    import homebake.evaluate  # noqa: F401
    import homebake.export.gguf  # noqa: F401
    import homebake.export.workflow  # noqa: F401
    import homebake.model.load  # noqa: F401
    import homebake.report  # noqa: F401
    import homebake.tokenizer  # noqa: F401
    import homebake.train.loop  # noqa: F401

    homebake.cli.build_parser()


_preload()

_WRITE_MODES = set("wax+")


class KillSwitch:
    def __init__(self, kill_at: int | None, record: str | None):
        self.kill_at = kill_at
        self.count = 0
        self.record_fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if record else None

    def event(self, kind: str, path="", partial=None) -> None:
        self.count += 1
        if self.record_fd is not None:
            os.write(self.record_fd, f"{self.count}\t{kind}\t{os.fspath(path) if path else ''}\n".encode())
        if self.count == self.kill_at:
            if partial is not None:
                partial()
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        switch = self
        real_open = builtins.open

        class Tracked:
            def __init__(self, handle, path):
                self._handle, self._path = handle, path

            def write(self, data):
                def half():
                    self._handle.write(data[: len(data) // 2])
                    self._handle.flush()
                switch.event("write", self._path, half)
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

        def tracked_open(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not _WRITE_MODES & set(mode):
                return real_open(file, mode, *args, **kwargs)
            switch.event("open", file)
            return Tracked(real_open(file, mode, *args, **kwargs), os.fspath(file))

        builtins.open = io.open = tracked_open

        def before(kind, function, path_arg=0):
            def wrapped(*args, **kwargs):
                switch.event(kind, args[path_arg] if len(args) > path_arg else "")
                return function(*args, **kwargs)
            return wrapped

        os.replace = before("replace", os.replace, 1)
        os.rename = before("rename", os.rename, 1)
        os.unlink = before("unlink", os.unlink)
        os.remove = before("unlink", os.remove)
        shutil.rmtree = before("rmtree", shutil.rmtree)
        tempfile.mkstemp = before("mkstemp", tempfile.mkstemp)
        tempfile.mkdtemp = before("mkdtemp", tempfile.mkdtemp)
        homebake.fsutil._exchange = before("exchange", homebake.fsutil._exchange, 1)

        def halfway(kind, function):
            def wrapped(obj, target, *args, **kwargs):
                def half():
                    function(obj, target, *args, **kwargs)
                    with real_open(target, "r+b") as handle:
                        handle.truncate(os.path.getsize(target) // 2)
                if isinstance(target, (str, os.PathLike)):
                    switch.event(kind, target, half)
                return function(obj, target, *args, **kwargs)
            return wrapped

        safetensors.torch.serialize_file = halfway("safetensors", safetensors.torch.serialize_file)
        torch.save = halfway("torch.save", torch.save)

        def forward_hook(module, args):
            if type(module).__name__ == "CausalLM":
                switch.event("step" if module.training else "eval")

        torch.nn.modules.module.register_module_forward_pre_hook(forward_hook)


def run_child(job: dict) -> None:
    torch.set_num_threads(1)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    switch = KillSwitch(job.get("kill_at"), job.get("record"))
    switch.install()
    code = 1
    try:
        code = homebake.cli.main(job["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a bug: show it in the log
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if switch.record_fd is not None:
            os.write(switch.record_fd, f"# {switch.count} events\n".encode())
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            run_child(job)
        killed_by_parent = False
        deadline = started + job["kill_after_s"] if job.get("kill_after_s") is not None else None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed_by_parent = True
                deadline = None
            time.sleep(0.002)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        reply = {"rc": code, "killed": code == -signal.SIGKILL, "by_parent": killed_by_parent,
                 "seconds": round(time.monotonic() - started, 3)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
