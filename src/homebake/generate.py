"""Text generation with the KV cache: greedy and temperature / top-k / top-p sampling, streamed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

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


# A common prompt prefix (e.g. the system prompt every held-out example shares) at least this long is computed
# once and its keys/values copied into every row; shorter ones are not worth the copy.
SHARED_PREFIX_MIN = 8


def shared_prefix(model, prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares and :func:`decode` computes once (0: none).

    At least one token of each prompt is left to compute (its last hidden state gives the first answer token).
    Rows of different lengths then carry padding between the prefix and their own tokens; a sliding window
    counts cache slots, not positions, so windowed models keep the plain left padding.
    """
    if len(prompts) < 2:
        return 0
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        same = 0
        while same < length and prompt[same] == first[same]:
            same += 1
        length = same
    args = model.args
    if length < SHARED_PREFIX_MIN or any(args.layer_window(i) for i in range(args.num_hidden_layers)):
        return 0
    return length


@torch.inference_mode()
def decode(model, prompts: list[list[int]], max_new_tokens: int, choose: Callable[[torch.Tensor], list[int]], *,
           stop_ids: Iterable[int] = (), pad_token_id: int = 0) -> Iterator[list[int | None]]:
    """The decode loop: every prompt continued one token per step, all in one KV cache.

    ``choose`` maps the (rows, vocab) logits of a step to one token id per row (greedy or sampled). Yields per
    step the new token of each prompt — ``None`` for a prompt that already stopped (a stop id ends its row and
    is not yielded) — until every row stopped or ``max_new_tokens`` steps were taken. Prompts of different
    lengths are padded; padding is hidden from attention (``key_mask``) and positions count real tokens only,
    so each row computes what it would alone. Work is not repeated: a prefix all prompts share is computed
    once (:func:`shared_prefix`), and a row that stops leaves the batch (its cache rows are dropped), so later
    steps compute only the rows still answering.
    """
    stop = set(stop_ids)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    shared = shared_prefix(model, prompts)
    ragged = any(len(p) != width for p in prompts)
    # Layout per row: [shared prefix][padding][the rest of the prompt][answer]; without a shared prefix this
    # is plain left padding.
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    key_mask = torch.zeros((rows, width + max_new_tokens), dtype=torch.bool)
    for r, prompt in enumerate(prompts):
        begin = width - (len(prompt) - shared)
        input_ids[r, :shared] = torch.tensor(prompt[:shared], dtype=torch.long)
        input_ids[r, begin:] = torch.tensor(prompt[shared:], dtype=torch.long)
        key_mask[r, :shared] = True
        key_mask[r, begin:width] = True
    positions = (key_mask[:, :width].long().cumsum(1) - 1).clamp(min=0)
    input_ids, key_mask, positions = input_ids.to(device), key_mask.to(device), positions.to(device)
    cache = model.new_kv_cache(rows, width + max_new_tokens)
    if shared:
        # one row of the prefix, broadcast into every row (same capacity: length-dependent RoPE picks its table
        # by the cache's size)
        prefix = model.new_kv_cache(1, width + max_new_tokens)
        model(input_ids[:1, :shared], position_ids=positions[:1, :shared], kv_cache=prefix)
        cache.copy_prefix(prefix)
        del prefix
    # Without padding the plain causal path is exact (and the fastest kernel).
    hidden = model(input_ids[:, shared:], position_ids=positions[:, shared:], kv_cache=cache,
                   key_mask=key_mask[:, :width] if ragged else None)
    next_position = positions[:, -1:] + 1
    alive = list(range(rows))  # the prompt each batch row answers
    for step in range(max_new_tokens):
        tokens = choose(model.logits(hidden[:, -1]))
        new: list[int | None] = [None] * rows
        keep = []
        for b, (r, token) in enumerate(zip(alive, tokens)):
            if token not in stop:
                new[r] = token
                keep.append(b)
        if not keep:
            return
        yield new
        if step == max_new_tokens - 1:
            return
        if len(keep) < len(alive):  # finished rows leave the batch: later steps do not compute them
            index = torch.tensor(keep, device=device)
            cache.select(index)
            key_mask, next_position = key_mask.index_select(0, index), next_position.index_select(0, index)
            alive, tokens = [alive[b] for b in keep], [tokens[b] for b in keep]
        key_mask[:, width + step] = True
        hidden = model(torch.tensor(tokens, device=device)[:, None], position_ids=next_position, kv_cache=cache,
                       key_mask=key_mask[:, :width + step + 1] if ragged else None)
        next_position = next_position + 1


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def length_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts to decode together: sorted by length (similar lengths pad little), cut into
    chunks of at most ``batch_size``, as even as possible (50 by 16: 13+13+12+12)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = math.ceil(len(order) / max(1, math.ceil(len(order) / batch_size)))
    return [order[start:start + size] for start in range(0, len(order), size)]


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_token_id: int) -> list[list[int]]:
    """Greedy continuations of several prompts at once, each cut at a stop id (see :func:`decode`)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens in decode(model, prompts, max_new_tokens, greedy, stop_ids=stop_ids, pad_token_id=pad_token_id):
        for row, token in zip(outputs, tokens):
            if token is not None:
                row.append(token)
    return outputs


def generate_ids(model, prompt_ids: list[int], config: SamplingConfig, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; stops at any of ``stop_ids`` (not yielded) or the token limit."""
    config.validate()
    if not prompt_ids:
        raise ConfigError("the prompt is empty", where="--prompt", fix="give some text to continue")
    context = getattr(model.args, "max_position_embeddings", None) or len(prompt_ids) + config.max_new_tokens
    budget = min(config.max_new_tokens, context - len(prompt_ids))
    if budget < 1:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the model's context is {context}",
                          where="--prompt", fix="shorten the prompt")
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)

    def choose(logits: torch.Tensor) -> list[int]:
        return [sample_next(row.cpu(), config, generator) for row in logits]

    for (token,) in decode(model, [prompt_ids], budget, choose, stop_ids=stop_ids):
        yield token


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
