"""RoPE inverse frequencies against transformers, and recovering Llama 3 scaling from llama.cpp's rope_freqs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_hf_config

from homebake.errors import UnsupportedArchitectureError
from homebake.model.args import ModelArgs
from homebake.model.rope import base_inv_freq, llama3_factors, llama3_scaling_from_factors, rope_inv_freq

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
LLAMA32 = {**LLAMA31, "factor": 32.0}


@pytest.mark.parametrize("variant,overrides", [
    ("llama", {}),
    ("llama_linear_rope", {}),
    ("llama3_rope", {}),
    ("llama", {"head_dim": 128, "hidden_size": 256, "num_attention_heads": 2, "rope_theta": 500000.0,
               "rope_scaling": LLAMA31}),
    ("qwen2_yarn", {}),
    ("qwen2", {"head_dim": 128, "hidden_size": 256, "num_attention_heads": 2, "rope_theta": 1000000.0,
               "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}}),
    ("phi3_longrope", {}),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 10 for i in range(8)],
                               "long_factor": [1.0 + i for i in range(8)]}, "original_max_position_embeddings": 64}),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
])
def test_inv_freq_matches_transformers(variant, overrides):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_hf_config(variant, **overrides)
    args = ModelArgs.from_hf_config(config)
    ours, scaling = rope_inv_freq(args)
    ref_config = AutoConfig.for_model(**config)
    rope_type = ref_config.rope_parameters["rope_type"]
    if rope_type == "default":
        theirs = base_inv_freq(args.rope_theta, args.head_dim)  # transformers' default is this formula
        ref_scaling = 1.0
    else:
        theirs, ref_scaling = ROPE_INIT_FUNCTIONS[rope_type](ref_config, "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert scaling == ref_scaling
    if rope_type not in ("default", "dynamic"):  # the scaled frequencies really differ from plain RoPE
        assert not torch.allclose(ours, base_inv_freq(args.rope_theta, args.rotary_dim))
    if rope_type in ("longrope", "dynamic"):  # the length-dependent tables, beyond the threshold
        length = (args.rope_scaling["original_max_position_embeddings"] if rope_type == "longrope"
                  else args.max_position_embeddings) + 37
        ours_long, scaling_long = rope_inv_freq(args, seq_len=length)
        theirs_long, ref_long = ROPE_INIT_FUNCTIONS[rope_type](ref_config, "cpu", seq_len=length)
        torch.testing.assert_close(ours_long, theirs_long.float(), rtol=1e-6, atol=0)
        assert scaling_long == ref_long
        assert not torch.allclose(ours_long, ours)


@pytest.mark.parametrize("scaling,theta,head_dim", [
    (LLAMA31, 500000.0, 128),
    (LLAMA32, 500000.0, 64),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 10000.0, 16),
])
def test_llama3_scaling_recovered_from_rope_freqs(scaling, theta, head_dim):
    factors = llama3_factors(base_inv_freq(theta, head_dim).numpy(), scaling).astype(np.float32)
    recovered = llama3_scaling_from_factors(factors, theta, head_dim)
    assert recovered == scaling


def test_rope_freqs_that_are_not_llama3_are_refused():
    factors = np.linspace(1.0, 8.0, 8) ** 1.7  # monotone but not the llama3 shape
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        llama3_scaling_from_factors(factors, 10000.0, 16)


def test_all_ones_rope_freqs_mean_no_scaling():
    assert llama3_scaling_from_factors(np.ones(8), 10000.0, 16) is None
