"""The memory plan against measurement: `homebake train` runs a few real steps (and its evaluation pass) in a
subprocess per configuration, and the peak RSS the kernel reports for that process (its VmHWM, polled; not
homebake's own number) must be within 15% of the plan the run printed -- on the default model and on a
random-weight model with a ~1B Llama configuration. Because it runs the real step, the plan has to keep up when the step changes.
The table is printed (pytest -s) and recorded in docs/train.md ("memory plan")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train_helpers import write_chat_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ROOT / "examples" / "extract" / "train.jsonl"
TOLERANCE = 0.15
# Llama 3.2 1B's shape with SmolLM2's vocabulary: 1.07B parameters
ONE_B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
         "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
         "bos_token_id": 0, "eos_token_id": 0}

DEFAULT_MODEL_RUNS = [
    ("lora", ["--batch-size", "8", "--max-seq-len", "256"]),
    ("lora, checkpointing", ["--batch-size", "1", "--max-seq-len", "2048", "--gradient-checkpointing"]),
    ("lora fp32, checkpointing", ["--batch-size", "2", "--max-seq-len", "1024", "--precision", "fp32",
                                  "--gradient-checkpointing"]),
    ("dora", ["--method", "dora", "--batch-size", "2", "--max-seq-len", "256"]),
    ("qlora, checkpointing", ["--method", "qlora", "--batch-size", "2", "--max-seq-len", "256",
                              "--gradient-checkpointing"]),
    ("full", ["--method", "full", "--batch-size", "2", "--max-seq-len", "256"]),
    ("full, checkpointing", ["--method", "full", "--batch-size", "1", "--max-seq-len", "2048",
                             "--gradient-checkpointing"]),
]
ONE_B_RUNS = [
    ("lora", ["--batch-size", "1", "--max-seq-len", "256"]),
    ("qlora, checkpointing", ["--method", "qlora", "--batch-size", "1", "--max-seq-len", "256",
                              "--gradient-checkpointing"]),
]


def save_random_model(folder: Path, config: dict) -> Path:
    """A Llama folder of ``config``'s shape with random bf16 weights (built tensor by tensor) and a byte-level
    tokenizer."""
    from tiny_models import save_byte_tokenizer

    from homebake.model.args import ModelArgs
    from homebake.model.families import build_causal_lm

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in build_causal_lm(ModelArgs.from_hf_config(config)).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {name: (torch.ones(shape) if name.endswith("norm.weight")
                      else torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
               for name, shape in shapes.items()}
    save_file(weights, str(folder / "model.safetensors"))
    save_byte_tokenizer(folder)
    return folder


def planned_and_measured(model: Path | None, data: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    argv = [sys.executable, "-m", "homebake", "train", "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--eval-every", "2", "--eval-batches", "2", "--no-progress", *extra]
    if model is not None:
        argv += ["--model", str(model)]
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src")  # all cores, as a user's run (the tests' one-thread setting is not it)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:  # the kernel's high-water mark of the child's own memory
            peak = max(peak, _high_water_mark(proc.pid))
            time.sleep(0.02)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    planned = float(re.search(r"estimated peak memory ([0-9.]+) GiB", output).group(1))
    return planned, peak / 1024 ** 3


def _high_water_mark(pid: int) -> int:
    """VmHWM of a running process (ru_maxrss would not do: it survives exec, so a child started by a large
    pytest process reports at least the parent's size)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # it has just exited
        pass
    return 0


def check(rows: list[tuple[str, float, float]], title: str) -> None:
    lines = [f"{name}: planned {p:.2f} GiB, measured {m:.2f} GiB ({(p - m) / m:+.0%})" for name, p, m in rows]
    print(f"memory plan, {title}:", *lines, sep="\n  ")
    wrong = [line for (name, p, m), line in zip(rows, lines) if abs(p - m) > TOLERANCE * m]
    assert not wrong, lines


def test_the_plan_matches_the_measured_peak_on_the_default_model(default_gguf, tmp_path):
    rows = []
    for index, (name, extra) in enumerate(DEFAULT_MODEL_RUNS):
        planned, measured = planned_and_measured(None, EXTRACT, tmp_path / f"run{index}", extra)
        rows.append((name, planned, measured))
    check(rows, "default model (SmolLM2-135M Q4_1 GGUF)")


def test_the_plan_matches_the_measured_peak_on_a_1b_llama(tmp_path):
    model = save_random_model(tmp_path / "llama-1b", ONE_B)
    data = write_chat_jsonl(tmp_path / "chats.jsonl", 200)
    rows = []
    for index, (name, extra) in enumerate(ONE_B_RUNS):
        planned, measured = planned_and_measured(model, data, tmp_path / f"run{index}", extra)
        rows.append((name, planned, measured))
    check(rows, "random ~1B Llama (bf16 safetensors)")


def test_a_run_fitted_to_a_small_memory_limit_stays_under_it(default_gguf, tmp_path):
    """Batch size and checkpointing left unset, a limit the default 8 rows would exceed: auto-fit chooses fewer
    rows (or checkpointing) and the measured peak stays under the limit."""
    limit = 2.5
    planned, measured = planned_and_measured(None, EXTRACT, tmp_path / "run", ["--memory-limit", f"{limit}GB",
                                                                              "--max-seq-len", "512"])
    import yaml

    chosen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert chosen["batch_size"] < 8 or chosen["gradient_checkpointing"]  # it really had to fit
    assert planned <= limit and measured <= limit, (planned, measured)


LOADING_PROBE = """
import json, sys, threading, time, torch
from homebake.model.load import load_model

def status():
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssFile")}

before, peak, done = status(), {"VmRSS": 0}, []

def poll():
    while not done:
        now = status()
        if now["VmRSS"] > peak["VmRSS"]:
            peak.update(now)
        time.sleep(0.005)

watcher = threading.Thread(target=poll)
watcher.start()
load_model(sys.argv[1], dtype=torch.float32)
done.append(True)
watcher.join()
print(json.dumps({"peak": peak["VmRSS"], "file_pages": peak["RssFile"] - before["RssFile"]}))
"""


def test_loading_converted_weights_keeps_the_file_pages_which_the_plan_leaves_droppable(tmp_path):
    """bf16 safetensors loaded as float32 (the AVX2 class's default): the plan's loading peak is the file's mapped
    pages beside the float32 copies, and those pages -- clean page cache, which the kernel drops before it kills
    -- are the part auto-fit does not require. Both are checked against the child's own /proc numbers."""
    from homebake.model.load import read_model_args
    from homebake.train.config import TrainConfig
    from homebake.train.forecast import forecast
    from homebake.train.plan import weight_file_bytes

    # ~0.3B: a 0.55 GB file, 1.1 GB as float32
    folder = save_random_model(tmp_path / "model", dict(ONE_B, hidden_size=1024, intermediate_size=4096,
                                                        num_attention_heads=16, num_key_value_heads=4))
    args, _, kind = read_model_args(folder)
    plan = forecast(args, TrainConfig(model=str(folder), method="lora"), source_kind=kind,
                    file_bytes=weight_file_bytes(folder), device_type="cpu", compute_dtype=torch.float32,
                    widest_row=64, rows=1, checkpointing=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", LOADING_PROBE, str(folder)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.splitlines()[-1])
    print(f"loading bf16 as float32: planned {plan.loading / 1024 ** 3:.2f} GiB, of which file pages "
          f"{plan.loading_file / 1024 ** 3:.2f}; measured {measured['peak'] / 1024 ** 3:.2f}, of which "
          f"{measured['file_pages'] / 1024 ** 3:.2f}")
    assert abs(plan.loading - measured["peak"]) <= TOLERANCE * measured["peak"]
    assert abs(plan.loading_file - measured["file_pages"]) <= TOLERANCE * measured["file_pages"]
