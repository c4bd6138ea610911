"""Chunked, trained-positions-only cross entropy against full-logits torch cross entropy."""

import pytest
import torch
import torch.nn.functional as F

from homebake.train.loss import IGNORE_INDEX, chunked_cross_entropy, shift_targets


def reference(hidden, weight, targets):
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def make_case(seed=0, batch=3, seq=11, hidden=16, vocab=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[torch.rand(batch, seq, generator=gen) < 0.4] = IGNORE_INDEX
    return h, w, targets


@pytest.mark.parametrize("chunk_rows", [1, 4, 13, 1000])  # 13 and 1000: several softmax blocks, a short last one
@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_loss_and_grads_match_full_logits(chunk_rows, weight_grad):
    h, w, targets = make_case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    total, count = chunked_cross_entropy(h1, targets, w1, chunk_rows=chunk_rows)
    expected = reference(h2, w2, targets)
    assert count == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    (total * 0.7).backward()
    (expected * 0.7).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
    else:
        assert w1.grad is None


def test_callable_head_matches_full_logits():
    h, w, targets = make_case(seed=1)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    total, _ = chunked_cross_entropy(h1, targets, lambda x: x @ w.t(), chunk_rows=5)
    expected = reference(h2, w, targets)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    total.backward()
    expected.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_stay_close_to_fp32():
    h, w, targets = make_case(seed=2, dtype=torch.bfloat16)
    total, count = chunked_cross_entropy(h.requires_grad_(), targets, w, chunk_rows=7)
    expected = reference(h.detach(), w, targets)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total / count, expected / count, rtol=2e-2, atol=2e-2)
    total.backward()
    assert h.grad.dtype == torch.bfloat16


def test_bf16_gradients_are_the_fp32_ones_at_bf16_precision():
    """The bf16 logits buffer holds the gradient in place: it must still be softmax − one-hot times the
    weight, within bf16's rounding of the fp32 reference."""
    h, w, targets = make_case(seed=3, batch=4, seq=40, hidden=32, vocab=300)
    h16, w16 = h.bfloat16().requires_grad_(), w.bfloat16()
    total, _ = chunked_cross_entropy(h16, targets, w16, chunk_rows=37)
    total.backward()
    h32 = h16.detach().float().requires_grad_()
    reference(h32, w16.float(), targets).backward()
    error = (h16.grad.float() - h32.grad).norm() / h32.grad.norm()
    assert error < 1e-2, f"bf16 gradient off by {error:.3%} of its norm"


def test_no_trained_position_gives_zero_and_backward_works():
    h, w, targets = make_case()
    targets.fill_(IGNORE_INDEX)
    h.requires_grad_()
    total, count = chunked_cross_entropy(h, targets, w)
    assert count == 0 and float(total.detach()) == 0.0
    total.backward()
    assert torch.count_nonzero(h.grad) == 0


def test_shift_targets_masks_packed_boundaries():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_targets(labels).tolist() == [[6, 7, 8, 9, 10, IGNORE_INDEX]]
    # position 2 (last token of example 1) must not predict example 2's first token (8)
    assert shift_targets(labels, positions).tolist() == [[6, 7, IGNORE_INDEX, 9, 10, IGNORE_INDEX]]
