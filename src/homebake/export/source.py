"""What `homebake export` reads: a training run folder, a bare PEFT adapter, a model folder or a GGUF.

- a run folder of an adapter run (``config.yaml`` + ``adapter_config.json`` + ``adapter_model.safetensors``)
  or a bare PEFT adapter folder: the base model is ``--model``, else the adapter's
  ``base_model_name_or_path``, else the run's ``config.yaml`` ``model``;
- a run folder of a full fine-tune (``model/`` holds the HF folder the trainer wrote);
- a model itself: an HF folder (``config.json``) or a ``.gguf`` file (GGUF in, GGUF out, no HF folder).

Adapters are always merged into the full-precision (fp32) base weights, never into quantised ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExportError, HomebakeError

RUN_CONFIG = "config.yaml"
FULL_MODEL_DIR = "model"


@dataclass
class ExportSource:
    path: Path
    kind: str  # "adapter" | "full" | "model"
    loaded: object  # LoadedModel of the base (adapter) or of the model itself, fp32
    adapter_state: dict[str, torch.Tensor] | None = None
    lora_config: object | None = None  # adapters.config.LoraConfig
    base: str | None = None  # the base model source of an adapter

    @property
    def method(self) -> str:
        if self.kind != "adapter":
            return self.kind
        return "dora" if self.lora_config.use_dora else "lora"

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named fp32 weights with the adapter (if any) folded in."""
        state = self.loaded.model.state_dict()
        if self.adapter_state is None:
            return dict(state)
        from ..adapters.lora import merge_lora

        try:
            return merge_lora(state, self.adapter_state, self.lora_config, dtype=torch.float32)
        except ExportError as error:
            raise ExportError(f"the adapter does not fit the base model: {error.message}",
                              where=f"{self.path} vs base {self.base}",
                              fix="pass the base model it was trained on with --model") from None


def _run_config_model(folder: Path) -> str | None:
    """The ``model`` of a run's config.yaml (None when absent or the default model)."""
    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ExportError(f"unreadable run config ({' '.join(str(error).split())[:120]})", where=str(path),
                          fix="restore the run's config.yaml or pass the base model with --model") from None
    model = data.get("model") if isinstance(data, dict) else None
    return str(model) if model else None


def _load(source: str | None, what: str):
    from ..model.load import load_model

    try:
        return load_model(source, dtype=torch.float32, device="cpu")
    except HomebakeError as error:
        raise type(error)(f"cannot load the {what}: {error.message}", where=error.where, fix=error.fix) from None


def open_source(path: str | Path, *, model: str | None = None) -> ExportSource:
    """Resolve and load what ``homebake export PATH`` exports."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError("no such run, adapter or model", where=str(path),
                          fix="pass a training run folder (--out of homebake train), a PEFT adapter folder, "
                              "a model folder or a .gguf file")
    if path.is_file():
        return ExportSource(path, "model", _load(str(path), "model"))
    if (path / "adapter_config.json").is_file():
        from ..adapters.peft import load_peft_adapter

        adapter_state, lora_config = load_peft_adapter(path)
        import json

        declared = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        base = model or declared or _run_config_model(path)
        loaded = _load(base, f"base model {base or '(default)'}")
        _check_adapter_fits(path, adapter_state, loaded, base)
        return ExportSource(path, "adapter", loaded, adapter_state, lora_config, base=base or "default model")
    if (path / FULL_MODEL_DIR / "config.json").is_file():
        return ExportSource(path, "full", _load(str(path / FULL_MODEL_DIR), "fine-tuned model"))
    if (path / "config.json").is_file():
        return ExportSource(path, "model", _load(str(path), "model"))
    raise ExportError("not a training run, adapter or model folder", where=str(path),
                      fix="the folder needs adapter_config.json (adapter run), model/config.json (full run) "
                          "or config.json (a model)")


def _check_adapter_fits(path: Path, adapter_state: dict, loaded, base: str | None) -> None:
    """Name the first adapter module the base lacks or whose shape differs (architecture mismatch)."""
    from ..adapters.lora import split_adapter_state

    base_state = loaded.model.state_dict()
    where = f"{path / 'adapter_model.safetensors'}"
    fix = "pass the base model the adapter was trained on with --model"
    a = loaded.args
    described = (f"the base model ({base or 'default'}: {a.model_type}, {a.num_hidden_layers} layers, "
                 f"hidden {a.hidden_size})")
    for module, parts in split_adapter_state(adapter_state, where=where).items():
        key = f"{module}.weight"
        if key not in base_state:
            raise ExportError(f"the adapter targets {module}, which {described} does not have", where=where, fix=fix)
        expected = tuple(base_state[key].shape)
        got = (parts["B"].shape[0], parts["A"].shape[1])
        if expected != got:
            raise ExportError(f"{module}: the adapter is for a {got[0]}x{got[1]} weight, {described} has "
                              f"{expected[0]}x{expected[1]}", where=where, fix=fix)
