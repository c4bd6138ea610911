"""The merged Hugging Face folder: config.json, generation_config.json, tokenizer files, safetensors.

What transformers' ``AutoModelForCausalLM`` / ``AutoTokenizer`` (and llama.cpp's converter, vLLM, ...)
expect: weights under HF names in safetensors (sharded with a ``model.safetensors.index.json`` above a
size limit), the model config from ``ModelArgs.to_hf_config``, every end-of-turn id in
``generation_config.json`` (so generation stops at ``<|im_end|>``/``<|eot_id|>``, not only at EOS), and
the tokenizer with its chat template (in ``tokenizer_config.json`` and ``chat_template.jinja``).
The folder is written atomically: a failed export never replaces a good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ExportError
from ..fsutil import output_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_dtype(choice: str | torch.dtype | None, state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The storage dtype: an explicit fp32/bf16/fp16, or "auto" = the dtype the weights already have
    (a bf16 checkpoint stays bf16; weights dequantised from GGUF are fp32)."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice in (None, "auto"):
        floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
        return dtype if dtype in _DTYPE_NAMES else torch.float32
    if choice not in DTYPES:
        raise ExportError(f"unknown dtype {choice!r}", where="--dtype", fix=f"use auto, {', '.join(DTYPES)}")
    return DTYPES[choice]


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGIB")
    try:
        value = float(number) * units[raw[len(number):]]
    except (ValueError, KeyError):
        raise ExportError(f"cannot read size {text!r}", where="--max-shard-size", fix="write e.g. 2GB or 500MB") from None
    if value <= 0:
        raise ExportError(f"size must be positive, got {text!r}", where="--max-shard-size", fix="write e.g. 2GB")
    return int(value)


def shard_plan(state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(folder: Path, state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    from safetensors.torch import save_file

    shards = shard_plan(state_dict, max_shard_bytes)
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file({n: state_dict[n].contiguous() for n in shards[0]}, str(path), metadata={"format": "pt"})
        return [path]
    weight_map, paths = {}, []
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state_dict[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
        paths.append(folder / filename)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index_doc, indent=2) + "\n", encoding="utf-8")
    return paths


def end_token_ids(tokenizer) -> list[int]:
    """EOS first, then every other id that ends a turn (what generation must stop on)."""
    return [tokenizer.eos_token_id, *sorted(set(tokenizer.end_token_ids) - {tokenizer.eos_token_id})]


def model_config(args, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    config = args.to_hf_config()
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    config["torch_dtype"] = _DTYPE_NAMES[dtype]  # transformers 4.x name; 5.x reads "dtype" too
    config["dtype"] = _DTYPE_NAMES[dtype]
    return config


def generation_config(args, tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
    ends = end_token_ids(tokenizer)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": ends if len(ends) > 1 else ends[0],
            "pad_token_id": tokenizer.pad_token_id}


def write_hf_tokenizer(tokenizer, folder: Path, *, model_max_length: int | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja,
    special_tokens_map.json — from the Tokenizer's public data, readable by AutoTokenizer and homebake."""
    import tokenizers
    from tokenizers import processors

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    if tokenizer.add_bos_token and not _prepends_bos(backend, tokenizer):
        # Consumers that only read tokenizer.json (tokenizers, llama.cpp's converter) must add BOS too.
        bos = tokenizer.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    backend.save(str(folder / "tokenizer.json"))

    def token(index):
        return tokenizer.id_to_token(index) if index is not None else None

    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
               "unk_token": token(tokenizer.unk_token_id), "pad_token": token(tokenizer.pad_token_id)}
    special = {key: value for key, value in special.items() if value is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


def _prepends_bos(backend, tokenizer) -> bool:
    probe = backend.encode("a", add_special_tokens=True).ids
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def save_hf_model(loaded, out_dir: str | Path, *, state_dict: Mapping[str, torch.Tensor] | None = None,
                  dtype: str | torch.dtype | None = "auto", max_shard_size: str | int = DEFAULT_MAX_SHARD_BYTES,
                  overwrite: bool = False) -> Path:
    """Write a merged model as an HF folder at ``out_dir`` (atomically) and return it.

    ``loaded`` supplies ``args`` and ``tokenizer`` (a LoadedModel); ``state_dict`` (HF names) defaults to
    ``loaded.model.state_dict()``. With tied embeddings ``lm_head.weight`` is not stored.
    """
    out_dir = Path(out_dir)
    args, tokenizer = loaded.args, loaded.tokenizer
    state = dict(state_dict if state_dict is not None else loaded.model.state_dict())
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    target = resolve_dtype(dtype, state)
    state = {name: t.detach().to(device="cpu", dtype=target if t.is_floating_point() else t.dtype)
             for name, t in state.items()}
    max_bytes = parse_size(max_shard_size)
    with output_dir(out_dir, overwrite=overwrite, what="model") as tmp:
        write_safetensors(tmp, state, max_bytes)
        _write_json(tmp / "config.json", model_config(args, tokenizer, target))
        _write_json(tmp / "generation_config.json", generation_config(args, tokenizer))
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model_max_length=args.max_position_embeddings)
    return out_dir


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
