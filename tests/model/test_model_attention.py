"""Attention that follows the examples: equal to the dense masked reference (values and gradients, fp32
<= 1e-5) for packed, unpacked, sliding-window and grouped-query cases, with both block kernels; bucket
work proportional to the examples; a packed model's gradients equal the sum over its examples run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from homebake.model.attention import AttentionPlan, attention, attention_mask
from homebake.model.load import load_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _positions(rows: list[list[int]], width: int) -> torch.Tensor:
    """position_ids of packed rows with these example lengths; the rest of a row is one filler example."""
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, lengths in enumerate(rows):
        parts = [torch.arange(n) for n in lengths]
        used = sum(lengths)
        if used < width:
            parts.append(torch.arange(width - used))
        positions[r] = torch.cat(parts)
    return positions


def _dense_reference(q, k, v, position_ids, window, packed):
    """The dense path in float64: one boolean mask over the whole row (what attention replaced)."""
    mask = attention_mask(position_ids, 0, q.shape[2], window, packed, q.device)
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is None:
        mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _qkv(batch, heads, kv_heads, length, dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, length, dim, generator=generator).to(dtype).requires_grad_(True)
            for h in (heads, kv_heads, kv_heads)]


CASES = {
    "packed": dict(rows=[[7, 4, 9], [3, 8, 1, 5]], width=24, window=None, packed=True),
    "packed_many_lengths": dict(rows=[[30, 2, 17, 1], [12, 12, 12], [40]], width=50, window=None, packed=True),
    "unpacked": dict(rows=None, width=21, window=None, packed=False),
    "sliding_window_packed": dict(rows=[[11, 6], [17]], width=20, window=4, packed=True),
    "sliding_window_unpacked": dict(rows=None, width=19, window=5, packed=False),
}


@pytest.mark.parametrize("kernel", ["matmul", "sdpa", "auto"])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_equal_the_dense_masked_path(case, heads, kv_heads, kernel):
    spec = CASES[case]
    batch = len(spec["rows"]) if spec["rows"] else 2
    width = spec["width"]
    positions = _positions(spec["rows"], width) if spec["rows"] else torch.arange(width).expand(batch, width)
    q, k, v = _qkv(batch, heads, kv_heads, width)
    plan = AttentionPlan.build(positions, batch, width)
    assert (plan.buckets is not None) == spec["packed"]
    out = attention(q, k, v, plan, window=spec["window"], kernel=kernel)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))

    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    reference = _dense_reference(qd, kd, vd, positions, spec["window"], spec["packed"])
    reference_grads = torch.autograd.grad((reference * weights.double()).sum(), (qd, kd, vd))
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, reference_grads, "qkv"):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_blocks_stay_close_to_the_fp32_result():
    positions = _positions([[60, 40, 28], [100]], 128)
    q, k, v = _qkv(2, 6, 2, 128, dim=32, seed=1)
    plan = AttentionPlan.build(positions, 2, 128)
    exact = attention(q, k, v, plan)
    low = attention(*(t.detach().bfloat16() for t in (q, k, v)), plan)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - exact).norm() / exact.norm()) < 1e-2


def test_bucket_work_follows_the_examples_not_the_row():
    """A 2048-token row of ~128-token examples: the blocks cost at most ~1.25x the sum of squared lengths."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 150, (15,), generator=generator).tolist()
    positions = _positions([lengths], 2048)
    plan = AttentionPlan.build(positions, 1, 2048)
    filler = 2048 - sum(lengths)
    need = sum(n * n for n in lengths) + filler ** 2
    work = sum(b.count * b.length ** 2 for b in plan.buckets)
    assert need <= work <= 1.25 * need + 64 ** 2 * len(plan.buckets)
    assert work < 0.1 * 2048 ** 2  # the dense mask would do > 10x this
    tokens = torch.cat([b.tokens[b.valid] for b in plan.buckets])
    assert sorted(tokens.tolist()) == list(range(2048))  # every token in exactly one block


def test_decoding_with_a_cache_and_left_padding_uses_the_dense_mask():
    q, k, v = _qkv(2, 4, 2, 1)
    k, v = (torch.randn(2, 2, 6, 16) for _ in range(2))
    keys = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    plan = AttentionPlan.build(torch.tensor([[3], [5]]), 2, 1, start=5, key_mask=keys)
    out = attention(q, k, v, plan).view(2, 1, 4, 16).transpose(1, 2)
    mask = keys[:, None, None, :]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, reference)


def test_packed_model_gradients_equal_the_sum_over_examples_alone(tiny_dir):
    """Training on a packed row gives the gradients of training on each example separately (fp32, LoRA)."""
    from homebake.adapters import LoraConfig, inject_lora
    from homebake.adapters.lora import lora_modules

    model = load_model(tiny_dir("qwen2"), with_tokenizer=False).model
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.2, generator=generator)
    lengths = [9, 3, 12]
    examples = [torch.randint(3, 320, (n,), generator=generator) for n in lengths]
    width = 28
    ids = torch.cat(examples + [torch.zeros(width - sum(lengths), dtype=torch.long)])[None]
    positions = _positions([lengths], width)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_of(hidden, count):
        return model.logits(hidden[:, :count]).logsumexp(-1).sum()

    packed = torch.autograd.grad(loss_of(model(ids, position_ids=positions), sum(lengths)), trainable)
    alone = [torch.zeros_like(p) for p in trainable]
    for example in examples:
        for total, grad in zip(alone, torch.autograd.grad(loss_of(model(example[None]), len(example)), trainable)):
            total += grad
    for got, want in zip(packed, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["packed", "sliding_window_unpacked"])
def test_soft_capped_scores_equal_the_dense_reference(case):
    """Gemma 2's tanh soft-capping runs in the matmul kernel and matches the dense path with the same cap."""
    spec, cap = CASES[case], 2.0
    batch = len(spec["rows"]) if spec["rows"] else 2
    width = spec["width"]
    positions = _positions(spec["rows"], width) if spec["rows"] else torch.arange(width).expand(batch, width)
    q, k, v = _qkv(batch, 6, 2, width, seed=3)
    q = (q.detach() * 3).requires_grad_(True)  # scores well beyond the cap
    out = attention(q, k, v, AttentionPlan.build(positions, batch, width), window=spec["window"], scale=0.3,
                    softcap=cap)
    mask = attention_mask(positions, 0, width, spec["window"], spec["packed"], "cpu")
    if mask is None:
        mask = torch.ones(width, width, dtype=torch.bool).tril()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = torch.tanh(qd @ kd.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.3 / cap) * cap
    reference = (torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vd.repeat_interleave(3, dim=1))
    reference = reference.transpose(1, 2).reshape(batch, width, -1)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(reference.sum(), (qd, kd, vd))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
