"""`homebake compare` on a preference file: preference accuracy of base vs tuned with the paired sign test; the
DPO run's report and plot show the reward metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from homebake.cli import main


def write_pairs(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    lines = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        reply = " ".join(rng.choice(words) for _ in range(rng.randint(1, 2)))
        lines.append(json.dumps({"prompt": prompt, "chosen": reply + "!", "rejected": reply + "?"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    from homebake.adapters.config import LoraConfig
    from homebake.data.config import DataConfig
    from homebake.train.config import TrainConfig
    from homebake.train.loop import train

    folder = tmp_path_factory.mktemp("dpo")
    held_out = write_pairs(folder / "held.jsonl", 16, seed=2)
    config = TrainConfig(model=str(tiny_model_dir), out=str(folder / "run"), precision="fp32", device="cpu",
                         batch_size=4, max_steps=12, learning_rate=1e-2, eval_every=6, progress=False, objective="dpo",
                         data=DataConfig(paths=[str(write_pairs(folder / "train.jsonl", 64, seed=1))],
                                         validation=str(held_out), max_seq_len=256),
                         lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    train(config)
    return folder / "run", held_out


def test_compare_reports_preference_accuracy_with_the_paired_test(tiny_model_dir, dpo_run, capsys):
    run, held_out = dpo_run
    code = main(["compare", "--model", str(tiny_model_dir), "--adapter", str(run), "--data", str(held_out),
                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "preference accuracy (chosen > rejected)" in printed and "verdict:" in printed
    record = json.loads((run / "compare.json").read_text())
    base, tuned = record["base"]["preference"], record["fine_tuned"]["preference"]
    assert base["pairs"] == tuned["pairs"] == 16
    assert tuned["accuracy"] > base["accuracy"] and tuned["margin"] > base["margin"]
    verdict = record["verdict"]
    assert verdict["metric"] == "preference accuracy"
    wins = sum(a and not b for b, a in zip(base["correct"], tuned["correct"]))
    losses = sum(b and not a for b, a in zip(base["correct"], tuned["correct"]))
    assert (verdict["wins"], verdict["losses"]) == (wins, losses)
    assert record["base"]["samples"] == []  # pairs are scored by log-prob, not by generating
    page = (run / "report.html").read_text()
    assert 'id="reward-accuracy-chart"' in page and 'id="reward-margin-chart"' in page
    assert "preference accuracy" in page


def test_dpo_run_plots_the_rewards(dpo_run):
    pytest.importorskip("matplotlib")
    run, _ = dpo_run
    assert (run / "loss.png").stat().st_size > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin"} <= set(lines[-1])
