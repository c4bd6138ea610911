"""Offline by construction: train, eval, compare, export, merge, generate, chat and data check run with every
network path closed (socket connects, DNS, and spawning a downloader), and with the hub's offline switches OFF,
so nothing is quietly avoided by HF_HUB_OFFLINE. Only `homebake setup` (and a hub id the user names) may download."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import pytest
from conftest import report

from homebake.cli import main


class NetworkUsed(BaseException):  # BaseException: no `except Exception` inside homebake can swallow it
    pass


@pytest.fixture
def no_network(monkeypatch):
    attempts: list[str] = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append(f"{what} {args[1:2] or args[:1]}")
            raise NetworkUsed(what)
        return blocked

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads the switch once, at import (after tests/conftest.py turned it on); transformers asks it
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))  # e.g. `pip download`
    return attempts


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model
    from train_helpers import write_chat_jsonl

    # matplotlib builds its font cache with `fc-list` on first import: local, but a subprocess the guard would refuse
    pytest.importorskip("matplotlib.pyplot")
    root = tmp_path_factory.mktemp("offline")
    model = root / "model"
    save_tiny_hf_model(model, "llama_tied", seed=0, max_position_embeddings=512)
    save_byte_tokenizer(model, merges=[("1", "2")])  # GGUF needs a non-empty merges list
    data = write_chat_jsonl(root / "chats.jsonl", 24)
    return root, model, data


def cli(*argv, stdin: str | None = None, monkeypatch=None) -> int:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main([str(a) for a in argv])


def test_every_command_runs_without_the_network(workspace, no_network, monkeypatch, capsys):
    root, model, data = workspace
    run, common = root / "run", ["--model", model, "--device", "cpu"]
    steps = {
        "data check": ["data", "check", data, "--model", model, "--preview", "1", "--max-seq-len", "160"],
        "train": ["train", *common, "--data", data, "--out", run, "--max-steps", "2", "--batch-size", "2",
                  "--max-seq-len", "160", "--lora-r", "2", "--eval-every", "0", "--precision", "fp32", "--no-progress"],
        "eval": ["eval", *common, "--adapter", run, "--data", data, "--max-examples", "2", "--max-new-tokens", "4",
                 "--max-seq-len", "160"],
        "compare": ["compare", *common, "--adapter", run, "--data", data, "--max-examples", "2",
                    "--max-new-tokens", "4", "--max-seq-len", "160"],
        "export gguf": ["export", run, "--model", model, "--format", "gguf", "--quant", "F16", "--out", root / "gguf"],
        "export peft": ["export", run, "--model", model, "--format", "peft", "--out", root / "peft"],
        "merge": ["merge", run, "--model", model, "--out", root / "merged"],
        "generate": ["generate", *common, "--adapter", run, "--prompt", "1+2", "--max-new-tokens", "4",
                     "--temperature", "0"],
    }
    for name, argv in steps.items():
        assert cli(*argv) == 0, f"{name}: {capsys.readouterr().err[-2000:]}"
    assert cli("chat", *common, "--adapter", run, "--max-new-tokens", "4", "--temperature", "0",
               stdin="1+2\n/exit\n", monkeypatch=monkeypatch) == 0, capsys.readouterr().err[-2000:]
    assert no_network == []
    assert (root / "gguf").is_dir() and (root / "merged" / "config.json").is_file()
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    report("offline", f"{len(steps) + 1} commands (data check, train, eval, compare, export gguf/peft, merge, generate, "
                      "chat) ran with sockets, DNS and subprocesses blocked: 0 network attempts")


def test_a_missing_default_model_is_an_error_not_a_download(no_network, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOMEBAKE_CACHE", str(tmp_path / "empty-cache"))
    assert cli("generate", "--prompt", "hi", "--device", "cpu") != 0
    error = capsys.readouterr().err.strip()
    assert "homebake setup" in error and "not on this machine" in error and "\n" not in error
    assert no_network == []


def test_the_guard_does_see_a_download(no_network, tmp_path, monkeypatch):
    # control: an explicitly requested hub model (the one allowed download) does reach for the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NetworkUsed):
        cli("generate", "--model", "someone/some-model", "--prompt", "hi", "--device", "cpu")
    assert no_network
