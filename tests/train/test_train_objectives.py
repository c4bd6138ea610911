"""DPO and ORPO: parity with TRL (test-only reference) on the same logits, the chunked log-probs, per-pair
accumulation, the reference (adapters disabled / frozen copy), and tiny runs with every method."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_config

from homebake.adapters.config import LoraConfig
from homebake.adapters.lora import adapters_disabled, inject_lora, lora_modules, quantize_base_to_nf4
from homebake.data import DataConfig, prepare_dataset
from homebake.data.pack import collate_pairs, pair_row_groups
from homebake.errors import ConfigError
from homebake.model.load import load_model
from homebake.run_folder import read_metrics
from homebake.train.loss import shift_targets
from homebake.train.objectives import DPO, ORPO, dpo_losses, orpo_losses, sequence_logps, token_logps
from homebake.train.step import StepRunner, _accumulate


def write_pairs(path: Path, count: int, seed: int = 0) -> Path:
    """Learnable pairs for a tiny model: the chosen reply ends with '!', the rejected one with '?'."""
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
def tiny_pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 48)


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir, tiny_pairs):
    """The tiny model with LoRA (random B, so policy != reference) and a packed batch of 6 pairs."""
    loaded = load_model(str(tiny_model_dir))
    model = loaded.model
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(std=0.2)
    prepared = prepare_dataset(DataConfig(paths=[str(tiny_pairs)], validation_fraction=0), loaded.tokenizer)
    pairs = prepared.train
    rows = pair_row_groups(pairs[:6], max_seq_len=256, packing=True)
    return model, loaded.tokenizer, pairs, collate_pairs(pairs[:6], rows, loaded.tokenizer.pad_token_id)


def runner_for(model, objective=None) -> StepRunner:
    return StepRunner(model, model.head_weight, torch.float32, torch.device("cpu"), 16, objective=objective)


# ---------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk_rows", [13, 100])  # chunks of several softmax blocks, with a short last one
@pytest.mark.parametrize("callable_head", [False, True])
def test_chunked_token_logps_equal_log_softmax_with_gradients(callable_head, chunk_rows):
    torch.manual_seed(0)
    rows = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    tgt = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    head = (lambda h: h @ weight.t()) if callable_head else weight
    ours = token_logps(rows, tgt, head, chunk_rows=chunk_rows)
    (ours * upstream).sum().backward()
    grads = rows.grad.clone(), weight.grad.clone()
    rows.grad = weight.grad = None
    reference = torch.log_softmax(rows @ weight.t(), dim=-1).gather(1, tgt.unsqueeze(1)).squeeze(1)
    (reference * upstream).sum().backward()
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(grads[0], rows.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-5)


# ---------------------------------------------------------------------------------------------- TRL parity


def _trl_batch(hidden, batch, model):
    """TRL's view of the same logits: per-token log-probs (2P, T) of the replies, chosen rows first, zero at
    untrained positions (TRL sums over the sequence), plus the completion mask."""
    targets = shift_targets(batch.labels, batch.position_ids)
    logps = torch.log_softmax(model.logits(hidden).float(), dim=-1)  # B x T x V: fine for a tiny model
    token = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    n = 2 * batch.num_pairs
    per_seq = [token[(batch.sequence_ids == s) & (targets != -100)] for s in range(n)]
    width = max(len(p) for p in per_seq)
    order = list(range(0, n, 2)) + list(range(1, n, 2))  # TRL's batch is [chosen..., rejected...]
    log_probs = torch.stack([F.pad(per_seq[s], (0, width - len(per_seq[s]))) for s in order])
    mask = torch.stack([F.pad(torch.ones(len(per_seq[s])), (1, width - len(per_seq[s]))) for s in order]).long()
    return log_probs, mask


def trl_dpo_loss(log_probs, completion_mask, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0,
                 loss_type="sigmoid"):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (precomputed reference log-probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, width = ref_chosen.shape[0], log_probs.shape[1]
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2 * pairs, width),
                              mean_logits=torch.zeros(2 * pairs, width),
                              is_top1=torch.zeros(2 * pairs, width, dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * pairs, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * pairs, width + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)


def trainable_grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(ours, theirs, tolerance=1e-5):
    assert ours.keys() == theirs.keys() and ours
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp(min=1e-12)) for k in ours)
    assert worst < tolerance, worst


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_and_gradients_equal_trl(lora_setup, beta, label_smoothing):
    pytest.importorskip("trl")
    model, _, _, batch = lora_setup
    model.zero_grad(set_to_none=True)
    objective = DPO(beta, label_smoothing)
    runner = runner_for(model, objective)
    reference = objective.reference_logps(runner, batch)
    loss_sum, pairs = objective.loss_sum(runner, batch)
    (loss_sum / pairs).backward()
    ours = trainable_grads(model)

    hidden = model(batch.input_ids, position_ids=batch.position_ids)
    log_probs, mask = _trl_batch(hidden, batch, model)
    if label_smoothing == 0.0:
        trl_loss = trl_dpo_loss(log_probs, mask, reference[0::2], reference[1::2], beta=beta)
    else:
        # TRL's "sigmoid" has no label smoothing; its "aot" is -(1-e) log s(b d) - e log s(-b d) on sorted
        # log-ratios, which is exactly cDPO for one pair at a time.
        p = batch.num_pairs
        trl_loss = sum(trl_dpo_loss(log_probs[[i, p + i]], mask[[i, p + i]], reference[2 * i:2 * i + 1],
                                    reference[2 * i + 1:2 * i + 2], beta=beta, label_smoothing=label_smoothing,
                                    loss_type="aot") for i in range(p)) / p
    trl_loss.backward()
    theirs = trainable_grads(model)
    assert abs(float(loss_sum.detach() / pairs) - float(trl_loss.detach())) < 1e-5
    assert_same_grads(ours, theirs)
    assert float(loss_sum.detach() / pairs) != pytest.approx(math.log(2), abs=1e-4)  # policy != reference here


def test_orpo_loss_and_gradients_equal_trl(lora_setup):
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model, _, _, batch = lora_setup
    model.zero_grad(set_to_none=True)
    lam = 0.25
    objective = ORPO(lam)
    runner = runner_for(model, objective)
    loss_sum, pairs = objective.loss_sum(runner, batch)
    (loss_sum / pairs).backward()
    ours = trainable_grads(model)

    hidden = model(batch.input_ids, position_ids=batch.position_ids)
    log_probs, mask = _trl_batch(hidden, batch, model)
    p = batch.num_pairs
    counts = mask[:, 1:].sum(dim=1)
    means = log_probs.sum(dim=1) / counts
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(stub, means[:p], means[p:])
    # TRL's NLL is the chosen side's cross entropy averaged over the batch's tokens; ours averages per pair,
    # so the two agree pair by pair: compare with TRL's reduction applied to each pair's reply.
    nll = torch.stack([-log_probs[i, :counts[i]].mean() for i in range(p)])
    trl_loss = (nll - ratio_losses).mean()
    trl_loss.backward()
    theirs = trainable_grads(model)
    assert abs(float(loss_sum.detach() / pairs) - float(trl_loss.detach())) < 1e-5
    assert_same_grads(ours, theirs)


def test_orpo_odds_ratio_equals_trl_on_extreme_log_probs():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -2.0, -15.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -0.31, -5.0, -0.69, -1e-3, -14.0], requires_grad=True)
    losses, *_ = orpo_losses(chosen, rejected, lam=0.1)
    (losses + chosen).sum().backward()  # the odds-ratio term alone: ORPO's loss minus its NLL (-chosen)
    ours = chosen.grad.clone(), rejected.grad.clone()
    chosen.grad = rejected.grad = None
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, *_ = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    (-theirs).sum().backward()
    assert torch.allclose(losses + chosen.detach(), -theirs.detach(), atol=1e-6)
    assert torch.allclose(ours[0], chosen.grad, atol=1e-6) and torch.allclose(ours[1], rejected.grad, atol=1e-6)


def test_dpo_rewards_and_label_smoothing_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.0))
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    delta = 0.5 * ((-3 + 5) - 0)
    expected = -0.9 * math.log(1 / (1 + math.exp(-delta))) - 0.1 * math.log(1 / (1 + math.exp(delta)))
    assert float(losses) == pytest.approx(expected) and float(chosen) == 0.5 and float(rejected) == -0.5


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapters_disabled_is_the_base_model(tiny_model_dir, method):
    loaded = load_model(str(tiny_model_dir))
    model = loaded.model.eval()
    if method == "qlora":
        quantize_base_to_nf4(model, "all-linear")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        base = model.logits(model(ids))
    inject_lora(model, LoraConfig(r=4, alpha=8, use_dora=method == "dora"))
    model.eval()  # no adapter dropout
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(std=0.5)
            if module.lora_magnitude is not None:
                module.lora_magnitude.mul_(1.5)
        tuned = model.logits(model(ids))
        with adapters_disabled(model):
            reference = model.logits(model(ids))
        again = model.logits(model(ids))
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert torch.equal(again, tuned)  # adapters back on after the block


# ---------------------------------------------------------------------------------------------- accumulation


def test_accumulation_over_pairs_equals_one_big_batch(lora_setup):
    model, tokenizer, pairs, _ = lora_setup
    params = [p for p in model.parameters() if p.requires_grad]
    first, second = pairs[:3], pairs[3:8]  # 3 + 5 pairs: unequal micro-batches
    micro = [collate_pairs(first, [[i] for i in range(3)], tokenizer.pad_token_id),
             collate_pairs(second, [[i] for i in range(5)], tokenizer.pad_token_id)]
    whole = [collate_pairs(pairs[:8], [[i] for i in range(8)], tokenizer.pad_token_id)]
    results = []
    for batches in (micro, whole):
        for objective in (DPO(0.1), ORPO(0.1)):
            model.zero_grad(set_to_none=True)
            loss, _, _, _ = _accumulate(runner_for(model, objective), batches, params, max_grad_norm=0)
            results.append((loss, [p.grad.clone() for p in params], objective.take_stats()))
    for a, b in ((results[0], results[2]), (results[1], results[3])):
        assert a[0] == pytest.approx(b[0], abs=1e-6)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a[1], b[1]))
        assert a[2] == pytest.approx(b[2], abs=1e-5)  # the metrics are means over the same 8 pairs
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- runs


def held_out_accuracy(out: Path) -> tuple[float, float]:
    vals = [r for r in read_metrics(out) if "val_reward_accuracy" in r]
    return vals[0]["val_reward_accuracy"], vals[-1]["val_reward_accuracy"]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_tiny_run_raises_held_out_reward_accuracy(tiny_model_dir, tmp_path, objective):
    from homebake.train.loop import train

    train_file = write_pairs(tmp_path / "train.jsonl", 64, seed=1)
    held_out = write_pairs(tmp_path / "held.jsonl", 16, seed=2)
    config = tiny_config(tiny_model_dir, train_file, tmp_path / objective, objective=objective, max_steps=16,
                         eval_every=8, learning_rate=1e-2, orpo_lambda=1.0,
                         data={"validation": str(held_out)})
    result = train(config)
    before, after = held_out_accuracy(tmp_path / objective)
    assert after >= 0.9 and after > before
    records = read_metrics(tmp_path / objective)
    step_lines = [r for r in records if "loss" in r]
    for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert all(key in r for r in step_lines)
    assert all(k in records[-1] for k in ("val_loss", "val_reward_accuracy", "val_reward_margin"))
    if objective == "dpo":
        assert records[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # untrained policy == reference
        assert result.val_loss < math.log(2)


@pytest.mark.parametrize("method", ["full", "dora", "qlora"])
def test_dpo_runs_with_every_method(tiny_model_dir, tiny_pairs, tmp_path, method):
    from homebake.train.loop import train
    from homebake.train.objectives import DPO as DPOClass
    from homebake.train.setup import setup_training

    config = tiny_config(tiny_model_dir, tiny_pairs, tmp_path / method, objective="dpo", method=method, max_steps=2,
                         learning_rate=1e-3 if method == "full" else 3e-3)
    if method == "full":
        setup = setup_training(config)
        objective = setup.runner.objective
        assert isinstance(objective, DPOClass) and objective.reference_model is not None
        frozen = {k: v.clone() for k, v in objective.reference_model.state_dict().items()}
        assert not any(p.requires_grad for p in objective.reference_model.parameters())
        config = tiny_config(tiny_model_dir, tiny_pairs, tmp_path / "full-run", objective="dpo", method=method,
                             max_steps=2, learning_rate=1e-3)
    result = train(config)
    assert result.step == 2 and math.isfinite(result.last_loss)
    if method == "full":
        assert all(torch.equal(frozen[k], v) for k, v in objective.reference_model.state_dict().items())


def test_objective_and_data_must_match(tiny_model_dir, tiny_pairs, tiny_data, tmp_path):
    from homebake.train.setup import setup_training

    with pytest.raises(ConfigError, match="needs preference pairs"):
        setup_training(tiny_config(tiny_model_dir, tiny_data, tmp_path / "a", objective="dpo"))
    with pytest.raises(ConfigError, match="--objective dpo or --objective orpo"):
        setup_training(tiny_config(tiny_model_dir, tiny_pairs, tmp_path / "b"))
    with pytest.raises(ConfigError, match="objective"):
        tiny_config(tiny_model_dir, tiny_pairs, tmp_path / "c", objective="ppo").validate()


def test_full_dpo_plan_counts_the_reference(tiny_model_dir):
    from homebake.train.plan import estimate_memory

    model = load_model(str(tiny_model_dir)).model
    sizes = dict(hidden_size=64, intermediate_size=128, num_layers=2, vocab_size=300, tokens_per_micro_batch=64,
                 activation_bytes=4, gradient_checkpointing=False, adapter_dropout=False, head_chunk_rows=16)
    plain = estimate_memory(model, **sizes)
    with_reference = estimate_memory(model, reference_bytes=1234, **sizes)
    assert with_reference.total - plain.total == 1234 and "DPO reference" in with_reference.describe()
