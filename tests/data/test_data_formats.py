"""Reading every input kind and normalising every format to the same conversation; bad input is reported."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from homebake.data.formats import (Conversation, FieldNames, RecordError, SkipLog, detect_format,
                                   load_conversations, parse_record)
from homebake.errors import DataError, HomebakeError

SYSTEM, USER, ANSWER = "You are terse.", "What is 2+2?", "4."
EXPECTED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER}]

# The same conversation in every chat format.
SAME_CONVERSATION = {
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": USER},
                                   {"from": "gpt", "value": ANSWER}]},
    "alpaca": {"system": SYSTEM, "instruction": USER, "input": "", "output": ANSWER},
    "completion": {"system": SYSTEM, "prompt": USER, "completion": ANSWER},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(*paths, **kwargs):
    log = SkipLog(strict=kwargs.pop("strict", False))
    result = load_conversations([str(p) for p in paths], log=log, **kwargs)
    return result, log


@pytest.mark.parametrize("fmt", sorted(SAME_CONVERSATION))
def test_every_chat_format_normalises_to_the_same_messages(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [SAME_CONVERSATION[fmt]])
    result, log = load(path)
    assert not log.items
    assert result.formats == {str(path): fmt}
    [conversation] = result.conversations
    assert conversation.messages == EXPECTED
    assert conversation.source == f"{path}:1"


def test_alpaca_input_is_appended_to_the_instruction():
    conv = parse_record({"instruction": "Translate.", "input": "chat", "output": "cat"}, "auto", "x:1")
    assert conv.messages == [{"role": "user", "content": "Translate.\n\nchat"},
                             {"role": "assistant", "content": "cat"}]


def test_text_format_keeps_the_text():
    conv = parse_record({"text": "Once upon a time."}, "auto", "x:1")
    assert conv.is_text and conv.text == "Once upon a time." and conv.messages == []


def test_openai_content_parts_and_tools_are_kept():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "add "}, {"type": "text", "text": "1 and 2"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "call12345"},
        {"role": "assistant", "content": "3"}]}
    conv = parse_record(record, "auto", "x:1")
    assert conv.tools == tools
    assert conv.messages[0]["content"] == "add 1 and 2"
    assert conv.messages[1]["content"] == "" and conv.messages[1]["tool_calls"]
    assert conv.messages[2] == {"role": "tool", "content": "3", "tool_call_id": "call12345"}


def test_prompt_completion_may_hold_message_lists():
    record = {"prompt": [{"role": "user", "content": USER}], "completion": [{"role": "assistant", "content": ANSWER}]}
    assert parse_record(record, "auto", "x:1").messages == EXPECTED[1:]


def test_field_and_role_mapping(tmp_path):
    record = {"dialog": [{"speaker": "customer", "text": USER}, {"speaker": "bot", "text": ANSWER}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    result, log = load(path, fields={"messages": "dialog", "role": "speaker", "content": "text"},
                       roles={"customer": "user", "bot": "assistant"})
    assert not log.items
    assert result.conversations[0].messages == EXPECTED[1:]


def test_format_is_detected_per_file_in_a_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [SAME_CONVERSATION["alpaca"]])
    write_jsonl(folder / "sub" / "b.jsonl", [SAME_CONVERSATION["sharegpt"]])
    write_jsonl(folder / ".hidden.jsonl", [{"garbage": 1}])
    (folder / "notes.txt").write_text("ignored")
    result, log = load(folder)
    assert not log.items
    assert list(result.formats.values()) == ["alpaca", "sharegpt"]
    assert [c.messages for c in result.conversations] == [EXPECTED, EXPECTED]


def records_for_each_file_kind(tmp_path):
    """The same three examples as JSONL, JSON array, JSON object, CSV and Parquet."""
    records = [SAME_CONVERSATION["alpaca"], {**SAME_CONVERSATION["alpaca"], "output": "Four."},
               {**SAME_CONVERSATION["alpaca"], "instruction": "Say hi", "input": "politely"}]
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    paths["json_array"] = tmp_path / "array.json"
    paths["json_array"].write_text(json.dumps(records, indent=2))
    paths["json_object"] = tmp_path / "object.json"
    paths["json_object"].write_text(json.dumps({"version": 1, "data": records}))
    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    return records, paths


def test_every_file_kind_yields_the_same_conversations(tmp_path):
    records, paths = records_for_each_file_kind(tmp_path)
    expected = [parse_record(r, "auto", "x").messages for r in records]
    for kind, path in paths.items():
        result, log = load(path)
        assert not log.items, kind
        assert [c.messages for c in result.conversations] == expected, kind
    # Array items keep their line numbers; object lists name the key and index.
    array_sources = [c.source for c in load(paths["json_array"])[0].conversations]
    text = paths["json_array"].read_text().splitlines()
    for source in array_sources:
        line = int(source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"
    assert load(paths["json_object"])[0].conversations[1].source.endswith("object.json:data[1]")
    assert load(paths["csv"])[0].conversations[2].source.endswith("d.csv:4")
    assert load(paths["parquet"])[0].conversations[0].source.endswith("d.parquet:row 1")


def test_hub_dataset_id_reads_the_local_datasets_cache(tmp_path, monkeypatch):
    """The hub path, offline: a dataset already in the `datasets` cache loads by its id."""
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json

    records = [SAME_CONVERSATION["messages"], {"messages": EXPECTED[1:]}]
    source = write_jsonl(tmp_path / "train.jsonl", records)
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    builder = Json(cache_dir=str(cache), dataset_name="tiny-chat", hash="0123abcd",
                   data_files={"train": str(source)})
    builder.download_and_prepare()
    # Lay the prepared files out where `datasets` looks for a cached hub dataset someone/tiny-chat.
    (cache / "someone___tiny-chat").mkdir()
    [config_dir] = (cache / "tiny-chat").iterdir()
    shutil.move(str(config_dir), str(cache / "someone___tiny-chat" / "default"))

    result, log = load("someone/tiny-chat")
    assert not log.items
    assert [c.messages for c in result.conversations] == [EXPECTED, EXPECTED[1:]]
    assert result.conversations[1].source == "someone/tiny-chat[train]:row 2"
    assert load("hf:someone/tiny-chat")[0].formats == {"someone/tiny-chat": "messages"}


def test_unknown_hub_dataset_is_a_clear_error():
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="nobody/nothing"):
        load("nobody/nothing")


# ---------------------------------------------------------------------------------------------------
# Bad input: skipped with file:line and a per-reason count; strict stops at the first.

GOOD = json.dumps(SAME_CONVERSATION["messages"])
BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ('["not", "an", "object"]', "wrong type"),
    ('{"messages": "hello"}', "wrong type"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "missing role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "wrong type"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "empty assistant content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "starts with assistant"),
    ('{"messages": []}', "no messages"),
]


def test_bad_lines_are_skipped_with_file_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [GOOD] + [line for line, _ in BAD_LINES] + [GOOD]
    raw = "\n".join(lines).encode() + b"\n" + b'{"messages": "caf\xe9"}\n'  # latin-1 byte: not UTF-8
    path.write_bytes(raw)
    result, log = load(path)
    assert len(result.conversations) == 2
    expected = [(f"{path}:{i + 2}", kind) for i, (_, kind) in enumerate(BAD_LINES)]
    expected.append((f"{path}:{len(lines) + 1}", "not UTF-8"))
    assert [(s.source, s.kind) for s in log.items] == expected
    assert log.counts()["wrong type"] == 3
    assert "column" in log.items[0].detail  # invalid JSON says where on the line
    assert "wizard" in log.items[5].detail


def test_missing_alpaca_field_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [SAME_CONVERSATION["alpaca"], {"instruction": "x", "input": ""},
                                              {"instruction": "x", "output": ""}])
    _, log = load(path, fmt="alpaca")
    assert [(s.source.rsplit(":", 1)[1], s.kind) for s in log.items] == [
        ("2", "missing field"), ("3", "empty assistant content")]
    assert "'output'" in log.items[0].detail


def test_strict_raises_the_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + '{"messages": [{"role": "wizard", "content": "hi"}]}\n' + "{oops\n")
    with pytest.raises(RecordError) as caught:
        load(path, strict=True)
    assert caught.value.where == f"{path}:2" and caught.value.kind == "unknown role"
    assert "\n" not in str(caught.value) and "data.roles" in str(caught.value)


def test_empty_and_whitespace_files_are_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.json").write_text("\n  \n")
    result, log = load(tmp_path / "empty.jsonl", tmp_path / "blank.json")
    assert result.conversations == []
    assert [(s.source, s.kind) for s in log.items] == [(str(tmp_path / "empty.jsonl"), "empty file"),
                                                       (str(tmp_path / "blank.json"), "empty file")]


def test_broken_json_file_reports_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  ,,\n]')
    result, log = load(path)
    assert [c.text for c in result.conversations] == ["a"]
    assert log.items[0].kind == "invalid JSON" and log.items[0].source == f"{path}:4"


def test_non_utf8_json_file_and_csv_row(tmp_path):
    bad_json = tmp_path / "d.json"
    bad_json.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]')
    _, log = load(bad_json)
    assert (log.items[0].source, log.items[0].kind) == (f"{bad_json}:3", "not UTF-8")
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_bytes(b"prompt,completion\nhi,there\ncaf\xe9,x\nyo,lo\n")
    result, log = load(bad_csv)
    assert [c.messages[0]["content"] for c in result.conversations] == ["hi", "yo"]
    assert [(s.source, s.kind) for s in log.items] == [(f"{bad_csv}:3", "not UTF-8")]


def test_unrecognised_records_and_missing_paths(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    _, log = load(path)
    assert log.items[0].kind == "unrecognised example" and "question" in log.items[0].detail
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load(tmp_path / "d.txt")


def test_detect_format_respects_the_field_mapping():
    assert detect_format({"question": "q", "answer": "a"}) is None
    names = FieldNames({"instruction": "question", "output": "answer"})
    assert detect_format({"question": "q", "answer": "a"}, names) == "alpaca"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "text"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "tools", "system",
                         "instruction", "input", "output", "prompt", "completion", "text", "tool_calls",
                         "type", "other"]), children, max_size=5),
    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(value=json_values, fmt=st.sampled_from(["auto", "messages", "sharegpt", "alpaca", "completion", "text"]))
def test_parser_returns_a_conversation_or_a_homebake_error(value, fmt):
    try:
        result = parse_record(value, fmt, "f.jsonl:1")
    except HomebakeError as error:
        assert error.where == "f.jsonl:1" and "\n" not in str(error)
    else:
        assert isinstance(result, Conversation)
        assert result.is_text or any(m["role"] == "assistant" for m in result.messages)
        result.key()  # serialisable for deduplication


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_reading_arbitrary_bytes_reports_or_skips(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"d{suffix}"
    path.write_bytes(data)
    try:
        result, log = load(path)
    except HomebakeError as error:
        assert "\n" not in str(error)
    else:
        assert all(isinstance(c, Conversation) for c in result.conversations)
        assert all(item.source.startswith(str(path)) for item in log.items)
