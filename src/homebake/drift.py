"""Drift: what fine-tuning cost on instructions that have nothing to do with the task.

A fine-tune that learns its task can forget how to follow other instructions. On a small set of general
instructions (``data_files/drift.jsonl``: 50 facts, short how-tos and formatting requests written for
homebake; ``--drift-data FILE`` for your own) the base model answers greedily first. Then, for the fine-tuned
model:

- **KL**: the mean per-token KL divergence KL(fine-tuned || base) of the next-token distributions along the
  base's own answers (every answer token, and the end token when the base stopped), in nats per token: 0 when
  the fine-tune predicts exactly what the base did;
- **kept**: the share of the fine-tuned model's own greedy answers that are the same as the base's (after
  case-folding and collapsing whitespace) or still contain the base answer's key fact
  (``homebake.metrics.key_fact``);
- a plain level, low / noticeable / high (``homebake.metrics.drift_level``; thresholds in docs/eval.md).

The base pass keeps the base's log-probabilities along its answers (float16, answers x vocabulary), so the
fine-tuned weights can replace the base weights in place before the second pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from .generate import greedy_batch, length_chunks
from .metrics import answer_kept, drift_level, drift_thresholds

DRIFT_FILE = Path(__file__).resolve().parent / "data_files" / "drift.jsonl"
DRIFT_MAX_NEW_TOKENS = 48  # the bundled instructions ask for short answers


@dataclass
class Instruction:
    source: str  # file:line
    messages: list[dict]  # the prompt: optional system message(s), then user (and earlier) turns
    kind: str | None = None  # fact / how-to / format in the bundled set

    @property
    def text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


def load_instructions(path: str | Path | None = None) -> list[Instruction]:
    """Instructions from a JSONL file: ``{"prompt": "..."}`` (also ``instruction``; optional ``system``) or
    ``{"messages": [...]}`` ending in a user turn (a final assistant turn is dropped: the base answers it)."""
    path = Path(path) if path is not None else DRIFT_FILE
    if not path.is_file():
        raise DataError("no such drift instruction file", where=str(path),
                        fix="pass a JSONL file of {\"prompt\": ...} lines, or --drift-data none to skip drift")
    fix = 'one JSON object per line: {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}'
    instructions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DataError(f"not JSON ({error.msg})", where=where, fix=fix) from None
        messages = _messages(record, where, fix)
        instructions.append(Instruction(where, messages, record.get("kind") if isinstance(record, dict) else None))
    if not instructions:
        raise DataError("no instruction in the file", where=str(path), fix=fix)
    return instructions


def _messages(record, where: str, fix: str) -> list[dict]:
    if not isinstance(record, dict):
        raise DataError("not a JSON object", where=where, fix=fix)
    prompt = record.get("prompt", record.get("instruction"))
    if isinstance(prompt, str) and prompt.strip():
        system = record.get("system")
        return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + \
            [{"role": "user", "content": prompt}]
    messages = record.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                          and m.get("role") in ("system", "user", "assistant") for m in messages):
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if messages and messages[-1]["role"] == "user":
            return messages
    raise DataError("no instruction: needs a non-empty 'prompt' or 'messages' ending in a user turn",
                    where=where, fix=fix)


# ---------------------------------------------------------------------------------------------- the math


def kl_per_token(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of two (rows, vocab) log-probability tensors, in nats: sum_v p (log p - log q)."""
    log_p, log_q = log_p.float(), log_q.float()
    terms = torch.where(log_p == float("-inf"), torch.zeros_like(log_p), log_p.exp() * (log_p - log_q))  # 0 log 0 = 0
    return terms.sum(-1).clamp(min=0.0)


@torch.inference_mode()
def answer_log_probs(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int], *,
                     pad_token_id: int = 0, batch_size: int = 8) -> list[torch.Tensor]:
    """Log-probabilities (float32, CPU) of the next token at ``counts[i]`` positions of each sequence, the first
    predicting ``sequences[i][starts[i]]``: one (counts[i], vocab) tensor per sequence.

    Sequences are right-padded into batches; with causal attention padding after a position never changes it.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        for row, index in enumerate(chunk):
            ids[row, :len(sequences[index])] = torch.tensor(list(sequences[index]), dtype=torch.long)
        hidden = model(ids.to(device))
        for row, index in enumerate(chunk):
            first = starts[index] - 1  # the position whose output predicts token `starts[index]`
            positions = hidden[row, first:first + counts[index]]
            out[index] = torch.log_softmax(model.logits(positions).float(), dim=-1).cpu()
    return out


# ---------------------------------------------------------------------------------------------- the passes


@dataclass
class DriftBaseline:
    """The base model's side: its prompts, greedy answers and log-probabilities along them."""

    instructions: list[Instruction]
    prompts: list[list[int]]
    answers: list[list[int]]  # generated ids (without the stop token)
    stopped: list[bool]  # the answer ended at an end token (not at the length limit)
    texts: list[str]
    log_probs: list[torch.Tensor]  # float16, (len(answer) + stopped, vocab)
    max_new_tokens: int
    data: str

    def spans(self) -> tuple[list[list[int]], list[int], list[int]]:
        sequences = [p + a for p, a in zip(self.prompts, self.answers)]
        counts = [len(a) + int(s) for a, s in zip(self.answers, self.stopped)]
        return sequences, [len(p) for p in self.prompts], counts


def _prompt_ids(tokenizer, instruction: Instruction) -> list[int]:
    return tokenizer.encode_chat(instruction.messages, add_generation_prompt=True)


def _greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    answers: list[list[int]] = [[] for _ in prompts]
    for chunk in length_chunks([len(p) for p in prompts], batch_size):
        for index, ids in zip(chunk, greedy_batch(model, [prompts[i] for i in chunk], max_new_tokens,
                                                  tokenizer.end_token_ids, tokenizer.pad_token_id)):
            answers[index] = ids
    return answers


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def base_pass(model, tokenizer, instructions: list[Instruction], *, data: str,
              max_new_tokens: int = DRIFT_MAX_NEW_TOKENS, batch_size: int = 16) -> DriftBaseline:
    """Greedy answers of the base model and its log-probabilities along them."""
    model.eval()
    prompts = [_prompt_ids(tokenizer, instruction) for instruction in instructions]
    context = getattr(model.args, "max_position_embeddings", None)
    if context:
        for instruction, ids in zip(instructions, prompts):
            if len(ids) + max_new_tokens > context:
                raise DataError(f"the instruction and its answer do not fit the model's context of {context} tokens",
                                where=instruction.source, fix="shorten the instruction or use --no-drift")
    answers = _greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    stopped = [len(a) < max_new_tokens for a in answers]
    baseline = DriftBaseline(instructions, prompts, answers, stopped, [_decode(tokenizer, a) for a in answers], [],
                             max_new_tokens, data)
    sequences, starts, counts = baseline.spans()
    baseline.log_probs = [lp.half() for lp in answer_log_probs(model, sequences, starts, counts,
                                                               pad_token_id=tokenizer.pad_token_id)]
    return baseline


def tuned_pass(model, tokenizer, baseline: DriftBaseline, *, batch_size: int = 16) -> dict:
    """The fine-tuned model against the base's answers: KL along them, its own answers, kept share, level."""
    model.eval()
    sequences, starts, counts = baseline.spans()
    kls: list[torch.Tensor] = []
    for begin in range(0, len(sequences), 8):  # a few answers at a time: only the base side is kept whole
        window = slice(begin, begin + 8)
        tuned = answer_log_probs(model, sequences[window], starts[window], counts[window],
                                 pad_token_id=tokenizer.pad_token_id)
        kls += [kl_per_token(t, b) for t, b in zip(tuned, baseline.log_probs[window])]
    answers = _greedy(model, tokenizer, baseline.prompts, baseline.max_new_tokens, batch_size)
    items, total_kl, total_tokens = [], 0.0, 0
    for index, instruction in enumerate(baseline.instructions):
        kl = kls[index]
        tuned_text = _decode(tokenizer, answers[index])
        same, kept, fact = answer_kept(baseline.texts[index], tuned_text, instruction.text)
        total_kl += float(kl.sum())
        total_tokens += kl.numel()
        items.append({"source": instruction.source, "kind": instruction.kind, "instruction": instruction.text,
                      "base": baseline.texts[index], "fine_tuned": tuned_text, "key_fact": fact, "same": same,
                      "kept": kept, "kl": float(kl.mean()) if kl.numel() else 0.0, "tokens": kl.numel()})
    return summarize(items, total_kl / total_tokens if total_tokens else 0.0, total_tokens,
                     data=baseline.data, max_new_tokens=baseline.max_new_tokens)


def summarize(items: list[dict], mean_kl: float, tokens: int, *, data: str, max_new_tokens: int) -> dict:
    """The ``"drift"`` record of compare.json."""
    count = len(items)
    kept = sum(1 for item in items if item["kept"])
    same = sum(1 for item in items if item["same"])
    kept_share = kept / count if count else 1.0
    level = drift_level(mean_kl, kept_share)
    reason = (f"KL {mean_kl:.3f} nats/token on the base's answers to {count} general instructions; "
              f"{kept}/{count} fine-tuned answers the same or keeping the base's key fact ({100 * kept_share:.0f}%), "
              f"{same} identical")
    return {"level": level, "mean_kl": mean_kl if math.isfinite(mean_kl) else None, "kept_share": kept_share,
            "same_share": same / count if count else 1.0, "instructions": count, "tokens": tokens,
            "data": data, "max_new_tokens": max_new_tokens, "thresholds": drift_thresholds(), "reason": reason,
            "items": items}
