"""Rotary position embeddings: one factory keyed on ``rope_scaling["rope_type"]``, HF's rotate_half layout.

Each rope type only changes the inverse frequencies (and, for some types, an attention scaling factor
applied to cos/sin). Adding a type means adding one function to ``_SCALERS``.
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


def _linear(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    return inv_freq / float(scaling["factor"])


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


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
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
    return torch.where(medium, smoothed, scaled)


_SCALERS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "default": lambda inv_freq, scaling: inv_freq,
    "linear": _linear,
    "llama3": _llama3,
}


def rope_inv_freq(args) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float32 [head_dim/2], attention scaling applied to cos/sin) for ``args``."""
    scaling = args.rope_scaling or {}
    rope_type = args.rope_type
    if rope_type not in _SCALERS:
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(_SCALERS)})",
            where="model config field 'rope_scaling'",
        )
    inv_freq = _SCALERS[rope_type](base_inv_freq(args.rope_theta, args.head_dim), scaling)
    return inv_freq, float(scaling.get("attention_factor", 1.0) or 1.0)


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
    return x * cos + rotate_half(x) * sin


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
