"""Our K-quant quantiser, checked by round trips through gguf's own dequantiser."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quant_shape_to_byte_shape, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from homebake.export import kquants

# Relative RMSE (rmse / std) on N(0, 1) data. Uniform-grid theory gives ~range/levels/sqrt(12):
# 4-bit over ~4 sigma ≈ 0.077, 5-bit ≈ 0.037, 6-bit on 16-value groups ≈ 0.018. llama.cpp's
# reference quantiser measures about the same (quantize-stats: Q4_K ~0.072, Q5_K ~0.036,
# Q6_K ~0.018 on Gaussian data); the bounds leave a few percent of headroom.
GAUSSIAN_BOUNDS = {T.Q4_K: 0.075, T.Q5_K: 0.038, T.Q6_K: 0.019}
# Same-bit legacy types that gguf quantises itself: a K-quant must not be worse.
LEGACY_PEER = {T.Q4_K: T.Q4_1, T.Q5_K: T.Q5_1, T.Q6_K: T.Q5_1}


def round_trip(x, qtype):
    return quants.dequantize(kquants.quantize(x, qtype), qtype)


def rel_rmse(x, y):
    return float(np.sqrt(np.mean((x - y) ** 2)) / x.std())


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)


@pytest.mark.parametrize("qtype", kquants.K_QUANT_TYPES, ids=lambda t: t.name)
def test_layout_matches_gguf(gaussian, qtype):
    q = kquants.quantize(gaussian, qtype)
    assert q.dtype == np.uint8
    assert q.shape == quant_shape_to_byte_shape(gaussian.shape, qtype)
    assert round_trip(gaussian, qtype).shape == gaussian.shape


@pytest.mark.parametrize("qtype", kquants.K_QUANT_TYPES, ids=lambda t: t.name)
def test_gaussian_error_within_reference(gaussian, qtype):
    err = rel_rmse(gaussian, round_trip(gaussian, qtype))
    legacy = rel_rmse(gaussian, quants.dequantize(quants.quantize(gaussian, LEGACY_PEER[qtype]), LEGACY_PEER[qtype]))
    assert err < GAUSSIAN_BOUNDS[qtype]
    assert err < legacy


def test_more_bits_less_error(gaussian):
    errors = [rel_rmse(gaussian, round_trip(gaussian, t)) for t in (T.Q4_K, T.Q5_K, T.Q6_K)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("qtype", kquants.K_QUANT_TYPES, ids=lambda t: t.name)
def test_llama_cpp_unit_test_threshold(qtype):
    # llama.cpp tests/test-quantize-fns.cpp: data 0.1 + 2 cos(i), error sqrt(sum d^2)/n < 0.002.
    n = 32 * 128
    data = (0.1 + 2 * np.cos(np.arange(n))).astype(np.float32)
    y = round_trip(data, qtype)
    assert np.sqrt(np.sum((data - y).astype(np.float64) ** 2)) / n < 0.002


@pytest.mark.parametrize("qtype", kquants.K_QUANT_TYPES, ids=lambda t: t.name)
def test_special_blocks(qtype):
    zeros = np.zeros((2, 256), np.float32)
    assert np.array_equal(round_trip(zeros, qtype), zeros)
    rng = np.random.default_rng(1)
    # One sub-block a thousand times larger than the rest, all-positive and all-negative blocks.
    wide = rng.standard_normal(256).astype(np.float32)
    wide[:32] *= 1000
    positive = np.abs(rng.standard_normal(256)).astype(np.float32) + 3
    negative = -positive
    for block in (wide, positive, negative):
        y = round_trip(block[None], qtype)[0]
        assert np.all(np.isfinite(y))
        assert rel_rmse(block, y) < 4 * GAUSSIAN_BOUNDS[qtype]
        # the large sub-block is reproduced to the type's precision
        assert rel_rmse(block[:32], y[:32]) < 4 * GAUSSIAN_BOUNDS[qtype]


@settings(max_examples=25, deadline=None)
# Below ~1e-2 the f16 super-scales go subnormal and lose precision (a limit of the format itself).
@given(scale=st.floats(1e-2, 1e3), shift=st.floats(-2, 2), seed=st.integers(0, 2**16))
def test_any_scale_round_trips(scale, shift, seed):
    x = ((np.random.default_rng(seed).standard_normal((2, 256)) + shift) * scale).astype(np.float32)
    for qtype in kquants.K_QUANT_TYPES:
        y = round_trip(x, qtype)
        # error relative to the data's magnitude (not its spread), so shifted data is judged fairly
        assert np.sqrt(np.mean((x - y) ** 2)) <= 2 * GAUSSIAN_BOUNDS[qtype] * np.sqrt(np.mean(x * x))


def test_rows_not_multiple_of_256_are_refused():
    assert not kquants.can_quantize((4, 576))
    with pytest.raises(ValueError):
        kquants.quantize(np.zeros((4, 576), np.float32), T.Q4_K)
