"""The gated MLP activation ``act(gate) * up`` (SwiGLU, Gemma's GeGLU) as one autograd function.

Written out, autograd keeps the gate (for the activation's backward), ``act(gate)`` and ``up`` (for the
product's): three intermediate-sized tensors per token and layer, beside the product the down projection
keeps. Here only the gate and ``up`` are kept and ``act(gate)`` is computed again in backward, one cheap
elementwise pass; the values and gradients are the same operations as the written-out form, in the same dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FORWARD = {"silu": F.silu, "gelu_pytorch_tanh": lambda gate: F.gelu(gate, approximate="tanh")}
_BACKWARD = {"silu": torch.ops.aten.silu_backward,
             "gelu_pytorch_tanh": lambda grad, gate: torch.ops.aten.gelu_backward(grad, gate, approximate="tanh")}


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind: str):
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return _FORWARD[kind](gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = _BACKWARD[ctx.kind](grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * _FORWARD[ctx.kind](gate)
        return grad_gate, grad_up, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` with ``act`` silu or the tanh-approximated gelu (``ModelArgs.hidden_act`` names)."""
    if kind not in _FORWARD:
        raise ValueError(f"unknown gated activation {kind!r}; expected one of {sorted(_FORWARD)}")
    if gate.dtype != up.dtype:  # autocast can hand over mixed dtypes; the written-out form would promote
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    return _GatedActivation.apply(gate, up, kind)
