"""prepare_dataset end to end: every input kind and format trains the same ids and mask; splits, dedup,
length policy and strictness are counted and reported."""

from __future__ import annotations

import csv
import json

import pytest
from chat_fixtures import family_tokenizer

from homebake.data import DataConfig, prepare_dataset
from homebake.data.formats import RecordError

SYSTEM, USER, ANSWER = "Be brief.", "Name a colour.", "Blue."


def same_example_everywhere(tmp_path):
    """One conversation written in every format and file kind."""
    files = {}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                {"role": "assistant", "content": ANSWER}]
    files["messages.jsonl"] = tmp_path / "messages.jsonl"
    files["messages.jsonl"].write_text(json.dumps({"messages": messages}) + "\n")
    files["sharegpt.json"] = tmp_path / "sharegpt.json"
    files["sharegpt.json"].write_text(json.dumps([{"conversations": [
        {"from": "system", "value": SYSTEM}, {"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]}]))
    files["alpaca.csv"] = tmp_path / "alpaca.csv"
    with open(files["alpaca.csv"], "w", newline="") as handle:
        csv.writer(handle).writerows([["system", "instruction", "input", "output"], [SYSTEM, USER, "", ANSWER]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    files["completion.parquet"] = tmp_path / "completion.parquet"
    pq.write_table(pa.Table.from_pylist([{"system": SYSTEM, "prompt": USER, "completion": ANSWER}]),
                   files["completion.parquet"])
    return files


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen2.5", "mistral"])
def test_every_format_trains_the_same_ids_and_mask(tmp_path, family):
    tokenizer = family_tokenizer(family)
    results = {}
    for name, path in same_example_everywhere(tmp_path).items():
        prepared = prepare_dataset(DataConfig(paths=[str(path)], validation_fraction=0), tokenizer)
        assert not prepared.skipped, name
        [encoded] = prepared.train
        results[name] = (encoded.ids, encoded.mask)
    first = next(iter(results.values()))
    assert all(value == first for value in results.values())
    assert any(first[1]) and not all(first[1])


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat(i, answer="ok"):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}


def test_validation_file_and_dedup_across_splits(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [chat(0), chat(1), chat(1), chat(2), chat(3)])
    valid = write_lines(tmp_path / "valid.jsonl", [chat(3), chat(9)])
    prepared = prepare_dataset(DataConfig(paths=[train], validation=valid), family_tokenizer("smollm2"))
    assert [e.source.rsplit(":", 1)[1] for e in prepared.train] == ["1", "2", "4"]
    assert [e.source for e in prepared.validation] == [f"{valid}:1", f"{valid}:2"]
    assert [(d.source, d.detail) for d in prepared.duplicates] == [
        (f"{train}:3", f"same as {train}:2"), (f"{train}:5", f"same as {valid}:1")]
    assert prepared.validation_source == "file"
    kept_all = prepare_dataset(DataConfig(paths=[train], validation=valid, dedup=False), family_tokenizer("smollm2"))
    assert len(kept_all.train) == 5 and not kept_all.duplicates


def test_validation_fraction_is_seeded(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [chat(i) for i in range(40)])
    tokenizer = family_tokenizer("smollm2")
    a = prepare_dataset(DataConfig(paths=[train], validation_fraction=0.1, seed=3), tokenizer)
    b = prepare_dataset(DataConfig(paths=[train], validation_fraction=0.1, seed=3), tokenizer)
    c = prepare_dataset(DataConfig(paths=[train], validation_fraction=0.1, seed=4), tokenizer)
    sources = lambda p: [e.source for e in p.validation]  # noqa: E731
    assert len(a.validation) == 4 and len(a.train) == 36 and a.validation_source == "fraction"
    assert sources(a) == sources(b) != sources(c)


def test_length_policy_is_counted_and_nothing_trainable_is_visible(tmp_path):
    long_answer = " ".join(["blue"] * 200)
    path = write_lines(tmp_path / "d.jsonl", [chat(0), chat(1, long_answer), chat(2, long_answer)])
    tokenizer = family_tokenizer("smollm2")
    dropped = prepare_dataset(DataConfig(paths=[path], max_seq_len=64, validation_fraction=0), tokenizer)
    assert len(dropped.train) == 1 and dropped.skip_counts() == {"too long": 2}
    assert "skipped 2 (too long 2" in dropped.summary() and "\n" not in dropped.summary()
    cut = prepare_dataset(DataConfig(paths=[path], max_seq_len=64, truncation="truncate", validation_fraction=0),
                          tokenizer)
    assert len(cut.train) == 3 and sum(1 for e in cut.train if e.truncated_tokens) == 2
    assert all(len(e.ids) <= 64 for e in cut.train) and "2 truncated" in cut.summary()
    # Everything too long, or truncated before any reply: no training example, each one explained.
    none = prepare_dataset(DataConfig(paths=[path], max_seq_len=20, truncation="truncate", validation_fraction=0),
                           tokenizer)
    assert none.train == [] and none.skip_counts() == {"no trained tokens": 3}


def test_strict_stops_at_the_first_problem(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(0), {"messages": []}, {"messages": "x"}])
    with pytest.raises(RecordError) as caught:
        prepare_dataset(DataConfig(paths=[path], strict=True), family_tokenizer("smollm2"))
    assert caught.value.where == f"{path}:2"
    long_answer = " ".join(["blue"] * 200)
    path = write_lines(tmp_path / "long.jsonl", [chat(0), chat(1, long_answer)])
    with pytest.raises(RecordError, match="too long"):
        prepare_dataset(DataConfig(paths=[path], strict=True, max_seq_len=64), family_tokenizer("smollm2"))


def test_config_rejects_bad_settings():
    from homebake.errors import ConfigError

    for bad in ({"train_on": "prompts"}, {"truncation": "cut"}, {"max_seq_len": 1}, {"validation_fraction": 1.0},
                {"fields": {"msgs": "x"}}, {"roles": {"bot": "robot"}}):
        with pytest.raises(ConfigError) as caught:
            DataConfig(**bad)
        assert str(caught.value).startswith(f"data.{next(iter(bad))}")
    with pytest.raises(ConfigError, match="unknown setting"):
        DataConfig.from_dict({"max_len": 5})
    assert set(DataConfig.help()) == {f for f in DataConfig.__dataclass_fields__}
