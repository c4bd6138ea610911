"""The PEFT adapter folder: what we save loads in PEFT with identical logits, and we read what PEFT saves."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_helpers import copy_adapters_into_peft, peft, peft_twin, randomize_adapters, tiny_model
from safetensors.torch import load_file, save_file

from homebake.adapters import LoraConfig, inject_lora, load_lora_state_dict, lora_state_dict
from homebake.errors import ExportError, ModelLoadError
from homebake.adapters.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter

VARIANTS = {"lora": dict(), "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}


def _trained(variant: str, **overrides):
    base = tiny_model("qwen2")
    ours = copy.deepcopy(base)
    config = LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.05, **VARIANTS[variant], **overrides})
    paths = inject_lora(ours, config)
    randomize_adapters(ours)
    return base, ours.eval(), config, paths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_adapter_loads_in_peft_with_identical_logits(tmp_path, input_ids, variant):
    base, ours, config, paths = _trained(variant)
    out = save_peft_adapter(tmp_path / "adapter", lora_state_dict(ours), config, "tiny/qwen2")
    written = json.loads((out / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["use_dora"]) == (4, 8, config.use_dora)
    assert written["base_model_name_or_path"] == "tiny/qwen2"
    keys = set(load_file(out / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys) == config.use_dora

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    torch.testing.assert_close(loaded(input_ids).logits, ours(input_ids).logits)
    assert loaded.peft_config["default"].use_rslora == config.use_rslora


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_reads_an_adapter_saved_by_peft(tmp_path, input_ids, variant):
    base, ours, config, paths = _trained(variant)
    twin = peft_twin(base, config, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    copy_adapters_into_peft(ours, twin)  # PEFT's adapter now holds our random weights
    twin.save_pretrained(tmp_path / "peft")

    state, loaded_config = load_peft_adapter(tmp_path / "peft")
    assert (loaded_config.r, loaded_config.alpha, loaded_config.use_dora, loaded_config.dropout) == (
        4, 8, config.use_dora, 0.05)
    assert sorted(loaded_config.target_modules) == sorted(paths)
    fresh = copy.deepcopy(base)
    inject_lora(fresh, loaded_config)
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(fresh.eval()(input_ids).logits, twin.eval()(input_ids).logits)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    _, ours, config, _ = _trained("lora")
    out = save_peft_adapter(tmp_path / "adapter", lora_state_dict(ours), config, None)
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        save_peft_adapter(out, lora_state_dict(ours), config, None)
    with pytest.raises(ExportError, match="does not match"):
        save_peft_adapter(out, lora_state_dict(ours), LoraConfig(r=8, alpha=8), None, overwrite=True)
    assert (out / ADAPTER_WEIGHTS).read_bytes() == before  # a failed export leaves the good one alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    save_peft_adapter(out, lora_state_dict(ours), config, None, overwrite=True)


def _folder(tmp_path, config: dict | str | None, tensors: dict | None):
    folder = tmp_path / "bad"
    folder.mkdir()
    if config is not None:
        (folder / ADAPTER_CONFIG).write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / ADAPTER_WEIGHTS)
    return folder


GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
GOOD_TENSORS = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)}


@pytest.mark.parametrize("config, tensors, message", [
    (None, GOOD_TENSORS, "no adapter_config.json"),
    ("{not json", GOOD_TENSORS, "unreadable adapter config"),
    ({**GOOD_CONFIG, "peft_type": "IA3"}, GOOD_TENSORS, "not LORA"),
    ({**GOOD_CONFIG, "rank_pattern": {"q_proj": 8}}, GOOD_TENSORS, "per-module ranks"),
    ({**GOOD_CONFIG, "modules_to_save": ["lm_head"]}, GOOD_TENSORS, "extra modules"),
    (GOOD_CONFIG, None, "no adapter_model.safetensors"),
    ({**GOOD_CONFIG, "r": 4}, GOOD_TENSORS, "rank 2 but r is 4"),
    ({**GOOD_CONFIG, "use_dora": True}, GOOD_TENSORS, "lack a DoRA magnitude"),
    (GOOD_CONFIG, {**GOOD_TENSORS, "base_model.model.lm_head.weight": torch.zeros(3, 8)}, "unsupported tensor"),
    (GOOD_CONFIG, {k: v for k, v in GOOD_TENSORS.items() if "lora_B" not in k}, "lacks lora_B"),
])
def test_bad_adapter_folders_raise_one_line_errors(tmp_path, config, tensors, message):
    folder = _folder(tmp_path, config, tensors)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_peft_adapter(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value) and info.value.fix


def test_missing_folder_and_corrupt_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere")
    folder = _folder(tmp_path, GOOD_CONFIG, None)
    (folder / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="unreadable adapter weights"):
        load_peft_adapter(folder)
