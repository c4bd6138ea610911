"""`homebake plan` and its forecast: the model built on the meta device is planned exactly as the loaded one
(so plan and train cannot disagree), from a config.json or a GGUF's metadata alone, and the command answers
the memory tiers for a 3B configuration."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from homebake.model.load import read_model_args
from homebake.train.config import TrainConfig
from homebake.train.forecast import forecast, parameter_count
from homebake.train.plan import weight_file_bytes
from homebake.train.setup import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "model-configs"


def loaded_and_meta_plans(model_dir, config, checkpointing: bool, widest_row: int, rows: int):
    """The plan of ``config`` over the model ``build_model`` loads (with its objective) and the forecast's."""
    from homebake.train.loss import default_chunk_rows
    from homebake.train.objectives import build_objective
    from homebake.train.plan import training_plan

    config.validate()
    loaded = build_model(config, torch.device("cpu"), torch.float32)
    args = loaded.loaded.args
    common = dict(source_kind="hf", file_bytes=weight_file_bytes(model_dir), device_type="cpu",
                  compute_dtype=torch.float32, widest_row=widest_row, rows=rows)
    real = training_plan(config, loaded.model, args, chunk_rows=default_chunk_rows(args.vocab_size),
                         objective=build_objective(config, loaded.model, torch.float32),
                         gradient_checkpointing=checkpointing, **common)
    return real, forecast(args, config, checkpointing=checkpointing, **common)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_meta_model_plans_as_the_loaded_model(tiny_model_dir, method, checkpointing):
    real, meta = loaded_and_meta_plans(tiny_model_dir, TrainConfig(model=str(tiny_model_dir), method=method),
                                       checkpointing, widest_row=160, rows=4)
    assert meta == real


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_meta_model_plans_a_preference_run_as_the_loaded_model(tiny_model_dir, method):
    """DPO: a full fine-tune keeps a frozen reference copy, which the forecast counts too."""
    config = TrainConfig(model=str(tiny_model_dir), method=method, objective="dpo")
    real, meta = loaded_and_meta_plans(tiny_model_dir, config, False, widest_row=96, rows=2)
    assert meta == real
    assert (meta.reference_weights > 0) == (method == "full")


def test_the_architecture_is_read_without_the_weights(tiny_model_dir, tmp_path):
    args, folder, kind = read_model_args(tiny_model_dir / "config.json")
    assert (folder, kind) == (tiny_model_dir, "hf")
    assert args == read_model_args(tiny_model_dir)[0]
    three_b, _, _ = read_model_args(CONFIGS / "Llama-3.2-3B-Instruct.json")
    assert round(parameter_count(three_b) / 1e9, 2) == 3.21  # Llama 3.2 3B, tied embeddings


def test_plan_answers_the_tiers_for_a_3b_config():
    proc = subprocess.run([sys.executable, "-m", "homebake", "plan", "--model",
                           str(CONFIGS / "Llama-3.2-3B-Instruct.json"), "--memory", "16GB", "--precision", "bf16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "3.21B parameters" in lines[0] and "2048-token rows" in lines[0]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:10]}
    assert set(rows) == {(m, c) for m in ("lora", "dora", "qlora", "full") for c in ("off", "on")}
    lora_gc, full = rows[("lora", "on")], rows[("full", "off")]
    assert float(lora_gc[2]) < 16 * 0.85 and lora_gc[6] == "yes"  # fits the 16G tier
    assert float(full[2]) > 64 * 0.85 and full[-1] == "-"  # a full fine-tune of 3B fits none
    assert "homebake train --method lora would choose:" in lines[-1] and "checkpointing on" in lines[-1]


def test_plan_sizes_the_rows_by_the_data(tiny_model_dir, tiny_data):
    proc = subprocess.run([sys.executable, "-m", "homebake", "plan", "--model", str(tiny_model_dir), "--data",
                           str(tiny_data), "--method", "lora", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rows (from --data)" in proc.stdout and "on cuda" in proc.stdout


def test_plan_refuses_a_bad_memory_size_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "homebake", "plan", "--memory", "lots"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--memory: cannot read 'lots' as an amount of memory" in proc.stderr
