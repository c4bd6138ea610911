"""Reading GGUF files, and the GGUF <-> Hugging Face boundary (tensor names, Q/K permutation).

llama.cpp's convert_hf_to_gguf.py permutes the rows of Q (with the head count) and K (with the KV-head
count) for the "llama" architecture (Llama, Mistral, SmolLM2), because ggml's RoPE rotates adjacent
pairs while HF rotates halves. Qwen2/Qwen3, Gemma 2/3 and Phi-3 GGUFs use ggml's NEOX RoPE and are stored
unpermuted. Per architecture: Gemma's four block norms have their own GGUF names and are stored as
``1 + weight`` (llama.cpp's RMSNorm multiplies by the stored value); Phi-3 keeps its fused projections
(``attn_qkv``, and ``ffn_up`` holding gate then up). Inside homebake everything uses HF names and HF's
layout; this module (with export/gguf_writer.py) is the only place that converts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError

DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
PERMUTED_QK_ARCHS = frozenset({"llama"})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA_BLOCK_NAMES = {
    **{k: v for k, v in _BLOCK_NAMES.items() if k != "ffn_norm"},
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCK_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ARCH_BLOCK_NAMES = {"gemma2": _GEMMA_BLOCK_NAMES, "gemma3": _GEMMA_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES}
# Architectures whose RMSNorm weights are stored in the file as 1 + weight (HF keeps the offset from 1).
NORM_OFFSET_ARCHS = frozenset({"gemma2", "gemma3"})
# Tensors that configure the model rather than hold weights (read into ModelArgs instead).
NON_WEIGHT_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


def _block_names(arch: str | None) -> dict[str, str]:
    return _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)


def gguf_to_hf_name(name: str, arch: str | None = None) -> str | None:
    """The HF name of a GGUF tensor of architecture ``arch`` (None: the Llama/Qwen layout)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    names = _block_names(arch)
    match = _GGUF_BLOCK.match(name)
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    return None


def hf_to_gguf_name(name: str, arch: str | None = None) -> str | None:
    for gguf_name, hf_name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    match = _HF_BLOCK.match(name)
    if match:
        for gguf_part, hf_part in _block_names(arch).items():
            if hf_part == match.group(2):
                return f"blk.{match.group(1)}.{gguf_part}.{match.group(3)}"
    return None


def norm_offset(hf_name: str, arch: str | None) -> float:
    """What the GGUF adds to this tensor (1 for Gemma's norms: the file stores 1 + weight)."""
    return 1.0 if arch in NORM_OFFSET_ARCHS and hf_name.endswith("norm.weight") else 0.0


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate-half) row order -> llama.cpp (interleaved pairs) row order, per head."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_qk``."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def qk_heads(hf_name: str, args) -> int | None:
    """Head count a Q/K tensor is permuted with at the GGUF boundary (None: not permuted)."""
    if ".self_attn.q_proj." in hf_name:
        return args.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return args.num_key_value_heads
    return None


@dataclass
class GGUFContents:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]  # GGUF names -> float32 arrays in PyTorch (row-major) shape
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF names -> "Q4_1", "F32", ...


def read_gguf(path: str | Path) -> GGUFContents:
    """Read metadata (as plain Python values) and all tensors, dequantised to float32."""
    from gguf.quants import dequantize

    path = Path(path)
    reader, metadata = _open(path)
    raw = list(reader.tensors)

    tensors: dict[str, np.ndarray] = {}
    tensor_types: dict[str, str] = {}
    for tensor in raw:
        qtype = tensor.tensor_type.name
        if qtype not in DEQUANTIZABLE:
            raise ModelLoadError(
                f"tensor {tensor.name!r} has type {qtype}, which homebake cannot dequantise "
                f"(supported: {', '.join(DEQUANTIZABLE)})",
                where=str(path), fix="use a GGUF quantised as F16, Q8_0, Q4_K_M or similar",
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        try:
            # a plain ndarray view: gguf slices memmaps row group by row group, which is slow
            values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
            # np.require copies read-only memmap views (F32 tensors) so parameters never alias the file
            tensors[tensor.name] = np.require(values, np.float32, ["C", "W"]).reshape(shape)
        except Exception as exc:
            raise ModelLoadError(f"tensor {tensor.name!r} is damaged: {_short(exc)}", where=str(path),
                                 fix=_DAMAGED_FIX) from None
        tensor_types[tensor.name] = qtype
    return GGUFContents(path=path, metadata=metadata, tensors=tensors, tensor_types=tensor_types)


def read_gguf_shapes(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata and, per tensor, an object with its ``shape`` (PyTorch order), without dequantising any;
    ``rope_freqs`` (a few floats whose values are part of the architecture) is read as an array."""
    from types import SimpleNamespace

    reader, metadata = _open(Path(path))
    shapes: dict[str, Any] = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shapes[tensor.name] = (np.array(tensor.data, dtype=np.float32).reshape(shape) if tensor.name == "rope_freqs.weight"
                               else SimpleNamespace(shape=shape))
    return metadata, shapes


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Only the metadata (plain Python values); tensors are not read."""
    return _open(Path(path))[1]


_DAMAGED_FIX = "the file is truncated or not a GGUF; download or export it again"


def _open(path: Path):
    import gguf

    from .gguf_layout import check_gguf_layout

    check_gguf_layout(path)  # every count, dimension and offset inside the file, before gguf's reader trusts them
    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: _field_value(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    except Exception as exc:  # the reader raises ValueError/struct.error/IndexError/... on damaged files
        raise ModelLoadError(f"cannot read GGUF: {_short(exc)}", where=str(path), fix=_DAMAGED_FIX) from None
    return reader, metadata


def gguf_state_dict(contents: GGUFContents, args, *, dtype: torch.dtype = torch.float32,
                    consume: bool = False) -> dict[str, torch.Tensor]:
    """HF-named tensors in HF layout (Q/K un-permuted for llama-architecture files), cast to ``dtype`` one at a
    time; ``consume`` drops each float32 array from ``contents`` once cast, so loading never holds the whole
    model twice (float32 and ``dtype``)."""
    arch = contents.metadata.get("general.architecture")
    permuted = arch in PERMUTED_QK_ARCHS
    state: dict[str, torch.Tensor] = {}
    for name in list(contents.tensors):
        array = contents.tensors.pop(name) if consume else contents.tensors[name]
        if name in NON_WEIGHT_TENSORS:
            continue
        hf_name = gguf_to_hf_name(name, arch)
        if hf_name is None:
            raise ModelLoadError(
                f"unexpected tensor {name!r} (not part of a {arch} decoder homebake knows)",
                where=str(contents.path), fix="use a GGUF of a supported dense decoder model",
            )
        tensor = torch.from_numpy(array)
        offset = norm_offset(hf_name, arch)
        if offset:
            tensor = tensor - offset
        heads = qk_heads(hf_name, args) if permuted else None
        if heads is not None:
            if tensor.shape[0] % (2 * heads):
                raise ModelLoadError(
                    f"tensor {name!r} has {tensor.shape[0]} rows, not a multiple of 2 x {heads} heads",
                    where=str(contents.path), fix="the file's head counts do not match its tensors",
                )
            tensor = unpermute_qk(tensor, heads)
        state[hf_name] = tensor.to(dtype)
        del array, tensor
    return state


def _field_value(field) -> Any:
    """A metadata field as plain Python; float32 values become the shortest decimal that round-trips
    (1e-06, not 9.99999997e-07), so configs read from GGUF compare equal to the originals."""
    import gguf

    value = _plain(field.contents())
    if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
        as_short = lambda v: float(str(np.float32(v)))  # noqa: E731
        value = [as_short(v) for v in value] if isinstance(value, list) else as_short(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
