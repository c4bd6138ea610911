"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF): our loader vs transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from homebake.model.load import load_model

pytestmark = pytest.mark.default_model

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the boiling point of water?"}]


@pytest.fixture(scope="module")
def ours(default_gguf):
    return load_model(default_gguf)  # with its tokenizer, from the GGUF metadata


@pytest.fixture(scope="module")
def theirs(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


def prompt_ids(ours) -> list[list[int]]:
    tokenizer = ours.tokenizer
    return [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode_chat(CHAT, add_generation_prompt=True)]


def test_default_model_args(ours, default_gguf):
    args = ours.args
    assert ours.source_kind == "gguf" and ours.source_path == default_gguf
    assert (args.model_type, args.vocab_size, args.num_hidden_layers, args.hidden_size) == ("llama", 49152, 30, 576)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (9, 3, 64)
    assert args.tie_word_embeddings and "lm_head.weight" not in ours.model.state_dict()


def test_logits_match_transformers_on_the_same_gguf(ours, theirs):
    for ids in prompt_ids(ours):
        batch = torch.tensor([ids])
        with torch.no_grad():
            mine = ours.model.logits(ours.model(batch))
            reference = theirs(batch).logits
        assert (mine - reference).abs().max().item() <= 1e-3
        assert torch.equal(mine.argmax(-1), reference.argmax(-1))


def greedy_with_cache(model, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    """Greedy decoding by argmax over our logits, one token at a time through the KV cache."""
    cache = model.new_kv_cache(1, len(ids) + steps)
    out: list[int] = []
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), kv_cache=cache)
        for _ in range(steps):
            token = int(model.logits(hidden[:, -1]).argmax(-1))
            out.append(token)
            if token in stop:
                break
            hidden = model(torch.tensor([[token]]), kv_cache=cache)
    return out


def test_greedy_continuations_are_identical(ours, theirs):
    stop = set(ours.tokenizer.end_token_ids)
    lengths = []
    for ids in prompt_ids(ours):
        mine = greedy_with_cache(ours.model, ids, 20, stop)
        lengths.append(len(mine))
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                        eos_token_id=sorted(stop), pad_token_id=min(stop))
        assert mine == generated[0, len(ids):].tolist(), ours.tokenizer.decode(mine)
    assert max(lengths) == 20  # at least one continuation ran the full 20 tokens
    assert "Paris" in ours.tokenizer.decode(greedy_with_cache(ours.model, prompt_ids(ours)[0], 3, stop))


def test_default_source_names_resolve_to_the_cached_gguf(default_gguf):
    from homebake.model.load import resolve_source

    assert resolve_source(None) == (default_gguf, "gguf")
    assert resolve_source("smollm2-135m-instruct") == (default_gguf, "gguf")
