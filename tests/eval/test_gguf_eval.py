"""The verdict on the exported file: a GGUF scored through llama.cpp's own runtime and chat handling.

The llama.cpp tests need llama-cpp-python (the optional `llamacpp` extra; CI builds it) and skip without it;
without it `compare --gguf` says in one line how to install it.
"""

import json
import subprocess
import sys

import pytest

from homebake import gguf_eval
from homebake.cli import main
from homebake.errors import HomebakeError

needs_llama_cpp = pytest.mark.skipif(not gguf_eval.available(),
                                     reason="llama-cpp-python is not installed (optional extra `llamacpp`)")


def _compare_args(tiny_model_dir, run, extract_dir, gguf_file, *extra):
    return ["compare", "--model", str(tiny_model_dir), "--adapter", str(run), "--data",
            str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "8", "--shots", "0",
            "--no-drift", "--gguf", str(gguf_file), *extra]


def test_without_llama_cpp_compare_says_how_to_install_it(tiny_model_dir, tiny_run, extract_dir, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setattr(gguf_eval, "llama_cpp_module", lambda: None)
    assert main(_compare_args(tiny_model_dir, tiny_run, extract_dir, tmp_path / "x.gguf", "--out",
                              str(tmp_path / "out"), "--generate", "2")) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "llama-cpp-python is not installed" in line]
    assert len(notes) == 1 and 'pip install "homebake[llamacpp]"' in notes[0] and "-DGGML_NATIVE=OFF" in notes[0]
    record = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert record["gguf"] is None
    assert "homebake[llamacpp]" in (tmp_path / "out" / "report.html").read_text()
    with pytest.raises(HomebakeError) as error:  # asking llama.cpp directly: a one-line error with the fix
        gguf_eval.chat_answers(str(tmp_path / "x.gguf"), [], 4)
    assert "\n" not in str(error.value) and "homebake[llamacpp]" in str(error.value)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-eval") / "gguf"
    # F32: llama.cpp then computes what homebake computes (quantised matmuls would quantise activations)
    assert main(["export", str(tiny_run), "--format", "gguf", "--quant", "F32", "--out", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    return path


@needs_llama_cpp
def test_llama_cpp_answers_like_homebake_on_the_same_prompts(tiny_model_dir, tiny_run, extract_dir, exported):
    from homebake.evaluate import EvalOptions, evaluate_gguf, evaluate_model, load_eval_data
    from homebake.sources import open_model

    subject = open_model(str(tiny_model_dir), str(tiny_run), device="cpu", dtype="fp32")
    subject.use_tuned()
    loaded = subject.loaded
    data = load_eval_data(str(extract_dir / "test.jsonl"), loaded.tokenizer, EvalOptions())
    options = EvalOptions(max_new_tokens=10)
    ours = evaluate_model(loaded.model, loaded.tokenizer, data, options)
    theirs = evaluate_gguf(exported, data, loaded.tokenizer, options, threads=1)
    # llama.cpp rendered the same prompt from the file's own template: the same number of tokens per request
    assert theirs.prompt_tokens_per_request == ours.prompt_tokens_per_request
    assert theirs.loss is None and theirs.task.count == ours.task.count == 6
    # ... and, from the same fp32 weights, the same greedy answers (llama-cpp-python drops invalid UTF-8 bytes
    # where homebake shows U+FFFD)
    same = sum(a["output"].replace("\ufffd", "").strip() == b["output"]
               for a, b in zip(ours.samples, theirs.samples))
    assert same >= 5, [(a["output"], b["output"]) for a, b in zip(ours.samples, theirs.samples)]
    assert theirs.stopped_share == ours.stopped_share


@needs_llama_cpp
def test_compare_scores_the_gguf_side_by_side(tiny_model_dir, tiny_run, extract_dir, exported, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_compare_args(tiny_model_dir, tiny_run, extract_dir, exported, "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "exported GGUF: " in printed and "in llama.cpp (llama-cpp-python" in printed
    record = json.loads((out / "compare.json").read_text())
    gguf = record["gguf"]
    assert set(record["fine_tuned"]) <= set(gguf)  # the same metric keys as the other systems
    assert gguf["file"] == str(exported) and gguf["runtime"].startswith("llama.cpp (llama-cpp-python")
    assert 0 <= gguf["same_answers"] <= 6 and gguf["verdict"]["label"] in ("kept", "lost")
    page = (out / "report.html").read_text()
    assert 'id="gguf-table"' in page and "Exported file:" in page


@needs_llama_cpp
def test_a_broken_gguf_is_a_one_line_error(tiny_model_dir, tiny_run, extract_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = subprocess.run([sys.executable, "-m", "homebake.cli",
                           *_compare_args(tiny_model_dir, tiny_run, extract_dir, bad, "--generate", "1")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "llama.cpp cannot load the file" in proc.stderr and str(bad) in proc.stderr


@needs_llama_cpp
@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_gguf_in_llama_cpp_renders_the_same_prompts(default_gguf, extract_dir, tmp_path):
    """On the real model (Q8_0): llama.cpp's chat handling builds the same prompts as homebake's template."""
    from homebake.evaluate import EvalOptions, evaluate_gguf, load_eval_data
    from homebake.model.load import load_model

    out = tmp_path / "gguf"
    assert main(["export", str(default_gguf), "--format", "gguf", "--quant", "Q8_0", "--out", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    tokenizer = load_model(str(path)).tokenizer
    data = load_eval_data(str(extract_dir / "test.jsonl"), tokenizer, EvalOptions(max_examples=3))
    options = EvalOptions(max_new_tokens=16)
    result = evaluate_gguf(path, data, tokenizer, options, threads=2)
    from homebake.evaluate import prompt_ids

    expected = sum(len(prompt_ids(tokenizer, e)) for e in data.examples) / 3
    assert result.prompt_tokens_per_request == expected
    assert result.task.count == 3 and all(s["output"] for s in result.samples)
