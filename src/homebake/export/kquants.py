"""Q4_K, Q5_K and Q6_K quantisers in numpy.

The ``gguf`` package can dequantise K-quants but not produce them, so homebake carries its own
quantiser. The byte layouts are the ones ``gguf.quants`` (and llama.cpp) read back; the search for
each sub-block's scale (and min) follows the idea of llama.cpp's reference quantiser: try a few
candidate scales around the naive one and keep the one with the smallest weighted squared error
under a least-squares refit. Everything is vectorised over blocks and processed in chunks, so
memory stays bounded for large tensors.

Super-block layouts (256 values each, ``QK_K``):
- Q4_K (144 bytes): d f16, dmin f16, 12 bytes of packed 6-bit (scale, min) for 8 sub-blocks of 32,
  128 bytes of 4-bit codes. value = d*scale*q - dmin*min.
- Q5_K (176 bytes): as Q4_K plus 32 bytes holding the 5th bit of every code.
- Q6_K (210 bytes): 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (sub-blocks of 16),
  d f16. value = d*scale*(q - 32).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256
_CHUNK_BLOCKS = 4096  # super-blocks per chunk: ~4 MiB of float32 per working array
_EPS = 1e-15  # a group whose largest magnitude is below this quantises to zeros

BLOCK_BYTES = {
    GGMLQuantizationType.Q4_K: 144,
    GGMLQuantizationType.Q5_K: 176,
    GGMLQuantizationType.Q6_K: 210,
}
K_QUANT_TYPES = tuple(BLOCK_BYTES)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best (scale, min) for each row of ``x`` so that x ≈ scale*q - min with q in [0, nmax].

    Returns (scale, min) with min >= 0 (the offset is subtracted). Candidates: the naive range
    scale, then nstep+1 inverse scales (nmax + rmin + k*rdelta)/range, each followed by a weighted
    least-squares refit of scale and offset for the codes it produced.
    """
    lo = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span).astype(np.float32)
    shifted = x - lo[:, None]
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)

    iscale = nmax / span
    codes = np.clip(np.rint(shifted * iscale[:, None]), 0, nmax)
    scale = 1.0 / iscale
    offset = lo.copy()
    best = (w * np.square(scale[:, None] * codes + offset[:, None] - x)).sum(axis=1)

    for step in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * step) / span
        codes = np.clip(np.rint(shifted * iscale[:, None]), 0, nmax)
        wl = w * codes
        sum_l = wl.sum(axis=1)
        sum_l2 = (wl * codes).sum(axis=1)
        sum_xl = (wl * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        valid = det > 0
        det = np.where(valid, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # A positive offset cannot be stored (min is subtracted): refit the scale alone.
        positive = this_offset > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_offset = np.where(positive, 0.0, this_offset)
        err = (w * np.square(this_scale[:, None] * codes + this_offset[:, None] - x)).sum(axis=1)
        better = valid & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_offset, offset)

    scale = np.where(flat, 0.0, scale)
    offset = np.where(flat, lo, offset)
    return scale.astype(np.float32), (-offset).astype(np.float32)


def _fit_symmetric_scale(x: np.ndarray, nmax: int) -> np.ndarray:
    """Best signed scale per row so that x ≈ scale*q with q in [-nmax, nmax-1], weighted by x².

    The sign is chosen so the largest-magnitude value lands on -nmax, using the extra negative code.
    """
    idx = np.abs(x).argmax(axis=1)
    peak = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    tiny = np.abs(peak) < _EPS
    peak = np.where(tiny, 1.0, peak).astype(np.float32)
    w = x * x

    def candidate(iscale):
        codes = np.clip(np.rint(x * iscale[:, None]), -nmax, nmax - 1)
        wl = w * codes
        return (wl * x).sum(axis=1), (wl * codes).sum(axis=1)

    sum_lx, sum_l2 = candidate(-nmax / peak)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0), 0.0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2 = candidate(-(nmax + 0.1 * step) / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        new_scale = sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sum_lx, best)
    return np.where(tiny, 0.0, scale).astype(np.float32)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into the 12-byte K-quant layout."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _asymmetric_blocks(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K math: returns (d f16, dmin f16, packed scales, codes uint8 (n, 256))."""
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    # Weight large-magnitude values more (they matter most in a dot product), never zero.
    weights = np.sqrt(np.mean(sub * sub, axis=1, keepdims=True)) + np.abs(sub)
    scales, mins = _fit_scale_min(sub, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)

    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    sc = np.clip(np.rint(scales * inv_scale[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins * inv_min[:, None]), 0, 63).astype(np.uint8)
    d = _f16(max_scale / 63.0)
    dmin = _f16(max_min / 63.0)

    # Codes against the scales as they will be read back (f16 super-scale times 6-bit scale).
    step = (d.astype(np.float32)[:, None] * sc).reshape(n * 8, 1)
    offset = (dmin.astype(np.float32)[:, None] * mn).reshape(n * 8, 1)
    usable = step != 0
    codes = np.rint((sub + offset) / np.where(usable, step, 1.0))
    codes = np.where(usable, np.clip(codes, 0, nmax), 0).astype(np.uint8).reshape(n, QK_K)
    return d, dmin, _pack_scale_min(sc, mn), codes


def _pack_low_nibbles_q4k(codes: np.ndarray) -> np.ndarray:
    """128 bytes: each 32-byte group holds sub-block 2i in low and 2i+1 in high nibbles."""
    n = codes.shape[0]
    pairs = (codes & 0x0F).reshape(n, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, codes = _asymmetric_blocks(blocks, nmax=15, rmin=-1.0, nstep=20)
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, _pack_low_nibbles_q4k(codes)],
        axis=1,
    )


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, codes = _asymmetric_blocks(blocks, nmax=31, rmin=-0.5, nstep=15)
    n = codes.shape[0]
    # Bit j of high-bit byte l is the 5th bit of element l of sub-block j.
    high = (codes >> 4).reshape(n, 8, 32).astype(np.uint8)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qh = np.bitwise_or.reduce(high << shifts, axis=1).astype(np.uint8)
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh, _pack_low_nibbles_q4k(codes)],
        axis=1,
    )


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    scales = _fit_symmetric_scale(sub, nmax=32).reshape(n, 16)
    idx = np.abs(scales).argmax(axis=1)
    peak = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    empty = np.abs(peak) < _EPS
    iscale = np.where(empty, 0.0, -128.0 / np.where(empty, 1.0, peak))
    d = _f16(np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, iscale)))
    sc = np.clip(np.rint(scales * iscale[:, None]), -128, 127).astype(np.int8)

    step = (d.astype(np.float32)[:, None] * sc).reshape(n * 16, 1)
    usable = step != 0
    codes = np.rint(sub / np.where(usable, step, 1.0))
    codes = (np.where(usable, np.clip(codes, -32, 31), 0) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    # Per 128-value half h: element 32k + l sits in ql byte 32*(k%2) + l (nibble k//2) and in
    # qh byte l (bits 2k, 2k+1).
    low = codes & 0x0F
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    high = (codes >> 4).astype(np.uint8)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    qh = np.bitwise_or.reduce(high << shifts, axis=2).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


_QUANTIZERS = {
    GGMLQuantizationType.Q4_K: _quantize_q4_k,
    GGMLQuantizationType.Q5_K: _quantize_q5_k,
    GGMLQuantizationType.Q6_K: _quantize_q6_k,
}


def can_quantize(shape: tuple[int, ...]) -> bool:
    """K-quants need rows (the last dimension) that are a multiple of 256."""
    return len(shape) >= 1 and shape[-1] % QK_K == 0


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantise ``data`` (rows along the last axis) to ``qtype``.

    Returns uint8 of shape (..., row_len // 256 * block_bytes), the layout ``gguf.quants.dequantize``
    and ``GGUFWriter.add_tensor(..., raw_dtype=qtype)`` expect.
    """
    if qtype not in _QUANTIZERS:
        raise ValueError(f"not a K-quant type: {qtype!r}")
    if not can_quantize(data.shape):
        raise ValueError(f"row length {data.shape[-1] if data.ndim else 0} is not a multiple of {QK_K}")
    rows = np.ascontiguousarray(data, dtype=np.float32)
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)
    fn = _QUANTIZERS[qtype]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start:start + _CHUNK_BLOCKS] = fn(blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * BLOCK_BYTES[qtype])
