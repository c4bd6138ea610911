"""One run per folder: a live holder is refused by name, a lock left by a killed process is taken over
(with flock, and with the exclusive-create fallback used where fcntl is missing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from homebake import run_lock
from homebake.run_folder import LOCK_FILE
from homebake.run_lock import RunFolderBusy, RunLock

HOLDER = textwrap.dedent("""
    import sys, time
    from homebake import run_lock
    if sys.argv[2] == "fallback":
        run_lock.fcntl = None
    lock = run_lock.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture(params=["flock", "fallback"])
def mode(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(run_lock, "fcntl", None)
    elif run_lock.fcntl is None:
        pytest.skip("no fcntl on this platform")
    return request.param


def hold(folder, mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path, mode):
    out = tmp_path / "run"
    proc = hold(out, mode)
    try:
        with pytest.raises(RunFolderBusy) as info:
            RunLock(out).acquire()
        text = str(info.value)
        assert f"pid {proc.pid}" in text and "homebake train" in text and str(out) in text and "\n" not in text
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, mode, capsys):
    out = tmp_path / "run"
    proc = hold(out, mode)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).is_file()  # the killed run could not clean up
    with RunLock(out) as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == proc.pid
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy):  # held: even this process cannot take it twice
            RunLock(out).acquire()
    said = capsys.readouterr().err
    assert f"pid {proc.pid}" in said and "no longer running" in said
    assert not (out / LOCK_FILE).exists()  # released and removed


def test_released_lock_can_be_taken_again_and_garbage_is_stale(tmp_path, mode):
    out = tmp_path / "run"
    with RunLock(out):
        pass
    with RunLock(out):
        pass
    (out / LOCK_FILE).write_text("{half written")
    old = time.time() - 60
    os.utime(out / LOCK_FILE, (old, old))
    with RunLock(out) as lock:
        assert lock.taken_over is None


def test_a_holder_on_another_host_is_named_with_how_to_clear_it(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-box", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunFolderBusy) as info:
        RunLock(out).acquire()
    assert "pid 1 on other-box" in str(info.value) and f"delete {out / LOCK_FILE}" in str(info.value)


def test_a_second_homebake_train_on_a_folder_in_use_is_refused_and_a_killed_ones_lock_taken_over(tmp_path, capsys):
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model
    from train_helpers import write_chat_jsonl

    from homebake.cli import main

    model, out = tmp_path / "model", tmp_path / "run"
    save_tiny_hf_model(model, "llama_tied", seed=0, max_position_embeddings=512)
    save_byte_tokenizer(model)
    data = write_chat_jsonl(tmp_path / "chats.jsonl", 16)
    capsys.readouterr()
    argv = ["train", "--model", model, "--data", data, "--out", out, "--device", "cpu", "--precision", "fp32",
            "--batch-size", "2", "--max-seq-len", "160", "--lora-r", "2", "--eval-every", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "homebake.cli", *map(str, argv), "--max-steps", "100000",
                              "--save-every", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        assert main([str(a) for a in argv] + ["--max-steps", "2"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("homebake: error: out ") and f"pid {first.pid}" in error[0]
        assert "in use by homebake train" in error[0]
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK_FILE).is_file()  # left by the killed run
    assert main([str(a) for a in argv] + ["--max-steps", "2", "--overwrite"]) == 0
    said = capsys.readouterr().err
    assert f"pid {first.pid}" in said and "no longer running; taking the folder over" in said
    assert not (out / LOCK_FILE).exists()
