"""Full GGUF export: every supported type, the *_M per-tensor mixes, model + tokenizer metadata.

Types: F32, F16, BF16 and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are produced by the ``gguf`` package; Q4_K, Q5_K
and Q6_K by our own quantiser (``homebake.export.kquants``). Which type each tensor gets follows
llama.cpp's ``llama-quantize`` so files behave like the ones people download:

- 1-D tensors (norms, biases) stay F32.
- The output matrix (``output.weight``, or ``token_embd.weight`` when embeddings are tied, since it
  then doubles as the output) gets Q6_K in every quantised type except Q8_0 (where it stays Q8_0).
- Q4_K_M / Q5_K_M: everything Q4_K / Q5_K, except ``attn_v`` and ``ffn_down`` of the first and last
  eighth of the layers and of every third layer in between (llama.cpp's ``use_more_bits``), which get
  Q6_K: those tensors dominate the quantisation error.
- A K-quant needs rows that are a multiple of 256 values; a tensor whose rows are not (SmolLM2's
  hidden size 576, for example) falls back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  and to F16 when the rows do not even fill 32-value blocks.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import ExportError
from ..model.args import GGUF_ARCH_OF_MODEL_TYPE
from . import kquants
from .gguf_writer import (add_rope_freqs, gguf_tensors, pad_vocabulary, save_atomically, write_metadata_value,
                          write_model_metadata)

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K")
_MIX_DEFAULT = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
_UNQUANTISED = ("F32", "F16", "BF16")
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def check_quant(quant: str) -> str:
    """Normalise a --quant value (case-insensitive) or refuse it, listing the supported ones."""
    normal = str(quant).upper().replace("-", "_")
    if normal not in QUANT_TYPES:
        raise ExportError(f"unknown quantisation type {quant!r}", where="--quant",
                          fix=f"use one of {', '.join(QUANT_TYPES)}")
    return normal


def _use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _block_size(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def _fits(type_name: str, row: int) -> bool:
    return row % _block_size(type_name) == 0


def choose_tensor_type(name: str, shape: tuple[int, ...], quant: str, *, n_layers: int, tied: bool) -> str:
    """The GGML type of one tensor (GGUF name, PyTorch shape) in a ``quant`` export."""
    if len(shape) < 2 or quant == "F32":
        return "F32"
    if quant in ("F16", "BF16"):
        return quant
    row = shape[-1]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output:
        if quant == "Q8_0" or not _fits("Q6_K", row):
            return "Q8_0" if _fits("Q8_0", row) else "F16"
        return "Q6_K"
    wanted = _MIX_DEFAULT.get(quant, quant)
    match = _BLOCK.match(name)
    if quant in ("Q4_K_M", "Q5_K_M") and match and match.group(2) in ("attn_v", "ffn_down"):
        if _use_more_bits(int(match.group(1)), n_layers):
            wanted = "Q6_K"
    if not _fits(wanted, row):
        wanted = _K_FALLBACK.get(wanted, wanted)
        if not _fits(wanted, row):
            wanted = "F16"
    return wanted


def encode_tensor(array: np.ndarray, type_name: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype for GGUFWriter.add_tensor) of a float32 array stored as ``type_name``."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if type_name == "F16":
        return np.ascontiguousarray(array, dtype=np.float16), None
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype in kquants.K_QUANT_TYPES:
        return kquants.quantize(array, qtype), qtype
    return quantize(array, qtype), qtype


def write_model_gguf(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], args, *,
                     tokenizer_metadata: Mapping[str, Any] | None, quant: str = "F16", name: str | None = None,
                     progress: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Write ``state_dict`` (HF names and layout) as a GGUF of type ``quant`` at ``path``, atomically.

    Returns {GGUF tensor name: GGML type} as written.
    """
    import gguf

    quant = check_quant(quant)
    arch = GGUF_ARCH_OF_MODEL_TYPE.get(args.model_type)
    if arch is None:
        raise ExportError(f"cannot write model_type {args.model_type!r} as GGUF", where="model config",
                          fix=f"supported: {', '.join(GGUF_ARCH_OF_MODEL_TYPE)}")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    write_model_metadata(writer, args, arch, quant, name)
    for key, value in pad_vocabulary(tokenizer_metadata or {}, args.vocab_size).items():
        write_metadata_value(writer, key, value)

    chosen: dict[str, str] = {}
    for gguf_name, data in gguf_tensors(state_dict, args):
        type_name = choose_tensor_type(gguf_name, tuple(data.shape), quant, n_layers=args.num_hidden_layers,
                                       tied=args.tie_word_embeddings)
        if progress:
            progress(gguf_name, type_name)
        encoded, raw = encode_tensor(data.numpy(), type_name)
        writer.add_tensor(gguf_name, encoded, raw_dtype=raw)
        chosen[gguf_name] = type_name
    for rope_tensor in add_rope_freqs(writer, args):
        chosen[rope_tensor] = "F32"
    save_atomically(writer, path)
    return chosen


def tokenizer_gguf_metadata(tokenizer) -> dict[str, Any]:
    """The tokenizer's GGUF metadata (tokens, merges, types, pre-tokenizer, special ids, add_bos,
    chat template); EOS is never appended to a prompt."""
    metadata = dict(tokenizer.to_gguf_metadata())
    metadata.setdefault("tokenizer.ggml.add_eos_token", False)
    return metadata
