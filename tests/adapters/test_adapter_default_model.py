"""QLoRA on the default model (SmolLM2-135M): its 576-wide layers, counts and the 4-bit base's fidelity."""

from __future__ import annotations

import pytest
import torch

from homebake.adapters import LoraConfig, describe_parameters, inject_lora, quantize_base_to_nf4


@pytest.mark.default_model
def test_default_model_qlora_counts_memory_and_fidelity(default_gguf):
    from homebake.model.load import load_model

    loaded = load_model(default_gguf, dtype=torch.bfloat16, with_tokenizer=False)
    model, args = loaded.model.eval(), loaded.args
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 260, 1345]])
    with torch.no_grad():
        before = model.logits(model(ids)).float()
    total = sum(p.numel() for p in model.parameters())
    quantized = quantize_base_to_nf4(model, "all-linear")  # 576 x 576 weights: not a multiple of 64 x 256
    paths = inject_lora(model, LoraConfig(r=16, alpha=32))
    assert quantized == paths and len(paths) == args.num_hidden_layers * 7

    hidden, inter, kv = args.hidden_size, args.intermediate_size, args.num_key_value_heads * args.head_dim
    per_layer = 16 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)  # q,o  k,v  gate,up,down
    summary = describe_parameters(model)
    assert summary.trainable_params == args.num_hidden_layers * per_layer
    assert summary.total_params == total + summary.trainable_params
    assert summary.parts["frozen NF4"].bytes < 0.52 * summary.parts["frozen NF4"].params

    with torch.no_grad():
        after = model.logits(model(ids)).float()
    similarity = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    # The GGUF base is already Q4_1, so NF4 re-quantises 4-bit weights; measured: min 0.94, mean 0.97.
    assert similarity.min() > 0.9 and similarity.mean() > 0.95, similarity
