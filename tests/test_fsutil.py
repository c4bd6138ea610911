"""fsutil: outputs get the umask's normal mode (not mkstemp's 0600), a replaced folder is never missing, and the
temporaries of a writer that died are cleaned up by the next write of the same name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from homebake import fsutil
from homebake.errors import ExportError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert fsutil.umask() == 0o027 and fsutil.umask() == 0o027
    finally:
        os.umask(old)


def test_atomic_file_and_dir_get_the_umask_mode(tmp_path, umask_022):
    with fsutil.atomic_file(tmp_path / "a.txt") as handle:
        handle.write("x")
    assert mode(tmp_path / "a.txt") == 0o644
    with fsutil.atomic_dir(tmp_path / "out") as folder:
        (folder / "f").write_text("y")
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "f") == 0o644
    os.umask(0o077)
    with fsutil.atomic_file(tmp_path / "private.txt") as handle:
        handle.write("x")
    assert mode(tmp_path / "private.txt") == 0o600  # a stricter umask is respected


def test_exported_gguf_is_readable_by_other_users(tmp_path, umask_022):
    import torch

    from homebake.export.gguf_writer import write_gguf
    from homebake.model.args import ModelArgs

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import tiny_hf_config

    args = ModelArgs.from_hf_config(tiny_hf_config("llama"))
    from homebake.model.decoder import CausalLM

    torch.manual_seed(0)
    state = CausalLM(args).state_dict()
    with fsutil.output_dir(tmp_path / "gguf", overwrite=False) as tmp:
        write_gguf(tmp / "m.gguf", state, args)
    assert mode(tmp_path / "gguf") == 0o755 and mode(tmp_path / "gguf" / "m.gguf") == 0o644


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    with fsutil.atomic_dir(target) as folder:
        (folder / "v").write_text("1")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(target, overwrite=True) as folder:
        (folder / "v").write_text("2")
        raise RuntimeError("failed half-way")
    assert (target / "v").read_text() == "1"
    with fsutil.atomic_dir(target, overwrite=True) as folder:
        (folder / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries, no .old copy


def test_without_an_atomic_swap_a_folder_caught_between_renames_is_restored(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with fsutil.atomic_dir(target) as folder:
        (folder / "v").write_text("good")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # e.g. macOS: two renames
    real_replace = os.replace
    calls = []

    def die_between_the_renames(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process "dies" after moving the old folder aside
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", die_between_the_renames)
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_dir(target, overwrite=True) as folder:
        (folder / "v").write_text("new")
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert not target.exists() and (tmp_path / ".out.old" / "v").read_text() == "good"
    with pytest.raises(ExportError, match="already exists"), fsutil.output_dir(target, overwrite=False):
        pass  # the next write puts the previous output back first
    assert (target / "v").read_text() == "good"


def test_temporaries_of_a_dead_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.gguf.{dead}@{fsutil._HOST}.abc123.tmp"
    stale.write_text("half a gguf")
    mine = tmp_path / f".out.gguf.{os.getpid()}@{fsutil._HOST}.zzz.tmp"  # a live writer's: kept
    mine.write_text("in progress")
    with fsutil.atomic_file(target) as handle:
        handle.write("done")
    assert not stale.exists() and mine.exists() and target.read_text() == "done"


def test_a_disk_error_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    import errno

    with pytest.raises(ExportError) as info, fsutil.output_dir(tmp_path / "out", overwrite=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x"))
    text = str(info.value)
    assert "no space left on device" in text and str(tmp_path / "out") in text and "\n" not in text
    assert not (tmp_path / "out").exists()
