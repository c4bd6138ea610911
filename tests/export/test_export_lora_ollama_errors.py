"""GGUF LoRA read back with gguf's reader, the Ollama export, and every bad input of the export command."""

import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from homebake.adapters.peft import load_peft_adapter
from homebake.model.gguf_file import unpermute_qk

from .conftest import make_model_dir


def test_gguf_lora_layout_alpha_and_permutation(cli, lora_run, tmp_path):
    out = tmp_path / "lora"
    code, _, err = cli("export", lora_run, "--format", "gguf-lora", "--out", out)
    assert code == 0, err
    (path,) = out.glob("*.gguf")
    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    adapter, config = load_peft_adapter(lora_run)
    assert math.isclose(fields["adapter.lora.alpha"], config.alpha)  # plain LoRA: alpha/r as in PEFT
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape.tolist())]) for t in reader.tensors}
    assert len(tensors) == len(adapter)
    heads = {"q_proj": 4, "k_proj": 2}
    for layer in range(2):
        for proj, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                                ("down_proj", "ffn_down")):
            module = f"model.layers.{layer}.{'self_attn' if proj != 'down_proj' else 'mlp'}.{proj}"
            a = torch.from_numpy(tensors[f"blk.{layer}.{gguf_name}.weight.lora_a"].copy())
            b = torch.from_numpy(tensors[f"blk.{layer}.{gguf_name}.weight.lora_b"].copy())
            assert tuple(a.shape) == tuple(adapter[f"{module}.lora_A.weight"].shape)
            if proj in heads:  # rows of B permuted like the base Q/K rows
                assert not torch.equal(b, adapter[f"{module}.lora_B.weight"])
                b = unpermute_qk(b, heads[proj])
            torch.testing.assert_close(b @ a, adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"])


def test_ollama_export_writes_modelfile_next_to_gguf(cli, lora_run, tmp_path):
    out = tmp_path / "ollama"
    code, stdout, err = cli("export", lora_run, "--format", "ollama", "--out", out, "--name", "My Bot")
    assert code == 0, err
    (gguf_file,) = out.glob("*.gguf")
    assert gguf_file.name == "My Bot-Q4_K_M.gguf"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf_file.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile
    assert f"ollama create my-bot -f {out / 'Modelfile'}" in stdout


def one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("homebake: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_existing_output_needs_force_and_is_replaced_atomically(cli, lora_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("good")
    code, _, err = cli("export", lora_run, "--format", "gguf", "--quant", "F16", "--out", out)
    one_line_error(code, err, str(out), "--force")
    assert (out / "keep.txt").read_text() == "good"

    import homebake.export.gguf as gguf_export

    def crash(*args, **kwargs):
        raise RuntimeError("disk died mid-write")

    monkeypatch.setattr(gguf_export, "encode_tensor", crash)
    with pytest.raises(RuntimeError):
        cli("export", lora_run, "--format", "gguf", "--quant", "F16", "--out", out, "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp leftovers
    assert (out / "keep.txt").read_text() == "good"  # the old output survives a failed export
    monkeypatch.undo()

    code, _, err = cli("export", lora_run, "--format", "gguf", "--quant", "F16", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and len(list(out.glob("*.gguf"))) == 1


def test_adapter_base_mismatch_is_named(cli, lora_run, tmp_path):
    wider = make_model_dir(tmp_path / "wider", intermediate_size=768)
    code, _, err = cli("export", lora_run, "--format", "hf", "--out", tmp_path / "x", "--model", wider)
    one_line_error(code, err, "model.layers.0.mlp.", "256x768", "--model")
    shallower = make_model_dir(tmp_path / "shallow", num_hidden_layers=1)
    code, _, err = cli("export", lora_run, "--format", "hf", "--out", tmp_path / "y", "--model", shallower)
    one_line_error(code, err, "model.layers.1.", "llama, 1 layers")
    qwen = make_model_dir(tmp_path / "qwen", variant="qwen2", hidden_size=128)
    code, _, err = cli("export", lora_run, "--format", "gguf", "--out", tmp_path / "z", "--model", qwen)
    one_line_error(code, err, "qwen2", "hidden 128", "--model")
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_dora_and_full_runs_refused_for_gguf_lora(cli, dora_run, tiny_dir, tmp_path):
    code, _, err = cli("export", dora_run, "--format", "gguf-lora", "--out", tmp_path / "d")
    one_line_error(code, err, "DoRA", "--format gguf")
    full_run = tmp_path / "full-run"
    make_model_dir(full_run / "model")
    code, _, err = cli("export", full_run, "--format", "gguf-lora", "--out", tmp_path / "f")
    one_line_error(code, err, "full fine-tune", "--format gguf")
    # the DoRA run still exports merged (DoRA magnitudes folded in)
    code, _, err = cli("export", dora_run, "--format", "gguf", "--quant", "F32", "--out", tmp_path / "dm")
    assert code == 0, err


def test_not_a_run_and_wrong_quant_for_format(cli, lora_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("export", empty, "--format", "hf", "--out", tmp_path / "o")
    one_line_error(code, err, str(empty), "adapter_config.json")
    code, _, err = cli("export", lora_run, "--format", "gguf-lora", "--quant", "Q4_K_M", "--out", tmp_path / "o")
    one_line_error(code, err, "F32, F16, Q8_0")
