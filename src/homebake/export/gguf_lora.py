"""LoRA adapter as GGUF, for ``llama-cli --lora`` and Ollama's ``ADAPTER``.

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, and per adapted matrix two tensors named after the
base tensor, ``blk.N.attn_q.weight.lora_a`` (r x in) and ``...lora_b`` (out x r). llama.cpp applies
``W + alpha/r * B @ A``; rsLoRA's alpha/sqrt(r) is written as an equivalent alpha. For the "llama"
architecture the base Q/K rows are permuted at the GGUF boundary, so lora_B's rows get the same
permutation (permute(B @ A) = permute(B) @ A). DoRA's magnitude has no GGUF form and is refused.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..errors import ExportError
from ..model.args import GGUF_ARCH_OF_MODEL_TYPE
from ..model.gguf_file import PERMUTED_QK_ARCHS, hf_to_gguf_name, permute_qk, qk_heads

LORA_TYPES = ("F32", "F16", "Q8_0")


def gguf_alpha(lora_config) -> float:
    """The alpha llama.cpp needs so that alpha/r equals our scaling (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
    return float(lora_config.scaling * lora_config.r)


def refuse_unless_plain_lora(method: str, where: str) -> None:
    if method == "dora":
        raise ExportError("a DoRA adapter cannot be written as a GGUF LoRA (llama.cpp has no DoRA magnitude)",
                          where=where, fix="export the merged model instead: --format gguf (or ollama)")
    if method != "lora":
        raise ExportError(f"a {'full fine-tune' if method == 'full' else 'model'} has no adapter to write as a GGUF LoRA",
                          where=where, fix="export the whole model instead: --format gguf (or ollama)")


def write_gguf_lora(path: str | os.PathLike, adapter_state: dict[str, torch.Tensor], lora_config, args, *,
                    tensor_type: str = "F32", name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Write the adapter as a GGUF LoRA at ``path`` (atomically); returns {tensor name: shape}."""
    import gguf
    from gguf.quants import quantize

    from ..adapters.lora import split_adapter_state
    from .gguf_writer import save_atomically

    if lora_config.use_dora:
        refuse_unless_plain_lora("dora", str(path))
    if tensor_type not in LORA_TYPES:
        raise ExportError(f"GGUF LoRA type {tensor_type!r} is not supported", where="--quant",
                          fix=f"use one of {', '.join(LORA_TYPES)}")
    arch = GGUF_ARCH_OF_MODEL_TYPE.get(args.model_type)
    if arch is None:
        raise ExportError(f"cannot write a GGUF LoRA for model_type {args.model_type!r}", where="base model")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(lora_config))
    writer.add_name(name or "homebake LoRA")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written: dict[str, tuple[int, ...]] = {}
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for module, parts in sorted(split_adapter_state(adapter_state, where=str(path)).items()):
        base_name = hf_to_gguf_name(f"{module}.weight", arch)
        if base_name is None:
            raise ExportError(f"{module} has no GGUF tensor name", where=str(path),
                              fix="GGUF LoRAs cover the decoder's linear layers only")
        a = parts["A"].detach().float().cpu()
        b = parts["B"].detach().float().cpu()
        heads = qk_heads(f"{module}.weight", args) if arch in PERMUTED_QK_ARCHS else None
        if heads is not None:
            b = permute_qk(b, heads)
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            array = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
            tensor_name = f"{base_name}.{suffix}"
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor_name, array.astype(np.float16))
            elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:
                writer.add_tensor(tensor_name, quantize(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(tensor_name, array)
            written[tensor_name] = tuple(array.shape)
    save_atomically(writer, path)
    return written


def lora_scaling_from_gguf(alpha: float, rank: int) -> float:
    """What llama.cpp multiplies B @ A by for a file with this alpha and rank."""
    return alpha / rank if rank else math.nan
