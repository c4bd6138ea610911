"""Several ranks on the CPU (gloo), started the ways users start them: `homebake train --nproc-per-node 2`,
and two torchrun launchers as two "nodes" on 127.0.0.1. Each is checked against one process with the same
global batch: 2 ranks x 2 rows == 1 process x 4 rows, per-step losses within 1e-5 (fp32) and the same
adapter / model. Dropout is off in the comparisons: each rank draws its own masks, so only a run without
dropout can equal one process. Resume after the whole job is killed reproduces the uninterrupted run exactly;
a rank that dies ends the job with one line naming it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import homebake
from homebake.cli import main as homebake_main
from homebake.run_folder import list_checkpoints, read_metrics

STEPS = 12
SRC = str(Path(homebake.__file__).resolve().parents[1])  # the package under test, for every rank


def run_args(model_dir, data, out, *, rows, steps=STEPS, method="lora", validation="0.2"):
    """A tiny run. 48 examples, validation 0.2: 13 training rows, so the last micro-batch of each epoch (steps
    4, 8, 12 of 4 rows each) has 1 row and rank 1 runs a filler; validation 0.05: 1 validation row (an
    evaluation filler on rank 1)."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--precision", "fp32",
            "--device", "cpu", "--max-steps", str(steps), "--save-every", "3", "--eval-every", "6",
            "--batch-size", str(rows), "--max-seq-len", "160", "--lora-r", "4", "--lora-dropout", "0",
            "--learning-rate", "3e-3" if method == "lora" else "1e-3", "--method", method, "--no-progress",
            "--validation-fraction", validation]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def start(command: list[str]) -> subprocess.Popen:
    # a session of its own, so the whole job (launcher and ranks) can be found and killed together
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def homebake_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "homebake", *map(str, args)]


def finish(proc, timeout=240):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the job hung: {stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(proc, rank: int) -> int | None:
    for pid in descendants(proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


def kill_job(proc) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_checkpoint(proc, out, min_step, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(step >= min_step for step, _ in list_checkpoints(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before checkpoint {min_step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    kill_job(proc)
    pytest.fail("no checkpoint appeared in time")


def per_step(out, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


def assert_close_losses(ours, theirs, tol=1e-5):
    for key in ("loss", "val_loss"):
        a, b = per_step(ours, key), per_step(theirs, key)
        assert a.keys() == b.keys() and a, key
        assert max(abs(a[s] - b[s]) for s in a) <= tol, (key, a, b)


def assert_close_tensors(ours: dict, theirs: dict, tol=1e-5):
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= tol, name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_lora(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "run"
    assert homebake_main(run_args(tiny_model_dir, tiny_data, out, rows=4)) == 0
    return out


@pytest.fixture(scope="module")
def two_nodes_lora(tiny_model_dir, tiny_data, tmp_path_factory):
    """Two torchrun launchers, --nnodes 2 --node-rank 0/1 on 127.0.0.1, one rank each: 2 ranks x 2 rows."""
    out = tmp_path_factory.mktemp("two-nodes") / "run"
    port = free_port()
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                    "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                    "-m", "homebake", *run_args(tiny_model_dir, tiny_data, out, rows=2)]) for node in (0, 1)]
    results = [finish(node) for node in nodes]
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    return out, results


def test_two_nodes_equal_one_process(two_nodes_lora, one_process_lora):
    out, ((_, stdout, stderr), (_, other_stdout, other_stderr)) = two_nodes_lora
    assert "2 ranks (gloo), DDP: 2 rows per rank x 2 ranks x 1 accumulation = 4 rows per optimizer step" in stderr
    assert "completed at step 12" in stdout and other_stdout == ""  # rank 0 reports, the other rank is silent
    assert "Traceback" not in stderr + other_stderr
    assert sorted(per_step(out)) == list(range(1, STEPS + 1))  # metrics.jsonl: each step once (rank 0 alone)
    assert_close_losses(out, one_process_lora)
    assert_close_tensors(load_file(str(out / "adapter_model.safetensors")),
                         load_file(str(one_process_lora / "adapter_model.safetensors")))
    assert {step for step, _ in list_checkpoints(out)} >= {12}


def test_fsdp2_full_fine_tune_equals_one_process(tiny_model_dir, tiny_data, tmp_path):
    steps = 4
    single, sharded = tmp_path / "one", tmp_path / "fsdp"
    options = dict(steps=steps, method="full", validation="0.05")
    assert homebake_main(run_args(tiny_model_dir, tiny_data, single, rows=4, **options)) == 0
    code, stdout, stderr = finish(start(homebake_cmd(
        *run_args(tiny_model_dir, tiny_data, sharded, rows=2, **options), "--nproc-per-node", 2)))
    assert code == 0, stderr[-3000:]
    assert "2 ranks (gloo), FSDP" in stderr and f"completed at step {steps}" in stdout
    assert_close_losses(sharded, single)
    # AdamW divides by the root of the squared gradient: the fp32 rounding of near-zero gradients (summed in
    # another order over two ranks) moves a weight by up to ~1e-5 per step at lr 1e-3
    assert_close_tensors(load_file(str(sharded / "model" / "model.safetensors")),
                         load_file(str(single / "model" / "model.safetensors")), tol=1e-4)
    checkpoint = list_checkpoints(sharded)[-1][1]
    assert (checkpoint / "sharded" / ".metadata").is_file()  # torch.distributed.checkpoint, every rank's shards


def test_resume_after_killing_the_whole_job_reproduces_the_run(two_nodes_lora, tiny_model_dir, tiny_data, tmp_path):
    reference, _ = two_nodes_lora
    out = tmp_path / "run"
    job = start(homebake_cmd(*run_args(tiny_model_dir, tiny_data, out, rows=2), "--nproc-per-node", 2))
    wait_for_checkpoint(job, out, 3)
    kill_job(job)  # the launcher and both ranks at once: a power cut, the OOM killer
    finish(job)
    killed_at = max(step for step, _ in list_checkpoints(out))
    assert killed_at < STEPS, "the run finished before it was killed"
    code, stdout, stderr = finish(start(homebake_cmd("train", "--out", out, "--resume", "--nproc-per-node", 2)))
    assert code == 0, stderr[-3000:]
    assert "resuming from" in stderr and f"completed at step {STEPS}" in stdout
    assert per_step(out) == per_step(reference)  # exact: the same ranks compute the same steps
    assert per_step(out, "val_loss") == per_step(reference, "val_loss")
    assert_close_tensors(load_file(str(out / "adapter_model.safetensors")),
                         load_file(str(reference / "adapter_model.safetensors")), tol=0)


def test_a_dying_rank_ends_the_job_with_one_clear_line(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    job = start(homebake_cmd(*run_args(tiny_model_dir, tiny_data, out, rows=2, steps=400), "--nproc-per-node", 2))
    wait_for_checkpoint(job, out, 3)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    started = time.monotonic()
    code, _, stderr = finish(job, timeout=90)
    assert code != 0 and time.monotonic() - started < 60  # ended, not hung until the timeout
    lines = [line for line in stderr.splitlines() if line.startswith("homebake: error: rank 1")]
    assert len(lines) == 1 and "was killed by SIGKILL" in lines[0] and "--resume" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr


def test_sigterm_to_the_job_finishes_the_step_on_every_rank_and_checkpoints(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    job = start(homebake_cmd(*run_args(tiny_model_dir, tiny_data, out, rows=2, steps=400), "--nproc-per-node", 2))
    wait_for_checkpoint(job, out, 3)
    job.send_signal(signal.SIGTERM)  # to the launcher, which passes it to every rank
    code, stdout, stderr = finish(job, timeout=90)
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    stopped_at = int(stdout.split("interrupted at step ")[1].split(",")[0])
    assert max(step for step, _ in list_checkpoints(out)) == stopped_at  # both ranks stopped at that step
    assert max(per_step(out)) == stopped_at and stderr.count("stopping after this step") == 1


@pytest.mark.parametrize("args, flag", [
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nproc-per-node", "2", "--fsdp"], "--fsdp"),  # FSDP2 of adapters on CPU processes
])
def test_bad_distributed_settings_are_one_line_errors(tiny_model_dir, tiny_data, tmp_path, capsys, args, flag):
    code = homebake_main([*run_args(tiny_model_dir, tiny_data, tmp_path / "run", rows=2), *args])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("homebake: error:") == 1 and flag in stderr, stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, in this process: DDP and FSDP2 wrap and communicate as usual."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["llama_tied", "gemma2"])  # gemma2: a head that is not a matrix (soft-capping)
@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("fsdp", "full")])
def test_wrapped_step_equals_the_plain_step(one_rank_group, tiny_data, tmp_path, variant, strategy, method):
    import torch
    from train_helpers import make_tiny_model_dir, tiny_config

    from homebake.train.data_stream import evaluation_batches
    from homebake.train.distributed import World, step_runner
    from homebake.train.setup import build_model, load_examples, seed_everything
    from homebake.train.step import _accumulate

    config = tiny_config(make_tiny_model_dir(tmp_path / variant, variant), tiny_data, tmp_path / "run",
                         method=method, lora={"dropout": 0.0})
    results = []
    for wrapped in (None, strategy):
        seed_everything(0)
        model = build_model(config, torch.device("cpu"), torch.float32)
        examples, _, _ = load_examples(config, model.loaded.tokenizer)
        batch = evaluation_batches(examples, batch_size=4, max_seq_len=160, pad_token_id=0, packing=True)[0]
        runner = step_runner(World(backend="gloo"), model, torch.float32, 16, strategy=wrapped)
        micro = [batch]
        if wrapped:  # a rank with an empty share runs a filler: weighted 0, counted nowhere
            filler = evaluation_batches(examples[:3], batch_size=1, max_seq_len=160, pad_token_id=0,
                                        packing=True)[0]
            filler.filler = True
            micro.append(filler)
        params = list(model.trainable.values())
        loss, norm, trained, real = _accumulate(runner, micro, params, max_grad_norm=1.0)
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for name, p in model.trainable.items()}
        results.append((loss, norm, trained, real, grads, runner.evaluate([batch])))
    (loss, norm, trained, real, grads, val), theirs = results
    assert (trained, real) == theirs[2:4]
    assert loss == pytest.approx(theirs[0], abs=1e-6) and norm == pytest.approx(theirs[1], rel=1e-5)
    assert val == pytest.approx(theirs[5], abs=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], theirs[4][name], atol=1e-6, rtol=1e-5), name
