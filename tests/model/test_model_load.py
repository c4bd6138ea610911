"""Loading HF folders (single file, sharded), hub ids from a test-laid HF cache, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ARCH_VARIANTS, save_tiny_hf_model

from homebake.errors import ModelLoadError, UnsupportedArchitectureError
from homebake.model.load import load_model, load_state_dict


def max_logit_diff(reference, model, ids) -> float:
    with torch.no_grad():
        return (reference(ids).logits - model.logits(model(ids))).abs().max().item()


@pytest.mark.parametrize("variant", ARCH_VARIANTS + ["mistral_window", "qwen2_window"])
def test_hf_folder_logits_match_transformers(variant, tiny_dir, hf_reference, token_ids):
    loaded = load_model(tiny_dir(variant), with_tokenizer=False)
    assert loaded.source_kind == "hf" and loaded.source_path == tiny_dir(variant)
    assert loaded.tokenizer is None
    assert max_logit_diff(hf_reference(variant), loaded.model, token_ids) <= 1e-4


def test_sharded_safetensors_with_index(tmp_path, hf_reference, token_ids):
    folder = save_tiny_hf_model(tmp_path / "sharded", "qwen2", seed=0, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    loaded = load_model(folder, with_tokenizer=False)
    assert max_logit_diff(hf_reference("qwen2"), loaded.model, token_ids) <= 1e-4


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_offline_from_the_hf_cache(tmp_path, monkeypatch, tiny_dir, hf_reference, token_ids):
    snapshot = lay_out_hub_cache(tmp_path / "hub", "tinyorg/tiny-llama", tiny_dir("llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("tinyorg/tiny-llama", with_tokenizer=False)
    assert loaded.source_path.resolve() == snapshot.resolve()
    assert max_logit_diff(hf_reference("llama"), loaded.model, token_ids) <= 1e-4


def test_hub_id_not_in_cache_offline_is_a_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("tinyorg/not-there", with_tokenizer=False)
    assert "tinyorg/not-there" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_load_state_dict_returns_hf_names_without_building(tiny_dir):
    state = load_state_dict(tiny_dir("qwen3"))
    reference = load_file(str(tiny_dir("qwen3") / "model.safetensors"))
    assert state.keys() == reference.keys()
    for name in reference:
        assert torch.equal(state[name], reference[name])


def test_dtype_and_device_are_honoured(tiny_dir):
    model = load_model(tiny_dir("llama"), dtype=torch.bfloat16, device="cpu", with_tokenizer=False).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(p.requires_grad for p in model.parameters())


# -- bad input: always a one-line ModelLoadError naming the file -------------------------------------


def copy_model(tiny_dir, tmp_path, variant: str = "llama") -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_dir(variant), target)
    return target


def assert_load_error(source, names: str, match: str, error=ModelLoadError) -> None:
    with pytest.raises(error) as info:
        load_model(source, with_tokenizer=False)
    text = str(info.value)
    assert "\n" not in text and names in text and info.value.fix, text
    assert match in text, text


def test_missing_path(tmp_path):
    assert_load_error(tmp_path / "nope", "nope", "does not exist")


def test_missing_config(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    (folder / "config.json").unlink()
    assert_load_error(folder, str(folder), "config.json not found")


def test_invalid_config_json(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    assert_load_error(folder, "config.json", "invalid JSON")


def test_unsupported_architecture(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_load_error(folder, "config.json", "'gpt2' is not supported", UnsupportedArchitectureError)


def test_truncated_safetensors(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_load_error(folder, "model.safetensors", "cannot read safetensors")


def test_corrupt_safetensors_header(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    assert_load_error(folder, "model.safetensors", "cannot read safetensors")


def test_missing_tensor(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    assert_load_error(folder, str(folder), "'model.layers.1.mlp.up_proj.weight' is missing")


def test_tensor_shape_mismatch(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert_load_error(folder, "model.safetensors", "down_proj.weight' has shape (64, 128), the config implies (64, 96)")


def test_unexpected_tensor(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.rotary.extra"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    assert_load_error(folder, "model.safetensors", "unexpected tensor 'model.layers.0.self_attn.rotary.extra'")


def test_pickle_only_checkpoint_is_refused(tiny_dir, tmp_path):
    folder = copy_model(tiny_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert_load_error(folder, str(folder), "no model.safetensors")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(folder, with_tokenizer=False)


def test_shard_listed_in_index_missing(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "sharded", "llama", seed=0, max_shard_size="40KB")
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    assert_load_error(folder, "model.safetensors.index.json", "missing")


def test_file_that_is_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_load_error(text, "notes.txt", "not a model folder")
