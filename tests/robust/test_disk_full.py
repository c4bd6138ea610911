"""Disk full (ENOSPC injected at the write calls) while writing a checkpoint, the metrics, the final adapter, an
export or a GGUF: a one-line error naming the path, the previous checkpoint / export intact, no temporaries left,
and `--resume` finishing the run exactly as an uninterrupted one once there is space again."""

from __future__ import annotations

import hashlib

import pytest
from conftest import report
from faults import DiskFull
from safetensors.torch import load_file

from homebake.cli import main
from homebake.run_folder import leftovers, list_checkpoints, read_metrics
from homebake.train.checkpoint import load_trainer_state

STEPS = 6
RESULTS: dict[str, bool] = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model
    from train_helpers import write_chat_jsonl

    root = tmp_path_factory.mktemp("diskfull")
    model = root / "model"
    save_tiny_hf_model(model, "llama_tied", seed=0, max_position_embeddings=512)
    save_byte_tokenizer(model, merges=[("1", "2")])
    data = write_chat_jsonl(root / "chats.jsonl", 32)
    return root, model, data


def train_args(model, data, out):
    return ["train", "--model", model, "--data", data, "--out", out, "--precision", "fp32", "--device", "cpu",
            "--max-steps", STEPS, "--save-every", "2", "--eval-every", "3", "--batch-size", "2", "--max-seq-len", "160",
            "--lora-r", "2", "--lora-dropout", "0.1", "--learning-rate", "3e-3", "--no-progress"]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def reference(workspace):
    root, model, data = workspace
    out = root / "reference"
    assert cli(*train_args(model, data, out)) == 0
    return out


def losses(out):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out)]


def same_run(out, reference) -> bool:
    ours, theirs = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(reference / "adapter_model.safetensors"))
    return losses(out) == losses(reference) and ours.keys() == theirs.keys() and all(
        (ours[k] == theirs[k]).all() for k in ours)


def one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("homebake: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("what, pattern, after, names", [
    ("checkpoint", r"checkpoints/\.step-00000004\..*trainable", 0, ["checkpoints/step-00000004", "no space left",
                                                                     "step-00000003, is intact", "--resume"]),
    ("checkpoint adapter copy", r"checkpoints/\.step-00000004\..*adapter_model", 0,
     ["checkpoints/step-00000004", "no space left", "step-00000003, is intact"]),
    ("metrics", r"metrics\.jsonl$", 4, ["metrics.jsonl", "no space left", "--resume"]),
    ("final adapter", r"\.adapter\.tmp.*adapter_model", 0, ["cannot write the final adapter", "no space left",
                                                            "step-00000006, is intact", "--resume"]),
])
def test_disk_full_in_training_then_resume(workspace, reference, tmp_path, capsys, what, pattern, after, names):
    root, model, data = workspace
    out = tmp_path / "run"
    with DiskFull(pattern, after_calls=after) as disk:
        code = cli(*train_args(model, data, out))
    assert disk.failed, f"the {what} write was never reached"
    error = one_line_error(capsys)
    assert code != 0 and all(name in error for name in names), error
    for step, path in list_checkpoints(out):  # every checkpoint that exists is complete and loadable
        assert load_trainer_state(path).step == step and load_file(str(path / "trainable.safetensors"))
    assert [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no half checkpoint
    assert cli(*train_args(model, data, out), "--resume") == 0, capsys.readouterr().err[-2000:]
    assert leftovers(out) == []
    RESULTS[what] = same_run(out, reference)
    assert RESULTS[what], f"after a full disk at the {what}, --resume did not reproduce the uninterrupted run"


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt, pattern", [("gguf", r"\.gguf\..*\.tmp$"), ("hf", r"model\.safetensors$"),
                                          ("peft", r"adapter_model\.safetensors$")])
def test_disk_full_in_an_export_keeps_the_previous_export(workspace, reference, capsys, fmt, pattern):
    root, model, data = workspace
    out = root / f"export-{fmt}"
    argv = ["export", reference, "--model", model, "--format", fmt, *(["--quant", "F16"] if fmt == "gguf" else []),
            "--out", out]
    fresh = root / f"fresh-{fmt}"
    with DiskFull(pattern) as disk:  # no previous export: nothing is left behind
        assert cli(*argv[:-1], fresh) != 0 and disk.failed
    error = one_line_error(capsys)
    assert str(fresh) in error and "no space left on device" in error and "nothing was written" in error
    assert not fresh.exists()
    assert cli(*argv) == 0
    before = digest(out)
    with DiskFull(pattern) as disk:
        code = cli(*argv, "--force")
    assert disk.failed and code != 0
    error = one_line_error(capsys)
    assert str(out) in error and "no space left on device" in error and "previous one is unchanged" in error
    assert digest(out) == before
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(f".export-{fmt}")) == []
    RESULTS[f"export {fmt}"] = True


def test_zz_report(capsys):
    report("disk full", f"{sum(RESULTS.values())}/{len(RESULTS)} cases with the previous checkpoint/export intact "
                        f"and --resume equal to the uninterrupted run ({', '.join(sorted(RESULTS))})")
