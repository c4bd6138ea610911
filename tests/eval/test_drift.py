"""Drift: the KL divergence and log-probabilities on hand-made and tiny-model cases, the passes, the bundled set."""

import json
import math

import pytest
import torch

from homebake.drift import (DRIFT_FILE, Instruction, answer_log_probs, base_pass, kl_per_token, load_instructions,
                            summarize, tuned_pass)
from homebake.errors import DataError


def test_kl_on_hand_made_distributions():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]])
    kl = kl_per_token(p.log(), q.log())
    expected = [0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), 0.0, math.log(2)]  # 0 log 0 = 0
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)
    assert kl_per_token(q.log(), p.log())[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    # stored as float16 the base side costs little precision
    assert kl_per_token(p.log(), q.log().half()).tolist() == pytest.approx(expected, abs=1e-3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from homebake.model.load import load_model

    loaded = load_model(str(tiny_model_dir))
    loaded.model.eval()
    return loaded


def test_answer_log_probs_batched_equal_each_sequence_alone(tiny):
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    starts, counts = [2, 1, 4], [3, 2, 3]
    batched = answer_log_probs(tiny.model, sequences, starts, counts, batch_size=2)
    for ids, start, count, got in zip(sequences, starts, counts, batched):
        with torch.inference_mode():
            logits = tiny.model.logits(tiny.model(torch.tensor([ids])))[0]
        expected = torch.log_softmax(logits[start - 1:start - 1 + count].float(), -1)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
        # position start-1 predicts token `start`: the log-prob of the real next tokens
        assert got[0, ids[start]] == pytest.approx(float(expected[0, ids[start]]), abs=1e-5)


def _instructions(n=6):
    return [Instruction(f"x:{i}", [{"role": "user", "content": f"Question number {i}?"}]) for i in range(n)]


def test_the_base_against_itself_has_no_drift(tiny):
    baseline = base_pass(tiny.model, tiny.tokenizer, _instructions(), data="x", max_new_tokens=5, batch_size=4)
    assert all(len(a) + s == lp.shape[0] for a, s, lp in zip(baseline.answers, baseline.stopped, baseline.log_probs))
    assert all(lp.dtype == torch.float16 for lp in baseline.log_probs)
    record = tuned_pass(tiny.model, tiny.tokenizer, baseline, batch_size=3)
    assert record["mean_kl"] == pytest.approx(0.0, abs=2e-3)  # float16 storage of the base side
    assert record["kept_share"] == 1.0 and record["same_share"] == 1.0 and record["level"] == "low"
    assert record["instructions"] == 6 and record["tokens"] == sum(item["tokens"] for item in record["items"])
    assert [item["base"] for item in record["items"]] == [item["fine_tuned"] for item in record["items"]]


def test_a_changed_model_drifts(tiny, tiny_model_dir):
    from homebake.model.load import load_model

    baseline = base_pass(tiny.model, tiny.tokenizer, _instructions(4), data="x", max_new_tokens=5)
    other = load_model(str(tiny_model_dir)).model
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5 * torch.randn_like(param))
    record = tuned_pass(other.eval(), tiny.tokenizer, baseline)
    assert record["mean_kl"] > 0.05
    # the mean is per token over all answers (token-weighted), the items per instruction
    weighted = sum(item["kl"] * item["tokens"] for item in record["items"]) / record["tokens"]
    assert record["mean_kl"] == pytest.approx(weighted, rel=1e-5)


def test_summarize_counts_and_wording():
    items = [{"kept": True, "same": True}, {"kept": True, "same": False}, {"kept": False, "same": False},
             {"kept": True, "same": False}]
    record = summarize(items, 0.25, 40, data="set.jsonl", max_new_tokens=48)
    assert record["kept_share"] == 0.75 and record["same_share"] == 0.25 and record["level"] == "noticeable"
    assert record["reason"] == ("KL 0.250 nats/token on the base's answers to 4 general instructions; 3/4 "
                                "fine-tuned answers the same or keeping the base's key fact (75%), 1 identical")
    assert record["thresholds"] == {"kl_noticeable": 0.1, "kl_high": 0.5, "kept_noticeable": 0.8, "kept_high": 0.5}


def test_the_bundled_set_is_varied_and_ships_with_the_package():
    instructions = load_instructions()
    assert len(instructions) == 50 and len({i.text for i in instructions}) == 50
    kinds = {i.kind for i in instructions}
    assert kinds == {"fact", "how-to", "format"}
    assert all(i.messages[-1]["role"] == "user" for i in instructions)
    root = DRIFT_FILE.parents[2]  # src/homebake/data_files/drift.jsonl -> src
    assert DRIFT_FILE.relative_to(root / "homebake")
    assert '"data_files/*.jsonl"' in (root.parent / "pyproject.toml").read_text()


def test_load_instructions_formats_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "Name a colour.", "system": "Be brief."}),
        json.dumps({"instruction": "Count to three."}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        ""]))
    loaded = load_instructions(path)
    assert [i.messages for i in loaded] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Count to three."}],
        [{"role": "user", "content": "Hi"}]]  # the file's own answer is dropped: the base answers it
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match="no instruction") as error:
        load_instructions(path)
    assert error.value.where == f"{path}:2"
    with pytest.raises(DataError, match="no such drift"):
        load_instructions(tmp_path / "missing.jsonl")
