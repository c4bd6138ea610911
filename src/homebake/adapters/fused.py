"""The fused LoRA linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` as one autograd function.

Written out with PyTorch modules, a LoRA projection costs far more than its two thin matmuls: dropout
draws a float mask, divides it by 1-p and keeps both the mask and a dropped copy of the input for backward
(in bf16, ~4 bytes per input element per projection, seven projections per layer); ``* scaling`` and
``+ base`` each make an N x out temporary. Here:

- the dropout mask is a 1-byte keep mask (``keep_mask``), and ``1/(1-p)`` is folded with the scaling into
  the N x r intermediate, so the dropped input is never stored (backward rebuilds it from x and the mask);
- backward keeps only x (the same tensor for q/k/v and for gate/up, so stored once), the mask and
  ``u = s/(1-p) * drop(x) A^T`` (N x r); the frozen weight is referenced, not copied (an NF4 weight is
  dequantised again in backward instead of being kept);
- the LoRA term is added into the base output in place (``addmm_``).

The gradients are those of the unfused expression (tested against ``LoraLinear``'s reference form and
PEFT). Everything runs in the activation dtype; fp32 adapter masters are cast to it (r x (in + out) values)
and receive fp32 gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Keep masks from full-range 31-bit random integers compared with a threshold: P(keep) = round(q 2^31) / 2^31.
_INT31 = 2 ** 31


def keep_mask(shape, p: float, device, *, fast: bool = False, generator: torch.Generator | None = None):
    """A bool mask, True with probability 1 - p (each element independently).

    ``fast=False`` draws it with ``bernoulli_`` exactly as ``torch.nn.functional.dropout`` does, so at the same
    seed the mask equals torch's (and PEFT's) dropout mask. ``fast=True`` (CPU) compares one 31-bit random
    integer per element with ``round((1 - p) 2^31)``: the keep probability is exact to 2^-32 and the draw
    costs about half as much as ``bernoulli_``'s 53-bit uniform doubles. Other devices use their own RNG.
    """
    device = torch.device(device)
    keep = 1.0 - p
    if device.type == "cpu":
        if fast:
            draws = torch.empty(shape, dtype=torch.int32, device=device).random_(generator=generator)
            return draws < round(keep * _INT31)
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(keep, generator=generator)
    if device.type == "cuda":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(keep, generator=generator)
    return torch.rand(shape, device=device, generator=generator) < keep


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep


class _FusedLoraLinear(torch.autograd.Function):
    """x (N, in) -> x W^T + bias + (scale * (x * keep) A^T) B^T, all in x's dtype; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, nf4, bias, lora_a, lora_b, keep, scale):
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dense = weight if weight is not None else nf4.dequantize(dtype)
        y = F.linear(x, dense, bias)
        u = F.linear(_masked(x, keep), a).mul_(scale)
        y.addmm_(u, b.t())
        ctx.save_for_backward(x, keep, u, weight, a, b)
        ctx.nf4, ctx.scale = nf4, scale
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, u, weight, a, b = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        grad_x = grad_bias = grad_a = grad_b = None
        grad_y = grad_y.contiguous()
        if need_b:
            grad_b = (grad_y.t() @ u).to(ctx.adapter_dtypes[1])
        if need_a or need_x:
            grad_u = (grad_y @ b).mul_(ctx.scale)  # d loss / d (x*keep A^T), N x r
            if need_a:
                grad_a = (grad_u.t() @ _masked(x, keep)).to(ctx.adapter_dtypes[0])
            if need_x:
                dense = weight if weight is not None else ctx.nf4.dequantize(grad_y.dtype)
                grad_x = grad_y @ dense
                lora = grad_u @ a
                if keep is not None:
                    lora.mul_(keep)
                grad_x += lora
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, None, None, grad_bias, grad_a, grad_b, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, *, bias: torch.Tensor | None = None, nf4=None, dropout: float = 0.0,
                      training: bool = False, fast_masks: bool = False) -> torch.Tensor:
    """``x W^T + bias + scaling * B(A(dropout(x)))`` over the last dimension of ``x``, computed in x's dtype.

    ``weight`` is the dense frozen weight (out, in) in x's dtype, or None with ``nf4`` (an ``NF4Weight``,
    dequantised on the fly). ``lora_a`` (r, in) and ``lora_b`` (out, r) may be fp32 masters. Dropout with
    probability ``dropout`` applies to the adapter input only, when ``training``; ``fast_masks`` picks
    ``keep_mask``'s cheaper generator. Without autograd the same maths runs without saving anything.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    keep = None
    if training and dropout > 0:
        keep = keep_mask(x2.shape, dropout, x.device, fast=fast_masks)
    scale = scaling / (1.0 - dropout) if keep is not None else scaling
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    tracked = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                           or (bias is not None and bias.requires_grad))
    if tracked:
        y = _FusedLoraLinear.apply(x2, weight, nf4, bias, lora_a, lora_b, keep, scale)
    else:
        dense = weight if weight is not None else nf4.dequantize(x.dtype)
        y = F.linear(x2, dense, bias)
        u = F.linear(_masked(x2, keep), lora_a.to(x.dtype)).mul_(scale)
        y.addmm_(u, lora_b.to(x.dtype).t())
    return y.view(*shape[:-1], y.shape[-1])
