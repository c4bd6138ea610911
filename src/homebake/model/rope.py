"""Rotary position embeddings: one factory keyed on ``rope_scaling["rope_type"]``, HF's rotate_half layout.

Each rope type only changes the inverse frequencies (and, for some types, an attention scaling factor
applied to cos/sin). Adding a type means adding one function to ``_SCALERS``. Types, as transformers
computes them: default, linear, llama3 (Llama 3.x), yarn (Qwen2.5 long context, DeepSeek-style mscale),
longrope (Phi-3/3.5/4-mini: per-frequency short and long factors; "su" is its old name) and dynamic
(NTK-aware, rescaled beyond max_position_embeddings). longrope and dynamic depend on the sequence length:
``rope_inv_freq(args, seq_len=n)`` gives the table for ``n`` positions (``length_dependent(args)`` says
whether it can differ from the default one). Partial rotary embeddings (``partial_rotary_factor``) rotate
the first ``args.rotary_dim`` channels of each head and pass the rest through.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import UnsupportedArchitectureError


def base_inv_freq(rope_theta: float, head_dim: int) -> torch.Tensor:
    """Plain RoPE inverse frequencies, computed exactly as transformers does (float32)."""
    # explicit CPU device: the model may be built under a meta-device context
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (rope_theta**exponents)


def _linear(inv_freq: torch.Tensor, scaling: dict, args, seq_len) -> tuple[torch.Tensor, float]:
    return inv_freq / float(scaling["factor"]), 1.0


def llama3_factors(inv_freq: np.ndarray | torch.Tensor, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x scaling (what llama.cpp stores as the ``rope_freqs`` tensor)."""
    inv = np.asarray(inv_freq, dtype=np.float64)
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = (old_context / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, medium))


def _llama3(inv_freq: torch.Tensor, scaling: dict, args, seq_len) -> tuple[torch.Tensor, float]:
    # Same arithmetic as transformers' _compute_llama3_parameters, in float32 torch ops.
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: torch.Tensor, scaling: dict, args, seq_len) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp between (beta_fast/beta_slow
    rotations over the original context), and scale attention by the mscale."""
    dim = args.rotary_dim
    base = args.rope_theta
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or args.max_position_embeddings / original)
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the channel whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (unchanged frequency), 0 = interpolate (divided by factor)
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep, float(attention)


def longrope_default_attention_factor(max_positions: int, original: int) -> float:
    factor = max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope(inv_freq: torch.Tensor, scaling: dict, args, seq_len) -> tuple[torch.Tensor, float]:
    """LongRoPE: frequencies divided per channel by the short factors, or by the long ones once the
    sequence is longer than the original (pretraining) context; attention scaled for the longer context."""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else args.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len and seq_len > original else "short_factor"
    return inv_freq / torch.tensor(scaling[key], dtype=torch.float32, device="cpu"), float(attention)


def _dynamic(inv_freq: torch.Tensor, scaling: dict, args, seq_len) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: plain RoPE up to max_position_embeddings, a larger base beyond it."""
    limit = args.max_position_embeddings
    if not seq_len or seq_len <= limit:
        return inv_freq, 1.0
    dim, factor = args.rotary_dim, float(scaling["factor"])
    base = args.rope_theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    return base_inv_freq(base, dim), 1.0


_SCALERS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": lambda inv_freq, scaling, args, seq_len: (inv_freq, 1.0),
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
    "longrope": _longrope,
    "dynamic": _dynamic,
}


def rope_inv_freq(args, *, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float32 [rotary_dim/2], attention scaling applied to cos/sin) for ``args``;
    ``seq_len`` selects the table of length-dependent types (longrope, dynamic)."""
    scaling = args.rope_scaling or {}
    rope_type = args.rope_type
    if rope_type not in _SCALERS:
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(_SCALERS)})",
            where="model config field 'rope_scaling'",
        )
    inv_freq, attention = _SCALERS[rope_type](base_inv_freq(args.rope_theta, args.rotary_dim), scaling, args, seq_len)
    if rope_type in ("default", "linear", "llama3", "dynamic"):
        attention = float(scaling.get("attention_factor", 1.0) or 1.0)
    return inv_freq, attention


def length_dependent(args) -> int | None:
    """The sequence length beyond which ``rope_inv_freq`` changes (longrope, dynamic), else None."""
    if args.rope_type == "longrope":
        return int(args.rope_scaling["original_max_position_embeddings"])
    if args.rope_type == "dynamic":
        return int(args.max_position_embeddings)
    return None


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, head_dim) for ``position_ids`` (B, T), computed in float32, cast once."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    # partial rotary embeddings: rotate the first channels, pass the rest through (Phi-4-mini)
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def llama3_scaling_from_factors(factors, rope_theta: float, head_dim: int, *, where: str = "GGUF file") -> dict | None:
    """Recover HF ``rope_scaling`` (rope_type llama3) from llama.cpp's ``rope_freqs`` divisors.

    Only ratios wavelength/original-context are identifiable, so we pick low_freq_factor = 1 (as every
    Llama 3.x release does) and solve for the rest; the result is checked to reproduce every divisor.
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    inv = base_inv_freq(rope_theta, head_dim).double().numpy()
    if f.shape != inv.shape:
        raise UnsupportedArchitectureError(
            f"rope_freqs has {f.size} values but the head dim implies {inv.size}", where=f"{where} tensor 'rope_freqs'"
        )
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    wavelen = 2 * math.pi / inv
    x = 1.0 / wavelen  # the formula is linear in 1/wavelength (in units of the original context)
    tol = 1e-5 * factor
    is_one, is_factor = np.abs(f - 1) <= tol, np.abs(f - factor) <= tol
    mid = ~is_one & ~is_factor
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    if mid.sum() >= 2:  # smooth = (x - lo) / (hi - lo) with lo/hi = low/high_freq_factor / original context
        slope, intercept = np.polyfit(x[mid], smooth, 1)
        lo, hi = -intercept / slope, -intercept / slope + 1 / slope
    elif mid.sum() == 1:  # assume Llama's high/low ratio of 4
        lo = x[mid][0] / (3 * smooth[0] + 1)
        hi = 4 * lo
    else:  # no medium band: put the band edges just inside the gap between the two groups
        hi = x[is_one].min() * (1 - 1e-6) if is_one.any() else x.max() * 2
        lo = x[is_factor].max() * (1 + 1e-6) if is_factor.any() else x.min() / 2
        lo = min(lo, hi / (1 + 1e-6))
    original_context, ratio = _tidy(1 / lo), _tidy(hi / lo)
    if original_context.is_integer():
        original_context = int(original_context)
    scaling = {
        "rope_type": "llama3",
        "factor": _tidy(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": float(ratio),
        "original_max_position_embeddings": original_context,
    }
    if not np.allclose(llama3_factors(inv, scaling), f, rtol=1e-4, atol=0):
        raise UnsupportedArchitectureError(
            "rope_freqs does not follow Llama 3 RoPE scaling", where=f"{where} tensor 'rope_freqs'",
            fix="this RoPE variant is not supported; use a model with default, linear or llama3 RoPE",
        )
    return scaling


def _tidy(value: float) -> float:
    """Snap a fitted value to the round number it almost certainly was in the original config."""
    nearest = float(round(value))
    return nearest if abs(value - nearest) <= 1e-4 * max(1.0, abs(value)) else float(value)
