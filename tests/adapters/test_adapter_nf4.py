"""NF4 (QLoRA) base storage: code book, error bound, bitsandbytes equality, memory, and LoRA over it."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import randomize_adapters, tiny_model

from homebake.adapters import (LoraConfig, LoraLinear, NF4Linear, NF4Weight, describe_parameters, inject_lora,
                               quantize_base_to_nf4)
from homebake.adapters.lora import lora_modules
from homebake.adapters.nf4 import BLOCK_SIZE, DYNAMIC_CODE, NF4_CODE, SCALE_BLOCK_SIZE

# Published in the QLoRA paper (Dettmers et al. 2023, appendix E).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight.view(-1)[::97] *= 8  # outliers, so blocks have different scales
    return weight


def test_code_book_is_the_published_nf4_and_the_normal_quantiles():
    assert NF4_CODE.tolist() == PUBLISHED_NF4
    # The construction: equal-mass quantiles of N(0, 1) on each side of an exact zero, normalised to [-1, 1].
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.sort(torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])).values
    torch.testing.assert_close(values / values.max(), NF4_CODE.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 64), (33, 50), (7, 1000)])  # 50 and 1000: blocks cross rows / a partial block
def test_dequantisation_error_within_the_nf4_bound(shape):
    weight = _weight(*shape)
    nf4 = NF4Weight.quantize(weight)
    restored = nf4.dequantize(torch.float32)
    assert restored.shape == weight.shape

    n = weight.numel()
    pad = (-n) % BLOCK_SIZE
    blocks = torch.nn.functional.pad(weight.reshape(-1), (0, pad)).view(-1, BLOCK_SIZE)
    errors = torch.nn.functional.pad((weight - restored).abs().reshape(-1), (0, pad)).view(-1, BLOCK_SIZE)
    true_absmax = blocks.abs().amax(dim=1)
    stored_absmax = nf4.block_absmax()
    # Double quantisation: each absmax is off by at most half a gap of the 8-bit code times its block scale.
    dq_gap = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max() / 2
    scale = nf4.absmax_scale.repeat_interleave(SCALE_BLOCK_SIZE)[:stored_absmax.numel()]
    assert ((stored_absmax - true_absmax).abs() <= dq_gap * scale + 1e-7).all()
    # |w - c*a'| <= |w/a - c| * a + |c| * |a - a'| with |w/a - c| <= half the largest gap between code values.
    nf4_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = nf4_gap * true_absmax + (stored_absmax - true_absmax).abs() + 1e-6
    assert (errors.amax(dim=1) <= bound).all()
    assert errors.mean() < 0.2 * weight.abs().mean()  # 4 bits with an outlier in most blocks: ~14%


def test_quantisation_and_dequantisation_equal_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = _weight(1024, 576, seed=1)  # 9216 blocks: 36 second-level blocks
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(state.code.cpu(), NF4_CODE)
    assert torch.equal(state.state2.code.cpu(), DYNAMIC_CODE)

    # Same storage layout: our dequantiser reads bitsandbytes' quantised state bit for bit.
    theirs = NF4Weight(tuple(weight.shape), weight.dtype)
    theirs.load_state_dict({"packed": packed.view(-1), "absmax_codes": state.absmax,
                            "absmax_scale": state.state2.absmax, "absmax_offset": state.offset})
    for dtype in (torch.float32, torch.bfloat16):
        state.dtype = dtype
        assert torch.equal(theirs.dequantize(dtype), functional.dequantize_4bit(packed, state))

    # Same quantiser: identical 4-bit codes and scales. For the 8-bit absmax codes we round to the nearest
    # code; bitsandbytes' CPU kernel differs only for values within a hair of a midpoint between two codes.
    ours = NF4Weight.quantize(weight)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(ours.absmax_offset, state.offset)
    differ = (ours.absmax_codes != state.absmax).nonzero().view(-1)
    assert len(differ) < 0.005 * ours.absmax_codes.numel()
    assert ((ours.absmax_codes[differ].int() - state.absmax[differ].int()).abs() == 1).all()
    absmax = weight.view(-1, BLOCK_SIZE).abs().amax(dim=1)
    scaled = (absmax - ours.absmax_offset) / ours.absmax_scale.repeat_interleave(SCALE_BLOCK_SIZE)
    midpoint = (DYNAMIC_CODE[ours.absmax_codes[differ].long()] + DYNAMIC_CODE[state.absmax[differ].long()]) / 2
    assert ((scaled[differ] - midpoint).abs() < 1e-4).all()  # observed: up to 1.4e-5 from the midpoint
    same = torch.ones(ours.absmax_codes.numel(), dtype=torch.bool)
    same[differ] = False
    state.dtype = torch.float32
    assert torch.equal(ours.dequantize().view(-1, BLOCK_SIZE)[same],
                       functional.dequantize_4bit(packed, state).view(-1, BLOCK_SIZE)[same])


def test_memory_is_half_a_byte_per_weight_plus_scales():
    weight = _weight(256, 576)
    nf4 = NF4Weight.quantize(weight)
    n = weight.numel()
    blocks = n // BLOCK_SIZE
    assert nf4.nbytes == n // 2 + blocks + 4 * -(-blocks // SCALE_BLOCK_SIZE) + 4
    assert nf4.nbytes / n < 0.52
    linear = NF4Linear.from_linear(torch.nn.Linear(576, 256, bias=False))
    assert sum(b.numel() * b.element_size() for b in linear.buffers()) == nf4.nbytes


def test_state_dict_roundtrip_and_dtype_moves_keep_the_scales():
    nf4 = NF4Weight.quantize(_weight(64, 128))
    copy_ = NF4Weight((64, 128), torch.float32)
    copy_.load_state_dict(nf4.state_dict())
    assert torch.equal(copy_.dequantize(), nf4.dequantize())
    holder = torch.nn.Sequential(NF4Linear(nf4, None))
    holder.to(torch.bfloat16)
    assert nf4.absmax_scale.dtype == torch.float32 and nf4.absmax_offset.dtype == torch.float32
    assert torch.equal(copy_.dequantize(), nf4.dequantize(torch.float32))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("order", ["quantize_then_inject", "inject_then_quantize"])
def test_lora_over_nf4_equals_lora_over_the_dequantised_weights(input_ids, use_dora, order):
    base = tiny_model("qwen2")  # with q/k/v biases
    config = LoraConfig(r=4, alpha=8, dropout=0, use_dora=use_dora)
    qlora = copy.deepcopy(base)
    if order == "quantize_then_inject":
        assert len(quantize_base_to_nf4(qlora, "all-linear")) == 14
        assert sum(isinstance(m, NF4Linear) for m in qlora.modules()) == 14
        inject_lora(qlora, config)
    else:
        inject_lora(qlora, config)
        assert len(quantize_base_to_nf4(qlora, "all-linear")) == 14
    modules = lora_modules(qlora)
    assert all(m.weight is None and m.weight_nf4 is not None for m in modules.values())
    # A fresh QLoRA model equals its dequantised base (DoRA's magnitude starts from the quantised weight).
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for path, module in modules.items():
            dense.get_submodule(path).weight.copy_(module.weight_nf4.dequantize(torch.float32))
    torch.testing.assert_close(qlora(input_ids).logits, dense(input_ids).logits, rtol=1e-5, atol=1e-5)

    randomize_adapters(qlora)
    inject_lora(dense, config)
    with torch.no_grad():
        for path, module in lora_modules(dense).items():
            for name, param in modules[path].named_parameters():
                module.get_parameter(name).copy_(param)
    logits, reference = qlora(input_ids).logits, dense(input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    reference.square().mean().backward()
    for path, module in modules.items():
        twin = lora_modules(dense)[path]
        torch.testing.assert_close(module.lora_A.weight.grad, twin.lora_A.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(module.lora_B.weight.grad, twin.lora_B.weight.grad, rtol=1e-4, atol=1e-6)
        if use_dora:
            torch.testing.assert_close(module.lora_magnitude.grad, twin.lora_magnitude.grad, rtol=1e-4, atol=1e-6)
    assert not any(b.requires_grad for b in qlora.buffers())


def test_qlora_bf16_forward_backward_and_accounting(input_ids):
    model = tiny_model("llama").to(torch.bfloat16)
    quantize_base_to_nf4(model, ["q_proj", "v_proj", "down_proj"])
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model)
    logits = model(input_ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    grads = [m.lora_A.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    summary = describe_parameters(model)
    quantized = 2 * (64 * 64 + 32 * 64 + 64 * 128)  # q_proj, v_proj (2 KV heads x 16), down_proj per layer
    assert summary.parts["frozen NF4"].params == quantized
    assert summary.parts["frozen NF4"].bytes < 0.52 * quantized
    assert summary.total_params == sum(p.numel() for p in tiny_model("llama").parameters()) + \
        summary.parts["adapters"].params


def test_quantize_only_targets_linear_layers():
    model = tiny_model("llama")
    assert quantize_base_to_nf4(model, ["o_proj"]) == ["model.layers.0.self_attn.o_proj",
                                                       "model.layers.1.self_attn.o_proj"]
    assert isinstance(model.model.layers[0].self_attn.o_proj, NF4Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert quantize_base_to_nf4(model, ["o_proj"]) == []  # already quantised
    assert isinstance(LoraLinear(model.model.layers[0].self_attn.o_proj, LoraConfig(r=2)).weight_nf4, NF4Weight)
