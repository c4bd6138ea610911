"""Defaults chosen from the data: max_seq_len from the longest example, epochs for enough optimizer steps."""

from __future__ import annotations

import math

import pytest
import yaml

from homebake.data.config import AUTO_MAX_SEQ_LEN, DataConfig
from homebake.train.defaults import MAX_AUTO_EPOCHS, MIN_AUTO_STEPS, resolve_epochs, resolve_max_seq_len
from train_helpers import make_tiny_model_dir, tiny_config, write_chat_jsonl


class _Example:
    def __init__(self, length):
        self.ids = [0] * length


def _config(tmp_path, **data):
    from homebake.train.config import TrainConfig

    return TrainConfig(data=DataConfig(paths=["x.jsonl"], **data), out=str(tmp_path / "run"))


@pytest.mark.parametrize("longest, context, expected", [
    (60, 2048, 64), (64, 2048, 64), (65, 2048, 128), (1, 2048, 64), (3000, 2048, 2048), (9000, 32768, 4096)])
def test_max_seq_len_is_the_longest_example_rounded_up_within_the_caps(tmp_path, longest, context, expected):
    config = _config(tmp_path)
    assert config.data.encoding_limit(context) == min(context, AUTO_MAX_SEQ_LEN)
    reason = resolve_max_seq_len(config, [_Example(1), _Example(longest)], context)
    assert config.data.max_seq_len == expected
    assert f"longest example has {longest} tokens" in reason and f"at most {min(context, 4096)}" in reason


def test_an_explicit_max_seq_len_is_kept(tmp_path):
    config = _config(tmp_path, max_seq_len=2048)
    assert resolve_max_seq_len(config, [_Example(60)], 8192) is None
    assert config.data.max_seq_len == 2048


@pytest.mark.parametrize("batches, accum, expected", [(6, 1, 5), (26, 1, 3), (30, 1, 2), (60, 1, 1), (500, 1, 1),
                                                      (40, 4, 5), (1, 1, 5)])
def test_epochs_give_small_data_enough_steps_within_the_cap(tmp_path, batches, accum, expected):
    config = _config(tmp_path)
    config.grad_accum = accum
    reason = resolve_epochs(config, batches)
    assert config.epochs == expected
    steps = math.ceil(expected * batches / accum)
    assert steps >= MIN_AUTO_STEPS or expected == MAX_AUTO_EPOCHS
    assert f"epochs {expected}" in reason


def test_explicit_epochs_are_kept(tmp_path):
    config = _config(tmp_path)
    config.epochs = 1.5
    assert resolve_epochs(config, 6) is None and config.epochs == 1.5


def test_a_run_with_only_data_uses_and_saves_the_resolved_defaults(tmp_path, capsys):
    from homebake.train.loop import train

    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "train.jsonl", 48)
    config = tiny_config(model_dir, data, tmp_path / "run", max_steps=None, data={"max_seq_len": None})
    result = train(config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # byte tokenizer: ChatML around "add", "a+b", "sum" is well under 64 tokens
    assert saved["data"]["max_seq_len"] == 64
    assert saved["epochs"] == MAX_AUTO_EPOCHS  # 48 short examples in 64-token rows: far fewer than 60 steps/epoch
    err = capsys.readouterr().err
    assert "chosen from the data: max_seq_len 64" in err and f"chosen from the data: epochs {MAX_AUTO_EPOCHS}" in err
    assert result.planned_gib is not None and result.peak_memory_gib > 0
