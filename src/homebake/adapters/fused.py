"""The fused LoRA linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` as one autograd function.

Written out with PyTorch modules, a LoRA projection costs far more than its two thin matmuls: dropout
draws a float mask, divides it by 1-p and keeps both the mask and a dropped copy of the input for backward
(in bf16, ~4 bytes per input element per projection, seven projections per layer); ``* scaling`` and
``+ base`` each make an N x out temporary. Here:

- the dropout mask is a 1-byte keep mask (``keep_mask``), and ``1/(1-p)`` is folded with the scaling into
  the N x r intermediate, so the dropped input is never stored (backward rebuilds it from x and the mask);
- backward keeps only x (stored once however many projections read it), the mask and
  ``u = s/(1-p) * drop(x) A^T`` (N x r); the frozen weight is referenced, not copied (an NF4 weight is
  dequantised again in backward instead of being kept);
- the LoRA term is added into the base output in place (``addmm_``);
- projections that read the same input (q/k/v, gate/up: ``fused_lora_linears``) share one dropout mask on
  it, one masked copy of it and one A matmul over their stacked A matrices (and in backward one for the
  A gradients and one for the input gradient), instead of one of each per projection. Each adapter still
  sees inverted dropout with probability p on its input; the masks of sibling adapters are the same draw.

The gradients are those of the unfused expression (tested against ``LoraLinear``'s reference form and
PEFT). Everything runs in the activation dtype; fp32 adapter masters are cast to it (r x (in + out) values)
and receive fp32 gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Fast keep masks: one uniform 32-bit integer per element compared with a threshold, P(keep) = round(q 2^32) / 2^32.
_INT32_SPAN = 2 ** 32


def keep_threshold(keep: float) -> int:
    """The int32 ``t`` with P(draw < t) = round(keep 2^32) / 2^32 for a draw uniform over all 2^32 int32 values."""
    return round(keep * _INT32_SPAN) - 2 ** 31


def uniform_int32(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 draws uniform over all 2^32 values, from numpy's PCG64DXSM seeded by one draw of torch's generator.

    Seeded from torch's generator so that ``torch.manual_seed`` and the RNG state a checkpoint restores
    decide the masks; PCG64DXSM makes 64 random bits in about the time torch's CPU Mersenne Twister
    (single-threaded) makes 31, so a mask costs ~40% of ``random_``'s."""
    seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=generator))
    numel = max(1, math.prod(shape))
    words = np.random.PCG64DXSM(seed).random_raw((numel + 1) // 2)
    return torch.from_numpy(words).view(torch.int32)[:numel].view(shape)


def keep_mask(shape, p: float, device, *, fast: bool = False, generator: torch.Generator | None = None):
    """A bool mask, True with probability 1 - p (each element independently).

    ``fast=False`` draws it with ``bernoulli_`` exactly as ``torch.nn.functional.dropout`` does, so at the same
    seed the mask equals torch's (and PEFT's) dropout mask. ``fast=True`` (CPU) compares one uniform 32-bit
    integer per element (``uniform_int32``) with ``keep_threshold(1 - p)``: the keep probability is exact to
    2^-33 and the draw costs about a fifth of ``bernoulli_``'s 53-bit uniform doubles. Other devices use their
    own RNG.
    """
    device = torch.device(device)
    keep = 1.0 - p
    if device.type == "cpu":
        if fast:
            threshold = keep_threshold(keep)
            if threshold >= 2 ** 31:  # p = 0: every element kept
                return torch.ones(shape, dtype=torch.bool)
            return uniform_int32(shape, generator) < threshold
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(keep, generator=generator)
    if device.type == "cuda":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(keep, generator=generator)
    return torch.rand(shape, device=device, generator=generator) < keep


def _as_factor(keep: torch.Tensor) -> torch.Tensor:
    # The bool mask's bytes (0/1) as the factor: multiplying by a bool operand costs ~2x (a slower cast path).
    return keep.view(torch.uint8)


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * _as_factor(keep)


class LoraProjection(NamedTuple):
    """One frozen projection and its adapter: ``x weight^T + bias + scale * (x lora_a^T) lora_b^T``.

    ``weight`` is dense (out, in) in x's dtype, or None with ``nf4`` (an ``NF4Weight``, dequantised on the fly);
    ``lora_a`` (r, in) and ``lora_b`` (out, r) may be fp32 masters."""

    weight: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    nf4: object = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight if self.weight is not None else self.nf4.dequantize(dtype)


def _forward(x: torch.Tensor, keep: torch.Tensor | None, projections: Sequence[LoraProjection]):
    """The outputs, the stacked intermediate u = drop(x) A^T (scaled per projection), the stacked A and each B."""
    dtype = x.dtype
    a = torch.cat([p.lora_a.to(dtype) for p in projections]) if len(projections) > 1 else \
        projections[0].lora_a.to(dtype)
    b = [p.lora_b.to(dtype) for p in projections]
    u = F.linear(_masked(x, keep), a)
    outputs, start = [], 0
    for projection, b_i in zip(projections, b):
        u_i = u[:, start:start + b_i.shape[1]].mul_(projection.scale)
        bias = projection.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = F.linear(x, projection.dense(dtype), bias)
        outputs.append(y.addmm_(u_i, b_i.t()))
        start += b_i.shape[1]
    return outputs, u, a, b


_PER_PROJECTION = 4  # autograd inputs per projection: weight, bias, lora_a, lora_b


class _FusedLoraLinears(torch.autograd.Function):
    """x (N, in) -> one output per projection, all in x's dtype, one dropout mask for all; see the module docstring."""

    @staticmethod
    def forward(ctx, x, keep, extras, *tensors):  # noqa: D401 - autograd signature
        # ``extras``: (scale, nf4) per projection; ``tensors``: its weight, bias, lora_a, lora_b (tracked inputs)
        projections = [LoraProjection(tensors[i], tensors[i + 2], tensors[i + 3], scale, tensors[i + 1], nf4)
                       for i, (scale, nf4) in zip(range(0, len(tensors), _PER_PROJECTION), extras)]
        outputs, u, a, b = _forward(x, keep, projections)
        ctx.save_for_backward(x, keep, u, a, *(p.weight for p in projections), *b)
        ctx.extras = extras
        ctx.adapter_dtypes = [(p.lora_a.dtype, p.lora_b.dtype) for p in projections]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, keep, u, a, *rest = ctx.saved_tensors
        count = len(ctx.extras)
        weights, b = rest[:count], rest[count:]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need = [needs[3 + _PER_PROJECTION * i:3 + _PER_PROJECTION * (i + 1)] for i in range(count)]
        need_any_a = any(n[2] for n in need)
        grads: list[torch.Tensor | None] = [None] * (_PER_PROJECTION * count)
        grad_x, grad_u, start = None, [], 0
        for i, (grad_y, b_i, (scale, nf4)) in enumerate(zip(grad_outputs, b, ctx.extras)):
            rank = b_i.shape[1]
            grad_y = grad_y.contiguous()
            if need[i][3]:
                grads[_PER_PROJECTION * i + 3] = (grad_y.t() @ u[:, start:start + rank]).to(ctx.adapter_dtypes[i][1])
            if need[i][1]:
                grads[_PER_PROJECTION * i + 1] = grad_y.sum(0)
            if need_any_a or need_x:
                grad_u.append((grad_y @ b_i).mul_(scale))  # d loss / d (drop(x) A_i^T), N x r_i
            if need_x:
                dense = weights[i] if weights[i] is not None else nf4.dequantize(grad_y.dtype)
                grad_x = grad_y @ dense if grad_x is None else grad_x.addmm_(grad_y, dense)
            start += rank
        if grad_u:
            grad_u = torch.cat(grad_u, dim=1) if count > 1 else grad_u[0]
            if need_any_a:
                grad_a = grad_u.t() @ _masked(x, keep)
                start = 0
                for i, b_i in enumerate(b):
                    rank = b_i.shape[1]
                    if need[i][2]:
                        grads[_PER_PROJECTION * i + 2] = grad_a[start:start + rank].to(ctx.adapter_dtypes[i][0])
                    start += rank
            if need_x:
                if keep is None:
                    grad_x.addmm_(grad_u, a)
                else:
                    grad_x += (grad_u @ a).mul_(_as_factor(keep))
        return (grad_x, None, None, *grads)


def fused_lora_linears(x: torch.Tensor, projections: Sequence[LoraProjection], *, dropout: float = 0.0,
                       training: bool = False, fast_masks: bool = False) -> list[torch.Tensor]:
    """Each projection of ``x`` (``LoraProjection``) over its last dimension, computed in x's dtype together.

    Dropout with probability ``dropout`` applies to the adapters' input only, when ``training``, with one mask
    for all of them; ``fast_masks`` picks ``keep_mask``'s cheaper generator. The projections' ``scale`` is the
    LoRA scaling (the 1/(1-p) of dropout is added here). Without autograd the same maths runs without saving
    anything.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    keep = None
    if training and dropout > 0:
        keep = keep_mask(x2.shape, dropout, x.device, fast=fast_masks)
        projections = [p._replace(scale=p.scale / (1.0 - dropout)) for p in projections]
    tensors = [t for p in projections for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    tracked = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors))
    if tracked:
        outputs = _FusedLoraLinears.apply(x2, keep, tuple((p.scale, p.nf4) for p in projections), *tensors)
    else:
        outputs = _forward(x2, keep, projections)[0]
    return [y.view(*shape[:-1], y.shape[-1]) for y in outputs]


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, *, bias: torch.Tensor | None = None, nf4=None, dropout: float = 0.0,
                      training: bool = False, fast_masks: bool = False) -> torch.Tensor:
    """``x W^T + bias + scaling * B(A(dropout(x)))``: ``fused_lora_linears`` for one projection."""
    projection = LoraProjection(weight, lora_a, lora_b, scaling, bias, nf4)
    return fused_lora_linears(x, [projection], dropout=dropout, training=training, fast_masks=fast_masks)[0]
