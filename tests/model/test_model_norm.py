"""The RMSNorm autograd function equals F.rms_norm (values and gradients) and keeps no float32 copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from homebake.model.norm import rms_norm


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 48)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_fp32_values_and_gradients_equal_f_rms_norm(shape, with_weight):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3).requires_grad_(True)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).requires_grad_(True) if with_weight else None
    upstream = torch.randn(shape, generator=generator)
    ours = rms_norm(x, weight, 1e-5)
    reference = F.rms_norm(x, (shape[-1],), weight, 1e-5)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    inputs = (x, weight) if with_weight else (x,)
    got = torch.autograd.grad((ours * upstream).sum(), inputs)
    want = torch.autograd.grad((reference * upstream).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_equals_f_rms_norm_and_saves_no_float32_copy():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=generator).bfloat16().requires_grad_(True)
    weight = (torch.rand(256, generator=generator) + 0.5).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = rms_norm(x, weight, 1e-6)
    reference = F.rms_norm(x, (256,), weight, 1e-6)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - reference.float()).abs().max() <= 2 ** -6 * reference.float().abs().max()
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32) == 64 * 4  # one per row
    upstream = torch.randn(64, 256, generator=generator).bfloat16()
    (grad,) = torch.autograd.grad((ours * upstream).float().sum(), x)
    x32 = x.detach().float().requires_grad_(True)
    (want,) = torch.autograd.grad((F.rms_norm(x32, (256,), weight.float(), 1e-6) * upstream.float()).sum(), x32)
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - want).norm() / want.norm() < 1e-2
