"""Text generation with the KV cache: greedy and temperature / top-k / top-p sampling, streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .errors import ConfigError


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0", where="--temperature", fix="use 0 for greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]", where="--top-p", fix="e.g. --top-p 0.9")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0", where="--top-k", fix="use 0 to disable")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1", where="--max-new-tokens", fix="e.g. 256")


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """Pick the next token id from a (vocab,) logits vector."""
    if config.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs >= config.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], config: SamplingConfig, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; stops at any of ``stop_ids`` (not yielded) or the token limit."""
    config.validate()
    if not prompt_ids:
        raise ConfigError("the prompt is empty", where="--prompt", fix="give some text to continue")
    stop = set(stop_ids)
    context = getattr(model.args, "max_position_embeddings", None) or len(prompt_ids) + config.max_new_tokens
    budget = min(config.max_new_tokens, context - len(prompt_ids))
    if budget < 1:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the model's context is {context}",
                          where="--prompt", fix="shorten the prompt")
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    cache = model.new_kv_cache(1, len(prompt_ids) + budget)
    hidden = model(torch.tensor([prompt_ids], device=device), kv_cache=cache)
    for _ in range(budget):
        token = sample_next(model.logits(hidden[0, -1]).cpu(), config, generator)
        if token in stop:
            return
        yield token
        hidden = model(torch.tensor([[token]], device=device), kv_cache=cache)


def stream_text(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, holding back bytes of an unfinished UTF-8 character."""
    ids: list[int] = []
    shown = 0
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is split across tokens; wait for the rest
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]
