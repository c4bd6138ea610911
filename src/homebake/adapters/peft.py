"""The PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written so that ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads it unchanged, and read back
from adapters PEFT saved. PEFT names a tensor ``base_model.model.<module path>.lora_A.weight`` (the
adapter name "default" is dropped on save) and the DoRA magnitude ``<module path>.lora_magnitude_vector``;
homebake's own names are ``<module path>.lora_A.weight`` and ``<module path>.lora_magnitude``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LoraConfig
from .lora import split_adapter_state
from ..errors import ConfigError, ExportError, ModelLoadError
from ..fsutil import output_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TO_PEFT = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight",
            "lora_magnitude": "lora_magnitude_vector"}
# Older PEFT releases kept the ".weight" of the magnitude's inner layer.
_FROM_PEFT = {**{peft: ours for ours, peft in _TO_PEFT.items()}, "lora_magnitude_vector.weight": "lora_magnitude"}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.endswith("." + old):
            return key[:-len(old)] + new
    return None


def peft_config_dict(lora_config: LoraConfig, module_paths: list[str], base_model_name_or_path: str | None) -> dict:
    alpha = lora_config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora_config.dropout,
        # Exact module paths (what PEFT itself writes for all-linear), so the targets cannot drift.
        "target_modules": sorted(module_paths),
        "use_rslora": lora_config.use_rslora,
        "use_dora": lora_config.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(out_dir: str | Path, adapter_state: dict[str, torch.Tensor], lora_config: LoraConfig,
                      base_model_name_or_path: str | None, *, overwrite: bool = False) -> Path:
    """Write ``out_dir`` as a PEFT LoRA/DoRA adapter, atomically; returns the folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError("the output folder already exists", where=str(out_dir),
                          fix="choose another folder or pass overwrite")
    lora_config.validate()
    modules = split_adapter_state(adapter_state, where=str(out_dir))
    if not modules:
        raise ExportError("the adapter is empty", where=str(out_dir), fix="inject and train adapters before exporting")
    for path, parts in modules.items():
        if ("magnitude" in parts) != lora_config.use_dora or parts["A"].shape[0] != lora_config.r:
            raise ExportError(f"{path} does not match the LoRA config (r={lora_config.r}, "
                              f"use_dora={lora_config.use_dora})", where=str(out_dir),
                              fix="export with the config the adapter was trained with")
    tensors = {PEFT_PREFIX + _rename(key, _TO_PEFT): tensor.detach().cpu().contiguous()
               for key, tensor in adapter_state.items()}
    config = peft_config_dict(lora_config, list(modules), base_model_name_or_path)
    with output_dir(out_dir, overwrite=overwrite, what="adapter") as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _read_config(path: Path) -> dict:
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelLoadError(f"no {ADAPTER_CONFIG} in the adapter folder", where=str(path),
                             fix="point to a folder saved by PEFT or `homebake export --format peft`") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"unreadable adapter config ({error})", where=str(config_path),
                             fix="save the adapter again") from error
    if not isinstance(config, dict):
        raise ModelLoadError("the adapter config is not a JSON object", where=str(config_path),
                             fix="save the adapter again")
    return config


def _check_supported(config: dict, config_path: str) -> None:
    def refuse(field: str, message: str) -> None:
        raise ModelLoadError(message, where=f"{config_path} field {field!r}",
                             fix="homebake reads plain LoRA/DoRA adapters of linear layers; merge or convert it with PEFT")

    if str(config.get("peft_type", "")).upper() != "LORA":
        refuse("peft_type", f"peft_type is {config.get('peft_type')!r}, not LORA")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            refuse(name, f"{name} must be a positive number, got {value!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)):
        refuse("lora_dropout", f"lora_dropout must be a number, got {dropout!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            refuse(name, "per-module ranks/alphas are not supported")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "fan_in_fan_out (Conv1D-style) layers are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse("bias", "trained biases are not supported")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        refuse("modules_to_save", "fully trained extra modules are not supported")


def load_peft_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Read a PEFT LoRA/DoRA adapter folder: (adapter tensors in homebake's names, LoraConfig)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError("the adapter folder does not exist" if not path.exists() else "not a folder",
                             where=str(path), fix=f"point to a folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = _read_config(path)
    config_path = str(path / ADAPTER_CONFIG)
    _check_supported(config, config_path)
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise ModelLoadError(f"no {ADAPTER_WEIGHTS}" + (" (only a pickled adapter_model.bin)" if pickled else ""),
                             where=str(path), fix="re-save the adapter with PEFT's safe_serialization=True"
                             if pickled else "the adapter folder is incomplete; save it again")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"unreadable adapter weights ({error})", where=str(weights_path),
                             fix="the file is corrupt or truncated; save the adapter again") from error

    state = {}
    for key, tensor in tensors.items():
        ours = _rename(key, _FROM_PEFT) if key.startswith(PEFT_PREFIX) else None
        if ours is None:
            raise ModelLoadError(f"unsupported tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A.weight, "
                                 "lora_B.weight or lora_magnitude_vector)", where=str(weights_path),
                                 fix="homebake reads LoRA/DoRA adapters of linear layers only")
        state[ours[len(PEFT_PREFIX):]] = tensor
    modules = split_adapter_state(state, where=str(weights_path), error=ModelLoadError)
    if not modules:
        raise ModelLoadError("the adapter holds no tensors", where=str(weights_path), fix="save the adapter again")
    use_dora = bool(config.get("use_dora", False))
    for module_path, parts in modules.items():
        if parts["A"].shape[0] != config["r"]:
            raise ModelLoadError(f"{module_path} has rank {parts['A'].shape[0]} but r is {config['r']}",
                                 where=config_path, fix="the config and weights do not belong together")
        if ("magnitude" in parts) != use_dora:
            raise ModelLoadError(f"{module_path}: use_dora is {use_dora} but the weights "
                                 f"{'have' if 'magnitude' in parts else 'lack'} a DoRA magnitude",
                                 where=config_path, fix="the config and weights do not belong together")
    lora_config = LoraConfig(
        r=int(config["r"]),
        alpha=config["lora_alpha"],
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=sorted(modules),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=use_dora,
    )
    try:
        lora_config.validate()
    except ConfigError as error:  # e.g. lora_dropout out of range in the file
        raise ModelLoadError(f"invalid adapter settings ({error})", where=config_path,
                             fix="save the adapter again") from error
    return state, lora_config
