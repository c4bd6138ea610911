"""A minimal but real GGUF writer: HF-named state dict + ModelArgs -> a .gguf llama.cpp and transformers load.

Metadata keys, tensor names and the Q/K row permutation follow llama.cpp's convert_hf_to_gguf.py:
Llama/Mistral/SmolLM2 are written as architecture "llama" with Q permuted by the head count and K by
the KV-head count; Qwen2/Qwen3, Gemma 2 ("gemma2"), Gemma 3 ("gemma3") and Phi-3 ("phi3") unpermuted.
Llama 3.x RoPE scaling becomes the ``rope_freqs`` tensor, Phi-3's LongRoPE the ``rope_factors_long`` /
``rope_factors_short`` tensors (+ ``rope.scaling.attn_factor``), linear and YaRN scaling the
``rope.scaling.*`` keys; dynamic NTK has no GGUF form and is written as plain RoPE (llama.cpp's converter
does the same: identical within max_position_embeddings). Gemma's norms are stored as ``1 + weight``.
Keys llama.cpp derives itself are written too, so homebake reads back exactly what it wrote:
``attention.scale`` (Gemma's query_pre_attn_scalar), ``attention.sliding_window_pattern`` (per layer)
and ``rope.freq_base_swa`` (Gemma 3's local RoPE base).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..errors import ExportError
from ..model.args import GGUF_ARCH_OF_MODEL_TYPE, ModelArgs
from ..model.gguf_file import PERMUTED_QK_ARCHS, hf_to_gguf_name, norm_offset, permute_qk, qk_heads
from ..model.rope import base_inv_freq, llama3_factors, longrope_default_attention_factor

TOKEN_UNUSED = 5  # llama.cpp's token type of placeholder tokens

WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_FILE_TYPE = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    # mixes written by homebake.export.gguf (per-tensor types, K-quants from homebake.export.kquants)
    "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_M": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
}


def write_gguf(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    args: ModelArgs,
    *,
    tokenizer_metadata: Mapping[str, Any] | None = None,
    tensor_type: str = "F32",
    name: str | None = None,
) -> Path:
    """Write ``state_dict`` (HF names, HF layout) as a GGUF at ``path`` (atomically) and return the path.

    Matrices are stored as ``tensor_type``; norms, biases and matrices whose rows do not fill whole
    quantisation blocks stay F32 / F16, as llama.cpp's own converter does.
    """
    import gguf

    if tensor_type not in WRITABLE_TYPES:
        raise ExportError(f"GGUF tensor type {tensor_type!r} is not supported",
                          where="tensor_type", fix=f"use one of {', '.join(WRITABLE_TYPES)}")
    arch = GGUF_ARCH_OF_MODEL_TYPE.get(args.model_type)
    if arch is None:
        raise ExportError(f"cannot write model_type {args.model_type!r} as GGUF", where="model config")
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    write_model_metadata(writer, args, arch, tensor_type, name)
    tokenizer_metadata = dict(tokenizer_metadata or {})
    # keep the config's special ids even when no tokenizer metadata is given (the tokenizer's win)
    for key, value in (("tokenizer.ggml.bos_token_id", args.bos_token_id),
                       ("tokenizer.ggml.eos_token_id", args.eos_token_id),
                       ("tokenizer.ggml.padding_token_id", args.pad_token_id)):
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and key not in tokenizer_metadata:
            tokenizer_metadata[key] = value
    for key, value in pad_vocabulary(tokenizer_metadata, args.vocab_size).items():
        write_metadata_value(writer, key, value)

    qtype = gguf.GGMLQuantizationType[tensor_type]
    for gguf_name, data in gguf_tensors(state_dict, args):
        array, raw_dtype = _encode(data.numpy(), qtype)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    add_rope_freqs(writer, args)
    save_atomically(writer, path)
    return path


def gguf_tensors(state_dict: Mapping[str, torch.Tensor], args) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every weight to write, one at a time, so only
    one float32 copy exists while it is encoded."""
    arch = GGUF_ARCH_OF_MODEL_TYPE[args.model_type]
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and args.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = hf_to_gguf_name(hf_name, arch)
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF equivalent", where="model weights",
                              fix="merge adapters into the base weights before exporting to GGUF")
        data = tensor.detach().to(device="cpu", dtype=torch.float32)
        heads = qk_heads(hf_name, args) if arch in PERMUTED_QK_ARCHS else None
        if heads is not None:
            data = permute_qk(data, heads)
        offset = norm_offset(hf_name, arch)
        if offset:
            data = data + offset
        yield gguf_name, data


def add_rope_freqs(writer, args: ModelArgs) -> list[str]:
    """RoPE scaling that llama.cpp reads from tensors: Llama 3's ``rope_freqs`` divisors, Phi-3's LongRoPE
    ``rope_factors_long`` / ``rope_factors_short``. Returns the names of the tensors written."""
    if args.rope_type == "llama3":
        factors = llama3_factors(base_inv_freq(args.rope_theta, args.head_dim).numpy(), args.rope_scaling)
        writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
        return ["rope_freqs.weight"]
    if args.rope_type == "longrope":
        for kind in ("long", "short"):
            writer.add_tensor(f"rope_factors_{kind}.weight",
                              np.asarray(args.rope_scaling[f"{kind}_factor"], dtype=np.float32))
        return ["rope_factors_long.weight", "rope_factors_short.weight"]
    return []


def pad_vocabulary(tokenizer_metadata: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """Tokenizer metadata with placeholder tokens up to the model's vocabulary size (embedding rows beyond
    the tokenizer, e.g. Gemma 3's 262208 rows for 262144 tokens), as llama.cpp's converter writes them."""
    metadata = dict(tokenizer_metadata)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        return metadata
    if len(tokens) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows",
                          where="tokenizer", fix="export with the tokenizer the model was trained with")
    missing = vocab_size - len(tokens)
    if missing:
        metadata["tokenizer.ggml.tokens"] = [*tokens, *(f"[PAD{i}]" for i in range(len(tokens), vocab_size))]
        if "tokenizer.ggml.token_type" in metadata:
            metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], *[TOKEN_UNUSED] * missing]
        if "tokenizer.ggml.scores" in metadata:
            metadata["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], *[-10000.0] * missing]
    return metadata


def save_atomically(writer, path: str | os.PathLike) -> None:
    """Write a filled GGUFWriter to ``path`` through a temporary sibling, so a crash never leaves a
    half-written GGUF under the final name."""
    from ..fsutil import replace_file, temp_file_for

    path = Path(path)
    tmp = temp_file_for(path)  # the umask's normal mode: a llama.cpp / Ollama server may run as another user
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        replace_file(tmp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_model_metadata(writer, args: ModelArgs, arch: str, tensor_type: str, name: str | None) -> None:
    import gguf

    # transformers' GGUF loader treats "mistral" in the name as a separate (unsupported) architecture,
    # so the default name avoids model_type; pass the model's real name to override
    writer.add_name(name or "homebake model")
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.rotary_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_vocab_size(args.vocab_size)
    scaling = args.rope_scaling or {}
    if args.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif args.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        for key, name in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if scaling.get(key) is not None:
                writer.add_float32(f"{arch}.rope.scaling.{name}", float(scaling[key]))
    if arch == "llama" and args.sliding_window:
        writer.add_sliding_window(args.sliding_window)
    if args.is_gemma:
        _gemma_metadata(writer, args, arch)
    if arch == "phi3":
        original = int(scaling.get("original_max_position_embeddings", args.max_position_embeddings))
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(args.sliding_window or 0)  # 0 = none (llama.cpp's converter convention)
        if args.rope_type == "longrope":
            attn = scaling.get("attention_factor")
            writer.add_rope_scaling_attn_factors(float(attn) if attn is not None else
                                                 longrope_default_attention_factor(args.max_position_embeddings,
                                                                                   original))
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPE[tensor_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gemma_metadata(writer, args: ModelArgs, arch: str) -> None:
    if arch == "gemma2" and not (args.attn_logit_softcapping and args.final_logit_softcapping):
        raise ExportError("a Gemma 2 model without soft-capping has no GGUF form (llama.cpp always soft-caps "
                          "Gemma 2, with 50/30 when the file says nothing)", where="model config",
                          fix="export the merged Hugging Face folder instead (--format hf)")
    if args.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(float(args.attn_logit_softcapping))
    if args.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(args.final_logit_softcapping))
    if args.sliding_window:
        writer.add_sliding_window(int(args.sliding_window))
        writer.add_sliding_window_pattern([args.layer_window(i) is not None for i in range(args.num_hidden_layers)])
    writer.add_attention_scale(float(args.query_pre_attn_scalar or args.head_dim) ** -0.5)
    if arch == "gemma3" and args.rope_local_base_freq is not None:
        writer.add_rope_freq_base_swa(float(args.rope_local_base_freq))


def _encode(array: np.ndarray, qtype) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype for GGUFWriter.add_tensor) for one tensor stored as ``qtype`` where possible."""
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), None  # rows do not fill whole blocks
    return quantize(np.ascontiguousarray(array), qtype), qtype


# Value types llama.cpp insists on for well-known keys (it reads token ids as uint32, token types as int32).
_KEY_TYPES = {"tokenizer.ggml.token_type": "INT32", "tokenizer.ggml.scores": "FLOAT32"}


def write_metadata_value(writer, key: str, value: Any) -> None:
    import gguf

    V = gguf.GGUFValueType
    if isinstance(value, (list, tuple)):
        sub = _KEY_TYPES.get(key)
        sub_type = V[sub] if sub else _scalar_type(value[0] if value else "", key)
        writer.add_key_value(key, list(value), V.ARRAY, sub_type=sub_type)
    else:
        writer.add_key_value(key, value, _scalar_type(value, key))


def _scalar_type(value: Any, key: str):
    import gguf

    V = gguf.GGUFValueType
    if isinstance(value, (bool, np.bool_)):
        return V.BOOL
    if isinstance(value, (int, np.integer)):
        if key.endswith("_token_id") or 0 <= value < 2**32:
            return V.UINT32
        return V.INT64
    if isinstance(value, (float, np.floating)):
        return V.FLOAT32
    if isinstance(value, str):
        return V.STRING
    raise ExportError(f"metadata value for {key!r} has unsupported type {type(value).__name__}",
                      where="GGUF metadata", fix="pass str, int, float, bool or lists of them")
