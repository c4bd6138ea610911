"""Open what a command names: a model, an adapter or a training run (eval, compare, generate, chat, export, merge).

- a training run of an adapter (``config.yaml`` + ``adapter_config.json`` + ``adapter_model.safetensors``) or a
  bare PEFT adapter folder: the base model is ``model`` when given, else the adapter's
  ``base_model_name_or_path``, else the run's ``config.yaml`` ``model``;
- a training run of a full fine-tune (``model/`` holds the HF folder the trainer wrote);
- a model itself: an HF folder (``config.json``), a ``.gguf`` file, or the default model's name.

Adapters are always merged into the full-precision (fp32) base weights, never into quantised ones; the merged
model then moves to the device and dtype of the one inference rule, :func:`inference_placement`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .default_model import DEFAULT_MODEL_NAME, is_default_model_name
from .errors import ConfigError, ExportError, HomebakeError
from .run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_MODEL_DIR, read_run_config


def describe_model(model: str | None) -> str:
    """How a ``--model`` value is shown (and recorded in compare.json): the default model by its name."""
    return DEFAULT_MODEL_NAME if is_default_model_name(model) else str(model)


@dataclass
class Source:
    path: Path
    kind: str  # "adapter" | "full" | "model"
    loaded: object  # model.load.LoadedModel of the base (adapter) or of the model itself, fp32 on the CPU
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
        from .adapters.lora import merge_lora

        try:
            return merge_lora(state, self.adapter_state, self.lora_config, dtype=torch.float32)
        except ExportError as error:
            raise ExportError(f"the adapter does not fit the base model: {error.message}",
                              where=f"{self.path} vs base {self.base}",
                              fix="pass the base model it was trained on with --model") from None


def _run_config_model(folder: Path) -> str | None:
    """The ``model`` of a run's config.yaml (None when absent or the default model)."""
    try:
        config = read_run_config(folder)
    except ValueError as error:
        raise ExportError(f"unreadable run config ({error})", where=str(folder / "config.yaml"),
                          fix="restore the run's config.yaml or pass the base model with --model") from None
    model = (config or {}).get("model")
    return str(model) if model else None


def _load(source: str | None, what: str):
    from .model.load import load_model

    try:
        return load_model(source, dtype=torch.float32, device="cpu")
    except HomebakeError as error:
        raise type(error)(f"cannot load the {what}: {error.message}", where=error.where, fix=error.fix) from None


def open_source(path: str | Path, *, model: str | None = None) -> Source:
    """Resolve and load (fp32, CPU) a training run, PEFT adapter, model folder, ``.gguf`` or the default model."""
    if isinstance(path, str) and is_default_model_name(path) and not Path(path).expanduser().exists():
        return Source(Path(DEFAULT_MODEL_NAME), "model", _load(None, "default model"))
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError("no such run, adapter or model", where=str(path),
                          fix="pass a training run folder (--out of homebake train), a PEFT adapter folder, "
                              f"a model folder, a .gguf file or {DEFAULT_MODEL_NAME}")
    if path.is_file():
        return Source(path, "model", _load(str(path), "model"))
    if (path / ADAPTER_CONFIG).is_file():
        from .adapters.peft import load_peft_adapter

        adapter_state, lora_config = load_peft_adapter(path)
        declared = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        base = model or declared or _run_config_model(path)
        loaded = _load(base, f"base model {base or '(default)'}")
        _check_adapter_fits(path, adapter_state, loaded, base)
        return Source(path, "adapter", loaded, adapter_state, lora_config, base=base or "default model")
    if (path / FULL_MODEL_DIR / "config.json").is_file():
        return Source(path, "full", _load(str(path / FULL_MODEL_DIR), "fine-tuned model"))
    if (path / "config.json").is_file():
        return Source(path, "model", _load(str(path), "model"))
    raise ExportError("not a training run, adapter or model folder", where=str(path),
                      fix=f"the folder needs {ADAPTER_CONFIG} (adapter run), {FULL_MODEL_DIR}/config.json (full run) "
                          "or config.json (a model)")


def _check_adapter_fits(path: Path, adapter_state: dict, loaded, base: str | None) -> None:
    """Name the first adapter module the base lacks or whose shape differs (architecture mismatch)."""
    from .adapters.lora import split_adapter_state

    base_state = loaded.model.state_dict()
    where = f"{path / ADAPTER_WEIGHTS}"
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


# ---------------------------------------------------------------------------------------------- inference


def inference_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The one device/dtype rule for running a model: ``auto`` is bf16 on GPUs that support it, fp32 on the CPU.

    Not bf16 on CPUs with native bf16 (AVX512-BF16, AMX) either: on the demo's 50 held-out prompts the default
    model's bf16 greedy answers differed from fp32's in 27 (docs/eval.md), and eval/compare must score the
    weights the user has. ``--dtype bf16`` runs bf16 anyway.
    """
    from .device import pick_device, pick_dtype

    torch_device = pick_device(device)
    return torch_device, pick_dtype(dtype, torch_device, prefer_bf16=torch_device.type != "cpu")


def _ready_for_inference(loaded, device: torch.device, dtype: torch.dtype):
    loaded.model.to(device=device, dtype=dtype)
    for param in loaded.model.parameters():
        param.requires_grad_(False)  # no gradients: the fused loss then skips its backward work
    loaded.model.eval()
    return loaded


@dataclass
class ModelUnderTest:
    """The base model ready for inference and, with an adapter, the fine-tuned weights to swap in."""

    loaded: object  # model.load.LoadedModel (base weights on the chosen device/dtype)
    tuned_state: dict[str, torch.Tensor] | None  # fp32 HF-named weights with the adapter merged
    description: str  # e.g. "adapter runs/x (lora) on base smollm2-135m-instruct"

    def use_tuned(self) -> None:
        """Replace the base weights by the fine-tuned ones (in place; the base weights are gone)."""
        if self.tuned_state is None:
            return
        missing, unexpected = self.loaded.model.load_state_dict(self.tuned_state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise ConfigError(f"the fine-tuned weights do not fit the model ({(unexpected or missing)[0]})",
                              where=self.description, fix="pass the base model it was trained on with --model")
        self.tuned_state = None


def open_model(model: str | None, adapter: str | None, *, device: str = "auto", dtype: str = "auto") -> ModelUnderTest:
    """Load ``model`` and, when ``adapter`` names a PEFT adapter or a training run, its fine-tuned weights.

    The base of an adapter is ``model`` when given, else the adapter's ``base_model_name_or_path``, else the
    run's config.yaml (as in ``homebake export``). A full fine-tune run brings its own weights.
    """
    from .model.load import load_model

    torch_device, torch_dtype = inference_placement(device, dtype)
    tuned_state, description = None, f"model {describe_model(model)}" + (" (default)" if model is None else "")
    if adapter is None:
        loaded = load_model(model, dtype=torch.float32, device="cpu")
    else:
        source = open_source(adapter, model=model)
        if source.kind == "model":
            raise ConfigError("this is a model, not an adapter or a training run", where=str(adapter),
                              fix="pass it as --model, or give --adapter a PEFT adapter / training run folder")
        if source.kind == "adapter":
            loaded, tuned_state = source.loaded, source.merged_state_dict()
            description = f"adapter {adapter} ({source.method}) on base {source.base}"
        else:  # a full fine-tune: the run's weights, the base for comparison from --model
            tuned_state = {k: v.float() for k, v in source.loaded.model.state_dict().items()}
            loaded = load_model(model, dtype=torch.float32, device="cpu")
            description = f"full fine-tune {adapter} (base {model or 'default model'})"
    return ModelUnderTest(_ready_for_inference(loaded, torch_device, torch_dtype), tuned_state, description)


def open_for_inference(model: str | None, adapter: str | None = None, *, device: str = "auto",
                       dtype: str = "auto"):
    """The model to run (``generate``, ``chat``, ``eval``): ``model`` with ``adapter`` merged in, if given."""
    if adapter:
        subject = open_model(model, adapter, device=device, dtype=dtype)
        subject.use_tuned()
        return subject.loaded
    from .model.load import load_model

    torch_device, torch_dtype = inference_placement(device, dtype)
    # Loaded straight in the target dtype: no fp32 copy of a large model on the way.
    return _ready_for_inference(load_model(model, dtype=torch_dtype, device=torch_device), torch_device, torch_dtype)
