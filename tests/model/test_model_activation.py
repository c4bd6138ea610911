"""The gated MLP activation against its written-out form: values, gradients and what backward keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from homebake.model.activation import gated_activation

WRITTEN_OUT = {"silu": lambda gate, up: F.silu(gate) * up,
               "gelu_pytorch_tanh": lambda gate, up: F.gelu(gate, approximate="tanh") * up}


def _grads(forward, gate, up):
    gate, up = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    out = forward(gate, up)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)).sum().backward()
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("kind", sorted(WRITTEN_OUT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_the_written_out_form(kind, dtype):
    generator = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 64, generator=generator).mul(3).to(dtype) for _ in range(2))
    got = _grads(lambda g, u: gated_activation(g, u, kind), gate, up)
    want = _grads(WRITTEN_OUT[kind], gate, up)
    for a, b in zip(got, want):  # the same operations in the same dtype: equal to the bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.dtype == dtype


def test_backward_keeps_the_gate_and_up_only():
    gate, up = (torch.randn(16, 32, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_activation(gate, up)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        WRITTEN_OUT["silu"](gate, up)
    assert len(saved) == 3  # the written-out form also keeps silu(gate)


def test_an_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown gated activation 'relu'"):
        gated_activation(torch.ones(2), torch.ones(2), "relu")
