"""QLoRA base storage: NF4 4-bit weights with double-quantised block scales.

Layout (the QLoRA paper's, the same bytes as bitsandbytes' ``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)``, whose quantised state this module dequantises bit for bit):

* the flattened weight is cut into blocks of 64 values; each block keeps its absolute maximum and every value
  becomes the index of the nearest NF4 code value of ``w / absmax`` (ties go to the lower code);
* two 4-bit indices are packed per byte, the first one in the high nibble;
* double quantisation: the block absmaxes minus their mean are quantised to 8 bits with bitsandbytes'
  signed dynamic map, in blocks of 256 that each keep one fp32 scale. We round to the nearest code;
  bitsandbytes' CPU kernel picks the other neighbour for ~0.2% of these 8-bit codes, all within ~1e-5 of a
  midpoint between two codes.

Storage is therefore 0.5 byte per weight + 1 byte per 64 weights + 4 bytes per 16,384 weights.
The weight is dequantised on the fly to the activation dtype; the base never receives a gradient, and the
dequantised matrix is not kept for backward (it is rebuilt there), so the frozen base costs ~0.52 byte/param
between forward and backward.

torchao 0.18's ``NF4Tensor`` was evaluated and not used: it requires the number of weights to be a multiple of
64 x 256 = 16,384, which e.g. SmolLM2's 576 x 576 projections are not.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # weights per absmax block
SCALE_BLOCK_SIZE = 256  # absmaxes per second-level scale
_CHUNK = BLOCK_SIZE * 65536  # weights quantised at a time, to bound the temporary memory

# The 16 NF4 values (QLoRA, appendix E): quantiles of N(0, 1) with equal mass per bin, an exact zero, and
# an asymmetric split (8 positive, 7 negative values) normalised to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_8bit_code() -> torch.Tensor:
    """The signed dynamic 8-bit map (Dettmers' dynamic tree quantisation) used for the absmax scales.

    For each decade 10^-6 .. 10^0 it holds the midpoints of a linear grid on [0.1, 1] with 2^i intervals
    (finer grids for larger magnitudes), mirrored for negative values, plus 0 and 1: 256 sorted values.
    """
    values = [torch.tensor([0.0, 1.0])]
    decades = 7
    for i in range(decades):
        grid = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        midpoints = (grid[:-1] + grid[1:]) / 2.0
        magnitude = (10.0 ** (i - (decades - 1))) * midpoints
        values += [magnitude, -magnitude]
    return torch.sort(torch.cat(values).float()).values


DYNAMIC_CODE = dynamic_8bit_code()
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
_DYNAMIC_BOUNDS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 values a packed byte stands for (high nibble first)."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1).to(device)


def _blockwise_codes(values: torch.Tensor, block: int, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the nearest-code index of values/absmax; ``values`` is fp32 with len % block == 0."""
    blocks = values.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide), as bitsandbytes does, so the codes agree bit for bit.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, bounds.to(values.device), out_int32=True).to(torch.uint8)
    return absmax, codes.view(-1)


def _pad_to(values: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-values.numel()) % multiple
    return F.pad(values, (0, pad)) if pad else values


class NF4Weight(nn.Module):
    """A frozen weight matrix stored as NF4 with double quantisation; ``dequantize(dtype)`` rebuilds it.

    Buffers (in the state dict): ``packed`` (uint8, two codes per byte), ``absmax_codes`` (uint8, one per
    64-weight block), ``absmax_scale`` (fp32, one per 256 blocks) and ``absmax_offset`` (fp32 scalar).
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the dtype it was quantised from: the default for dequantize()
        numel = self.shape.numel()
        n_blocks = -(-numel // BLOCK_SIZE)
        n_scales = -(-n_blocks // SCALE_BLOCK_SIZE)
        self.register_buffer("packed", torch.zeros(n_blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(n_scales, dtype=torch.float32, device=device))
        self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor) -> "NF4Weight":
        if not weight.is_floating_point():
            raise TypeError(f"NF4 quantises floating-point weights, got {weight.dtype}")
        nf4 = cls(tuple(weight.shape), weight.dtype, weight.device)
        flat = weight.detach().reshape(-1)
        absmax = torch.empty(nf4.absmax_codes.numel(), dtype=torch.float32, device=weight.device)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = _pad_to(flat[start:start + _CHUNK].float(), BLOCK_SIZE)
            block_absmax, codes = _blockwise_codes(chunk, BLOCK_SIZE, _NF4_BOUNDS)
            first_block = start // BLOCK_SIZE
            absmax[first_block:first_block + block_absmax.numel()] = block_absmax
            nf4.packed[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        # Double quantisation: centre the absmaxes on their mean, then 8-bit dynamic codes per 256 of them.
        offset = absmax.mean()
        scale, scale_codes = _blockwise_codes(_pad_to(absmax - offset, SCALE_BLOCK_SIZE), SCALE_BLOCK_SIZE,
                                              _DYNAMIC_BOUNDS)
        nf4.absmax_codes.copy_(scale_codes[:absmax.numel()])
        nf4.absmax_scale.copy_(scale)
        nf4.absmax_offset.copy_(offset)
        return nf4

    def block_absmax(self) -> torch.Tensor:
        """The (dequantised) fp32 absmax of every 64-weight block."""
        code = DYNAMIC_CODE.to(self.packed.device)
        scale = self.absmax_scale.repeat_interleave(SCALE_BLOCK_SIZE)[:self.absmax_codes.numel()]
        return code[self.absmax_codes.int()] * scale + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the dtype it was quantised from). Computed in fp32, then cast."""
        # index_select is ~3x faster than advanced indexing for this gather on CPU.
        values = torch.index_select(_pair_table(self.packed.device), 0, self.packed.int()).view(-1, BLOCK_SIZE)
        values.mul_(self.block_absmax().unsqueeze(1))
        values = values.view(-1)[:self.shape.numel()].view(self.shape)
        return values.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move these buffers but never round the fp32 scales or touch the codes.
        for name, buffer in self._buffers.items():
            if buffer is not None:
                probe = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device))
                self._buffers[name] = buffer.to(device=probe.device)
        return self

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={BLOCK_SIZE}"


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T (+ bias) with W dequantised on the fly; backward rebuilds W instead of keeping it alive."""

    @staticmethod
    def forward(ctx, x, nf4: NF4Weight, bias, dequantized):
        ctx.nf4 = nf4
        weight = dequantized if dequantized is not None else nf4.dequantize(x.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.nf4.dequantize(grad_out.dtype)
        return grad_x, None, None, None


def nf4_linear(x: torch.Tensor, nf4: NF4Weight, bias: torch.Tensor | None = None,
               dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over an NF4 weight in the activation dtype; pass ``dequantized`` if the caller already has it."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _NF4Matmul.apply(x, nf4, bias, dequantized)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (``weight_nf4``); the bias stays as it was."""

    def __init__(self, weight_nf4: NF4Weight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight_nf4.shape
        self.weight_nf4 = weight_nf4
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        return cls(NF4Weight.quantize(linear.weight), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
