"""The fused LoRA linear against the unfused expression and PEFT: values, gradients, dropout masks, memory."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import peft

from homebake.adapters import LoraConfig, LoraLinear
from homebake.adapters.fused import fused_lora_linear, keep_mask


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _module(bias: bool = True, dropout: float = 0.0, dtype=torch.float32, in_features=40, out_features=24,
            seed: int = 0, **kwargs) -> LoraLinear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    module = LoraLinear(linear, LoraConfig(r=4, alpha=8, dropout=dropout), **kwargs)
    torch.nn.init.normal_(module.lora_B.weight, std=0.5)
    return module


def _grads(module: LoraLinear, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    for param in module.parameters():
        param.grad = None
    y = forward(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    out = {"y": y.detach(), "x": x.grad, "A": module.lora_A.weight.grad, "B": module.lora_B.weight.grad}
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = module.bias.grad
    return out


def _assert_same(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, **tolerance)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 40), (2, 5, 40)])
def test_values_and_gradients_equal_the_unfused_expression_and_peft(bias, shape):
    module = _module(bias=bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fused = _grads(module, x, module)
    reference = _grads(module, x, module.reference_forward)
    _assert_same(fused, reference, rtol=1e-5, atol=1e-5)

    twin = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(40, 24, bias=bias)),
                               peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]))
    layer = twin.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(module.weight)
        if bias:
            layer.base_layer.bias.copy_(module.bias)
        layer.lora_A["default"].weight.copy_(module.lora_A.weight)
        layer.lora_B["default"].weight.copy_(module.lora_B.weight)
    x_peft = x.clone().requires_grad_(True)
    y = twin(x_peft)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    torch.testing.assert_close(fused["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["x"], x_peft.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["A"], layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["B"], layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)


def test_trainable_bias_gets_its_gradient():
    module = _module(bias=True)
    module.bias.requires_grad_(True)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    _assert_same(_grads(module, x, module), _grads(module, x, module.reference_forward), rtol=1e-5, atol=1e-5)


def test_dropout_masks_equal_torch_dropout_at_the_same_seed():
    """Default masks are torch's: the fused module equals nn.Dropout + the unfused expression, gradients too."""
    module = _module(dropout=0.3).train()
    x = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    fused = _grads(module, x, module)
    torch.manual_seed(11)
    reference = _grads(module, x, module.reference_forward)
    _assert_same(fused, reference, rtol=1e-5, atol=1e-5)
    assert (fused["y"] - module.eval()(x)).abs().max() > 1e-3  # dropout really acted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_masks_give_the_dropout_expression_with_that_mask(dtype):
    """With fast masks the output and gradients are those of x W^T + b + s B A (x * keep / (1 - p)).

    The reference is computed in fp32 from the same (bf16-rounded) values; bf16 results agree to bf16 rounding.
    """
    p = 0.25
    module = _module(dropout=p, fast_dropout=True, dtype=dtype).train()
    x = torch.randn(4, 6, 40, generator=torch.Generator().manual_seed(4)).to(dtype)
    torch.manual_seed(5)
    keep = keep_mask((24, 40), p, "cpu", fast=True).view(4, 6, 40)
    torch.manual_seed(5)
    fused = _grads(module, x, module)
    reference_module = copy.deepcopy(module).float()

    def explicit(inputs):
        dropped = inputs * keep / (1 - p)
        lora = dropped @ reference_module.lora_A.weight.T @ reference_module.lora_B.weight.T
        return inputs @ reference_module.weight.T + reference_module.bias + module.scaling * lora

    reference = _grads(reference_module, x.float(), explicit)
    assert fused.keys() == reference.keys()
    for key, want in reference.items():
        got = fused[key].float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert (got - want).norm() / want.norm() < 1e-2, key
    assert fused["y"].dtype == dtype and fused["x"].dtype == dtype
    assert fused["A"].dtype == fused["B"].dtype == torch.float32 and module.weight.grad is None


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_keep_fraction_is_one_minus_p(fast, p):
    generator = torch.Generator().manual_seed(int(100 * p) + fast)
    n = 4_000_000
    keep = keep_mask((n // 1000, 1000), p, "cpu", fast=fast, generator=generator)
    assert keep.dtype == torch.bool
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # independent elements: no column or row pattern, and a fresh mask on every call
    assert abs(keep[:, ::2].float().mean().item() - keep[:, 1::2].float().mean().item()) < 10 * sigma
    again = keep_mask((n // 1000, 1000), p, "cpu", fast=fast, generator=generator)
    assert abs((keep & again).float().mean().item() - (1 - p) ** 2) < 10 * sigma


def test_fast_mask_is_the_threshold_on_uniform_32_bit_draws():
    """P(keep) = round((1 - p) 2^32) / 2^32: the draws cover every int32 value, compared with that threshold."""
    from homebake.adapters.fused import keep_threshold, uniform_int32

    generator = torch.Generator().manual_seed(0)
    draws = uniform_int32((1_000_000,), generator)
    assert draws.min() < -2 ** 31 + 2 ** 22 and draws.max() > 2 ** 31 - 2 ** 22  # the full 32-bit range
    assert abs(draws.double().mean().item()) < 5 * 2 ** 32 / (12 * 1_000_000) ** 0.5
    assert (keep_threshold(0.9) + 2 ** 31) / 2 ** 32 == round(0.9 * 2 ** 32) / 2 ** 32
    generator.manual_seed(0)
    keep = keep_mask((1_000, 1_000), 0.1, "cpu", fast=True, generator=generator)
    assert torch.equal(keep.view(-1), draws < keep_threshold(0.9))
    # torch's generator decides the draws (seeds and checkpointed RNG states): same state, same mask
    assert torch.equal(keep_mask((1_000, 1_000), 0.1, "cpu", fast=True, generator=generator.manual_seed(0)), keep)
    assert keep_mask((3, 5), 0.0, "cpu", fast=True).all() and not keep_mask((3, 5), 1.0, "cpu", fast=True).any()


def test_nf4_base_equals_its_reference_path():
    from homebake.adapters.nf4 import NF4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    module = LoraLinear(NF4Linear.from_linear(linear), LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.nn.init.normal_(module.lora_B.weight, std=0.5)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(6))
    _assert_same(_grads(module, x, module), _grads(module, x, module.reference_forward), rtol=1e-5, atol=1e-5)


def test_no_grad_path_equals_the_tracked_path():
    module = _module(bias=True)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        untracked = module(x)
    torch.testing.assert_close(untracked, module(x).detach(), rtol=0, atol=0)


def test_autocast_runs_in_bf16_with_a_bf16_base():
    module = _module(dtype=torch.bfloat16, bias=True)
    x = torch.randn(3, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, module(x.bfloat16()), rtol=0, atol=0)


def test_backward_keeps_x_a_byte_mask_and_the_rank_sized_intermediate_only():
    """Saved for backward, beyond the frozen weight and the adapters: x, a 1-byte mask per element and N x r."""
    module = _module(dropout=0.1, dtype=torch.bfloat16, in_features=256, out_features=512, fast_dropout=True).train()
    shared = {p.data_ptr() for p in module.parameters()}
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in shared and tensor.shape not in ((4, 256), (512, 4)):  # not the adapter casts
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    assert sorted(saved.values()) == sorted([64 * 4 * 2, 64 * 256 * 1, 64 * 256 * 2])  # u, mask, x


def test_fused_function_shape_and_dtype_contract():
    x = torch.randn(2, 3, 8)
    weight, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    y = fused_lora_linear(x, weight, a, b, 0.5)
    torch.testing.assert_close(y, x @ weight.T + 0.5 * x @ a.T @ b.T)
    assert y.shape == (2, 3, 5)
    module = _module()
    copy.deepcopy(module)  # the wrapper stays deep-copyable (model copies in tests and evaluation)


def _siblings(dropout: float = 0.0, **kwargs) -> list[LoraLinear]:
    """Three projections of one 40-wide input, like a layer's q/k/v: other widths, biases and scalings."""
    modules = [_module(bias=bias, dropout=dropout, out_features=out, seed=seed, **kwargs)
               for bias, out, seed in ((True, 24, 0), (False, 8, 1), (True, 8, 2))]
    modules[1].scaling = 0.5
    return modules


def _sibling_grads(modules, x, forward) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    for module in modules:
        for param in module.parameters():
            param.grad = None
    outputs = forward(x)
    total = sum((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() * (i + 1) for i, y in enumerate(outputs))
    total.backward()
    grads = {"x": x.grad}
    for i, (module, y) in enumerate(zip(modules, outputs)):
        grads.update({f"y{i}": y.detach(), f"A{i}": module.lora_A.weight.grad, f"B{i}": module.lora_B.weight.grad})
    return grads


def test_projections_of_one_input_computed_together_equal_each_alone():
    modules = _siblings()
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(8))
    together = _sibling_grads(modules, x, lambda inputs: LoraLinear.project_shared(inputs, modules))
    alone = _sibling_grads(modules, x, lambda inputs: [m.reference_forward(inputs) for m in modules])
    _assert_same(together, alone, rtol=1e-5, atol=1e-5)


def test_sibling_projections_share_one_dropout_mask_on_their_input():
    """Training with dropout: every sibling's adapter sees x * keep / (1 - p) with the same keep mask."""
    p = 0.25
    modules = [m.train() for m in _siblings(dropout=p, fast_dropout=True)]
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(10)
    keep = keep_mask((15, 40), p, "cpu", fast=True).view(3, 5, 40)
    torch.manual_seed(10)
    together = _sibling_grads(modules, x, lambda inputs: LoraLinear.project_shared(inputs, modules))

    def explicit(inputs):
        dropped = inputs * keep / (1 - p)
        return [inputs @ m.weight.T + (m.bias if m.bias is not None else 0)
                + m.scaling * dropped @ m.lora_A.weight.T @ m.lora_B.weight.T for m in modules]

    _assert_same(together, _sibling_grads(modules, x, explicit), rtol=1e-5, atol=1e-5)


def test_siblings_of_other_kinds_run_on_their_own():
    """A plain linear, a DoRA adapter and LoRA adapters with other dropout settings beside fused LoRA siblings."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(40, 6)
    dora = LoraLinear(torch.nn.Linear(40, 8), LoraConfig(r=4, alpha=8, use_dora=True))
    other = _module(dropout=0.1, seed=3).eval()
    modules = [plain, *_siblings(), dora, other]
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(11))
    for got, module in zip(LoraLinear.project_shared(x, modules), modules):
        torch.testing.assert_close(got, module(x), rtol=1e-6, atol=1e-6)


def test_siblings_keep_x_one_mask_and_one_stacked_intermediate():
    modules = [m.train() for m in _siblings(dropout=0.1, fast_dropout=True)]
    shared = {p.data_ptr() for m in modules for p in m.parameters()}
    x = torch.randn(64, 40, requires_grad=True)
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in shared and tensor.shape != (12, 40):  # the stacked A matrices (adapter size)
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        LoraLinear.project_shared(x, modules)
    assert sorted(saved.values()) == sorted([64 * 40 * 1, 64 * 12 * 4, 64 * 40 * 4])  # mask, u (3 x r 4), x
