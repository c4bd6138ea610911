"""`homebake train` in a subprocess: SIGKILL mid-run then --resume, and Ctrl-C then --resume, both reproduce
the uninterrupted run's per-step losses exactly (fp32, dropout on, so RNG state matters too)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from homebake.train.checkpoint import list_checkpoints
from homebake.train.metrics import read_metrics

STEPS = 24


def cli_args(model_dir, data, out):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--precision", "fp32",
            "--device", "cpu", "--max-steps", str(STEPS), "--save-every", "4", "--eval-every", "6",
            "--batch-size", "2", "--max-seq-len", "160", "--lora-r", "4", "--lora-dropout", "0.1",
            "--learning-rate", "3e-3", "--no-progress"]


def start(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "homebake.cli", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def wait_for_checkpoint(proc, out, min_step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(step >= min_step for step, _ in list_checkpoints(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before checkpoint {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def per_step(out, key):
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, stderr = finish(start(*cli_args(tiny_model_dir, tiny_data, out)))
    assert code == 0, stderr[-3000:]
    return out


def assert_same_run(out, reference):
    assert per_step(out, "loss") == per_step(reference, "loss")  # exact equality, every step once
    assert per_step(out, "val_loss") == per_step(reference, "val_loss")
    assert sorted(per_step(out, "loss")) == list(range(1, STEPS + 1))
    ours, theirs = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(reference / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(*cli_args(tiny_model_dir, tiny_data, out))
    wait_for_checkpoint(proc, out, 8)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    killed_at = max(step for step, _ in list_checkpoints(out))
    assert killed_at < STEPS
    code, stdout, stderr = finish(start("--out", out, "--resume"))  # everything else from out/config.yaml
    assert code == 0, stderr[-3000:]
    assert f"resuming from" in stderr and "completed at step 24" in stdout
    assert_same_run(out, reference)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tiny_model_dir, tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(*cli_args(tiny_model_dir, tiny_data, out))
    wait_for_checkpoint(proc, out, 4)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    stopped_at = int(stdout.split("interrupted at step ")[1].split(",")[0])
    assert max(step for step, _ in list_checkpoints(out)) == stopped_at  # the step it stopped at was saved
    code, _, stderr = finish(start("--out", out, "--resume"))
    assert code == 0, stderr[-3000:]
    assert_same_run(out, reference)


def test_resume_finishes_a_prune_the_kill_interrupted(tiny_model_dir, tiny_data, tmp_path, reference):
    """Killed after the last checkpoint was written but before the oldest was pruned: resume keeps --keep-last."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    kept = [step for step, _ in list_checkpoints(reference)]
    shutil.copytree(out / "checkpoints" / f"step-{kept[-1]:08d}", out / "checkpoints" / f"step-{kept[0] - 1:08d}")
    code, _, stderr = finish(start("--out", out, "--resume"))
    assert code == 0, stderr[-3000:]
    assert [step for step, _ in list_checkpoints(out)] == kept
    assert_same_run(out, reference)
