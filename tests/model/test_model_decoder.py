"""The decoder's invariants: HF names, tied head, KV cache == full pass, packing == separate runs,
sliding windows, gradient checkpointing and bf16."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCH_VARIANTS, build_tiny_hf_model, tiny_hf_config

from homebake.model.args import ModelArgs
from homebake.model.decoder import CausalLM
from homebake.model.families import build_causal_lm
from homebake.model.load import load_model


def ours(tiny_dir, variant: str) -> CausalLM:
    return load_model(tiny_dir(variant), with_tokenizer=False).model


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_state_dict_names_and_shapes_are_hf(variant):
    hf = build_tiny_hf_model(tiny_hf_config(variant))
    model = build_causal_lm(ModelArgs.from_hf_config(tiny_hf_config(variant)))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()
                                                                   if not (k == "lm_head.weight"
                                                                           and hf.config.tie_word_embeddings)}


def test_tied_model_has_no_lm_head_and_shares_the_embedding(tiny_dir, token_ids):
    model = ours(tiny_dir, "llama_tied")
    assert "lm_head.weight" not in model.state_dict()
    assert model.head_weight is model.model.embed_tokens.weight
    hidden = model(token_ids)
    torch.testing.assert_close(model.logits(hidden), hidden @ model.model.embed_tokens.weight.T)


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen2_window", "qwen3", "llama3_rope"])
def test_kv_cache_generation_equals_full_sequence(tiny_dir, variant, token_ids):
    model = ours(tiny_dir, variant)
    with torch.no_grad():
        full = model.logits(model(token_ids))
        cache = model.new_kv_cache(batch_size=2, max_len=20)
        steps = [model.logits(model(token_ids[:, :5], kv_cache=cache))]  # prefill
        assert cache.length == 5
        for t in range(5, token_ids.shape[1]):
            steps.append(model.logits(model(token_ids[:, t:t + 1], kv_cache=cache)))
        assert cache.length == token_ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_overflow_is_refused(tiny_dir, token_ids):
    model = ours(tiny_dir, "llama")
    with pytest.raises(ValueError, match="KV cache"):
        model(token_ids, kv_cache=model.new_kv_cache(2, 4))


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen3", "qwen2"])
def test_packed_rows_equal_each_example_run_alone(tiny_dir, variant):
    """Block-diagonal causal attention: no example in a packed row sees another (fp32, <= 1e-5)."""
    model = ours(tiny_dir, variant)
    generator = torch.Generator().manual_seed(3)
    rows = [[7, 4, 9], [3, 8]]  # example lengths per packed row; first row 20 tokens, second 11 + padding-free
    examples = [[torch.randint(3, 320, (n,), generator=generator) for n in lengths] for lengths in rows]
    lengths = [sum(len(e) for e in row) for row in examples]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(examples):
        ids[r, :lengths[r]] = torch.cat(row)
        positions[r, :lengths[r]] = torch.cat([torch.arange(len(e)) for e in row])
        positions[r, lengths[r]:] = torch.arange(width - lengths[r])  # filler tokens form their own example
    with torch.no_grad():
        packed = model.logits(model(ids, position_ids=positions))
        for r, row in enumerate(examples):
            start = 0
            for example in row:
                alone = model.logits(model(example[None]))[0]
                torch.testing.assert_close(packed[r, start:start + len(example)], alone, rtol=0, atol=1e-5)
                start += len(example)


def test_position_ids_without_restart_equal_the_default(tiny_dir, token_ids):
    model = ours(tiny_dir, "llama")
    positions = torch.arange(token_ids.shape[1]).expand_as(token_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids, position_ids=positions), model(token_ids), rtol=0, atol=0)


def test_sliding_window_changes_late_positions_only(tiny_dir, token_ids):
    """Guards the HF parity tests: the window (5) really is applied beyond it."""
    windowed = ours(tiny_dir, "mistral_window")
    full = CausalLM(windowed.args.replace(sliding_window=None))
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        a, b = windowed.logits(windowed(token_ids)), full.logits(full(token_ids))
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-2


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, token_ids):
    grads = []
    for checkpointing in (False, True):
        model = ours(tiny_dir, "qwen3").train()
        model.gradient_checkpointing = checkpointing
        loss = model.logits(model(token_ids)).logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_bf16_weights_run_in_bf16_and_stay_close(tiny_dir, token_ids):
    fp32 = ours(tiny_dir, "llama")
    bf16 = load_model(tiny_dir("llama"), dtype=torch.bfloat16, with_tokenizer=False).model
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        hidden = bf16(token_ids)
        assert hidden.dtype == torch.bfloat16
        diff = (bf16.logits(hidden).float() - fp32.logits(fp32(token_ids))).abs().max().item()
    assert diff < 0.25  # bf16 has ~3 significant digits; logits are O(4)
    assert bf16._inv_freq.dtype == torch.float32  # RoPE frequencies are never rounded to bf16


def test_key_mask_left_padding_equals_the_unpadded_rows(tiny_dir):
    """Batched generation with left padding: padded keys are hidden, positions come from position_ids."""
    model = ours(tiny_dir, "qwen2")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=generator) for n in (6, 3)]
    width, steps = 6, 3
    ids = torch.zeros(2, width, dtype=torch.long)
    keys = torch.zeros(2, width, dtype=torch.bool)
    positions = torch.zeros(2, width, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = prompt
        keys[r, width - len(prompt):] = True
        positions[r, width - len(prompt):] = torch.arange(len(prompt))
    with torch.no_grad():
        cache = model.new_kv_cache(2, width + steps)
        last = model.logits(model(ids, position_ids=positions, kv_cache=cache, key_mask=keys)[:, -1])
        batched = [last]
        for _ in range(steps - 1):
            token = last.argmax(-1, keepdim=True)
            keys = torch.cat([keys, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            positions = positions[:, -1:] + 1
            last = model.logits(model(token, position_ids=positions, kv_cache=cache, key_mask=keys)[:, -1])
            batched.append(last)
        for r, prompt in enumerate(prompts):  # each row alone, no padding
            alone_cache = model.new_kv_cache(1, len(prompt) + steps)
            last = model.logits(model(prompt[None], kv_cache=alone_cache)[:, -1])
            for step in range(steps):
                torch.testing.assert_close(batched[step][r], last[0], rtol=0, atol=1e-5)
                last = model.logits(model(last.argmax(-1, keepdim=True), kv_cache=alone_cache)[:, -1])
