"""`homebake data check`: the report, marked previews, every skipped line, exit codes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from chat_fixtures import MARKED_TEMPLATES, write_tokenizer_folder

from homebake.cli import main

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tokenizer_folder(tmp_path_factory.mktemp("tok") / "smollm2", "smollm2"))


def chat(question, answer):
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def run(capsys, *argv):
    code = main(["data", "check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_on_a_file_with_every_kind_of_problem(tmp_path, model_dir, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    good = folder / "a.jsonl"
    lines = [chat("Hi", "Hello!"),
             '{"messages": [',                                                      # 2 invalid JSON
             '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}',  # 3 unknown role
             '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',  # 4 empty
             '{"messages": [{"content": "x"}]}',                                     # 5 missing role
             '{"messages": {"role": "user"}}',                                      # 6 wrong type
             chat("Hi", "Hello!"),                                                  # 7 duplicate of 1
             chat("Long", " ".join(["word"] * 300)),                                # 8 too long
             chat("What is 2+2?", "4")]
    good.write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n')  # 10 not UTF-8
    (folder / "b.jsonl").write_bytes(b"")
    (folder / "c.csv").write_text("instruction,output\nSay hi,hi\n")

    code, out, err = run(capsys, folder, "--model", model_dir, "--max-seq-len", "128", "--preview", "2",
                         "--color", "never")
    assert code == 0 and err == ""
    assert f"{good}  format: messages" in out and f"{folder / 'c.csv'}  format: alpaca" in out
    assert "Examples: 11 read, 3 usable, 8 skipped, 1 duplicates removed" in out
    expected_lines = [f"{good}:2: invalid JSON", f"{good}:3: unknown role: message 1: 'bot'",
                      f"{good}:4: empty assistant content", f"{good}:5: missing role", f"{good}:6: wrong type",
                      f"{good}:8: too long", f"{good}:10: not UTF-8", f"{folder / 'b.jsonl'}: empty file",
                      f"{good}:7: duplicate: same as {good}:1"]
    for line in expected_lines:
        assert line in out, line
    assert "1 dropped as too long" in out
    assert re.search(r"Trained tokens: \d+ of \d+ \(\d+\.\d%\)", out)
    assert "median" in out and "#" in out  # length statistics and histogram
    # Preview: trained tokens marked, prompts not.
    assert "[[Hello!<|im_end|>]]" in out and "<|im_start|>assistant\n[[" in out
    assert "[[Hi" not in out and "\x1b[" not in out


def test_colour_on_request_marks_the_same_tokens(tmp_path, model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(chat("Hi", "Hello!") + "\n")
    _, plain, _ = run(capsys, path, "--model", model_dir, "--color", "never")
    _, coloured, _ = run(capsys, path, "--model", model_dir, "--color", "always")
    assert "\x1b[1;32mHello!<|im_end|>\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == plain.replace("[[", "").replace("]]", "").replace(
        "trained tokens between markers", "trained tokens in green, the rest dimmed")


def test_nothing_trainable_exits_non_zero(tmp_path, model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(chat("Long", " ".join(["word"] * 300)) + "\n" + '{"messages": []}\n')
    code, out, err = run(capsys, path, "--model", model_dir, "--max-seq-len", "64")
    assert code != 0
    assert f"{path}:1: too long" in out and f"{path}:2: no messages" in out
    [line] = err.strip().splitlines()
    assert line.startswith("homebake: error: ") and "nothing is trainable" in line and "--max-seq-len" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = run(capsys, empty, "--model", model_dir)
    assert code != 0 and f"{empty}: empty file" in out


def test_strict_fails_on_the_first_bad_line(tmp_path, model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(chat("Hi", "Hello!") + "\n" + "{oops\n" + '{"messages": []}\n')
    code, out, err = run(capsys, path, "--model", model_dir, "--strict")
    assert code != 0 and out == ""
    [line] = err.strip().splitlines()
    assert f"{path}:2: invalid JSON" in line


def test_field_mapping_flags(tmp_path, model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "Hi", "a": "Hello!"}) + "\n")
    code, out, _ = run(capsys, path, "--model", model_dir, "--field", "prompt=q", "--field", "completion=a",
                       "--color", "never")
    assert code == 0 and "format: completion" in out and "[[Hello!<|im_end|>]]" in out
    code, _, err = run(capsys, path, "--model", model_dir, "--field", "prompt")
    assert code != 0 and "--field" in err


@pytest.mark.default_model
def test_default_model_masks_match_transformers_on_the_example_file(default_gguf, tmp_path, capsys):
    """On a real file and the real SmolLM2 tokenizer, the learned tokens are those transformers marks as
    assistant tokens (its template with generation markers), and the ids are identical."""
    from transformers import AutoTokenizer

    from homebake.data import DataConfig, prepare_dataset
    from homebake.model.load import load_tokenizer

    example = Path(__file__).resolve().parents[2] / "examples" / "chat.jsonl"
    tokenizer = load_tokenizer(str(default_gguf))
    prepared = prepare_dataset(DataConfig(paths=[str(example)], validation_fraction=0), tokenizer)
    assert len(prepared.train) >= 5 and not prepared.skipped
    reference = AutoTokenizer.from_pretrained(os.path.dirname(default_gguf), gguf_file=default_gguf.name)
    marked = (MARKED_TEMPLATES / "smollm2-generation.jinja").read_text(encoding="utf-8")
    records = [json.loads(line) for line in example.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record, encoded in zip(records, prepared.train):
        expected = reference.apply_chat_template(record["messages"], chat_template=marked, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        assert encoded.ids == list(expected["input_ids"]), encoded.source
        assert encoded.mask == [bool(x) for x in expected["assistant_masks"]], encoded.source

    code, out, _ = run(capsys, example, "--color", "never", "--preview", "1")
    assert code == 0 and "[[" in out and "format: messages" in out
