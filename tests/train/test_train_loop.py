"""The training loop end to end on a tiny random model: accumulation, packing, overfitting, stops, outputs."""

import json
import math

import pytest
import torch

from train_helpers import tiny_config
from homebake.errors import ConfigError
from homebake.train import loop
from homebake.train.checkpoint import TrainerState, list_checkpoints
from homebake.train.data_stream import evaluation_batches
from homebake.train.metrics import read_metrics
from homebake.train.policies import EvalPolicy
from homebake.train.setup import build_model, load_examples
from homebake.train.step import StepRunner


def train_losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_accumulation_2x4_equals_1x8(tiny_model_dir, tiny_data, tmp_path):
    common = dict(max_steps=3, lora={"dropout": 0.0}, data={"validation_fraction": 0.0})
    loop.train(tiny_config(tiny_model_dir, tiny_data, tmp_path / "a", batch_size=8, grad_accum=1, **common))
    loop.train(tiny_config(tiny_model_dir, tiny_data, tmp_path / "b", batch_size=4, grad_accum=2, **common))
    one, two = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(one) == 3
    # Step 1 sees identical weights; later steps also compare the updates (i.e. the gradients).
    assert one == pytest.approx(two, rel=1e-5)
    a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b]
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)


def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, tiny_data, tmp_path):
    config = tiny_config(tiny_model_dir, tiny_data, tmp_path, lora={"dropout": 0.0})
    setup = build_model(config, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # a non-zero adapter, so the adapter path is part of the comparison
        for name, param in setup.trainable.items():
            param.normal_(0, 0.05)
    examples, _, _ = load_examples(config, setup.loaded.tokenizer)
    examples = examples[:12]
    runner = StepRunner(setup.model, setup.head_weight, torch.float32, torch.device("cpu"), 7)
    results = []
    for packing in (True, False):
        batches = evaluation_batches(examples, batch_size=64, max_seq_len=160,
                                     pad_token_id=setup.loaded.tokenizer.pad_token_id, packing=packing)
        assert len(batches) == 1
        if packing:
            assert batches[0].input_ids.shape[0] < len(examples)  # really packed several per row
        setup.model.zero_grad()
        total, count = runner.loss_sum(batches[0])
        total.backward()
        results.append((float(total.detach()), count, {n: p.grad.clone() for n, p in setup.trainable.items()}))
    (packed, n_packed, g_packed), (unpacked, n_unpacked, g_unpacked) = results
    assert n_packed == n_unpacked
    assert packed == pytest.approx(unpacked, rel=1e-5)
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_unpacked[name], rtol=1e-4, atol=1e-6)


def test_lora_with_zero_b_equals_the_base_forward(tiny_model_dir, tiny_data, tmp_path):
    from homebake.model.load import load_model

    config = tiny_config(tiny_model_dir, tiny_data, tmp_path)
    setup = build_model(config, torch.device("cpu"), torch.float32)
    setup.model.eval()
    base = load_model(str(tiny_model_dir)).model.eval()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(setup.model.logits(setup.model(ids)), base.logits(base(ids)), rtol=0, atol=0)


def test_overfitting_a_tiny_batch_drives_the_loss_near_zero(tiny_model_dir, tiny_data, tmp_path):
    from train_helpers import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "four.jsonl", 4, seed=3)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", method="full", max_steps=60, learning_rate=1e-2,
                         schedule="constant", data={"validation_fraction": 0.0})
    result = loop.train(config)
    losses = train_losses(tmp_path / "run")
    assert losses[0] > 2.0
    assert result.last_loss < 0.05, losses[-5:]
    assert (tmp_path / "run" / "model").is_dir()


def test_outputs_validation_and_checkpoint_retention(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=6, eval_every=2, save_every=1,
                                    keep_last=2, data={"validation_fraction": 0.2}))
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"lr", "grad_norm", "tokens_per_s", "rss_gib", "peak_rss_gib"} <= set(train[0])
    assert [r["step"] for r in val] == [0, 2, 4, 6]  # 0: the untrained model
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # learning generalises a little even in 6 steps
    assert result.best_step is not None
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps[-2:] == [5, 6] and len(steps) <= 3 and result.best_step in steps
    for name in ("config.yaml", "loss.png", "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-00000006" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data,
                                                                                  tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_model_dir, tiny_data, out, max_steps=8, learning_rate=1e30, save_every=1,
                         max_grad_norm=0.0, schedule="constant")
    with pytest.raises(loop.TrainingDiverged) as info:
        loop.train(config)
    message = str(info.value)
    assert "became" in message and "last good checkpoint" in message and "\n" not in message
    saved = list_checkpoints(out)
    assert saved, "at least the first step was good and checkpointed"
    from safetensors.torch import load_file

    weights = load_file(str(saved[-1][1] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_time_limit_stops_with_a_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=50, max_minutes=1e-6))
    assert result.stopped == "time_limit" and result.step == 1
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert (out / "adapter_model.safetensors").is_file()


def test_an_existing_run_needs_resume_or_overwrite(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=1))
    with pytest.raises(ConfigError, match="--resume"):
        loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=1))
    loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=1, overwrite=True))


class FakeRunner:
    def __init__(self, losses):
        self.losses = iter(losses)

    def evaluate(self, batches):
        return next(self.losses)


def test_early_stopping_bookkeeping(tiny_model_dir, tiny_data, tmp_path):
    config = tiny_config(tiny_model_dir, tiny_data, tmp_path, early_stopping_patience=2,
                         early_stopping_min_delta=0.01)
    state = TrainerState()

    class Log:
        def write(self, record):
            pass

    improved = []
    for step, _ in enumerate([3.0, 2.5, 2.495, 2.6, 2.0], start=1):
        state.step = step
        improved.append(loop._evaluate(FakeRunner([[3.0, 2.5, 2.495, 2.6, 2.0][step - 1]]), [1], state,
                                       EvalPolicy.from_config(config), Log(), None))
    assert improved == [True, True, False, False, True]
    assert (state.best_step, state.best_val_loss, state.evals_without_improvement) == (5, 2.0, 0)
    assert math.isclose(state.val_loss, 2.0)


def test_gradient_checkpointing_gives_the_same_steps(tiny_model_dir, tiny_data, tmp_path):
    common = dict(max_steps=3, data={"validation_fraction": 0.0})  # dropout on: checkpointing replays its RNG
    loop.train(tiny_config(tiny_model_dir, tiny_data, tmp_path / "plain", **common))
    loop.train(tiny_config(tiny_model_dir, tiny_data, tmp_path / "gc", gradient_checkpointing=True, **common))
    assert train_losses(tmp_path / "gc") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-6)


def test_qlora_trains_over_an_nf4_base(tiny_model_dir, tiny_data, tmp_path):
    from homebake.adapters.lora import lora_modules

    config = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", method="qlora", max_steps=4,
                         data={"validation_fraction": 0.0})
    setup = build_model(config, torch.device("cpu"), torch.float32)
    modules = lora_modules(setup.model)
    assert modules and all(m.weight_nf4 is not None and m.weight is None for m in modules.values())
    result = loop.train(config)
    losses = train_losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file() and result.stopped == "completed"


def test_epoch_limit_covers_the_data_once(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = loop.train(tiny_config(tiny_model_dir, tiny_data, out, max_steps=None, epochs=1.0, grad_accum=2,
                                    batch_size=3, data={"validation_fraction": 0.0}))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert records[-1]["epoch"] == 1.0 and result.step == len(records)
    config = tiny_config(tiny_model_dir, tiny_data, out, batch_size=3, data={"validation_fraction": 0.0})
    setup = build_model(config, torch.device("cpu"), torch.float32)
    examples, _, _ = load_examples(config, setup.loaded.tokenizer)
    rows = evaluation_batches(examples, batch_size=1, max_seq_len=160, pad_token_id=0, packing=True)
    assert sum(r["tokens"] for r in records) == sum(b.num_real_tokens for b in rows)  # every token exactly once
