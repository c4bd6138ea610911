"""The CLI contract: user errors are one line on stderr, a non-zero exit, no traceback unless --debug."""

import subprocess
import sys

import pytest


def run_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "homebake.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("homebake: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_path_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    proc = run_cli("generate", "--model", str(missing), "--prompt", "hi")
    assert_one_line_error(proc, str(missing))


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--max-new-tokens", "0")])
def test_bad_sampling_settings_name_the_flag(flag, value):
    proc = run_cli("generate", "--prompt", "hi", flag, value)
    assert_one_line_error(proc, flag)


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("setup", "generate", "chat"):
        assert command in proc.stdout


@pytest.mark.default_model
def test_export_accepts_the_default_models_name(default_gguf, tmp_path):
    # `homebake export smollm2-135m-instruct ...` opens the default model like every other command does
    # (it used to be refused as "no such run, adapter or model"); --format peft then refuses a model, by name.
    proc = run_cli("export", "smollm2-135m-instruct", "--format", "peft", "--out", str(tmp_path / "x"), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "homebake export: model smollm2-135m-instruct -> peft" in proc.stderr  # it was opened
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("homebake: error: smollm2-135m-instruct: a model has no adapter") and "--format hf" in error
    assert "no such run" not in proc.stderr and not (tmp_path / "x").exists()
