"""Evaluate a model (optionally with a fine-tuned adapter) on a dataset; compare base and fine-tuned.

Two measurements per dataset:

- **loss / perplexity** over the trained positions (assistant turns and their end-of-turn token, as in
  training): examples are read and encoded by the data pipeline, packed into rows (examples never see
  each other) and scored with the training loss function, per example and in total;
- **task metrics** when examples carry a reference answer (the last assistant turn): the prompt (every
  turn before it) is rendered with the model's chat template, a greedy answer is generated, and it is
  scored by exact, normalised and per-field JSON match (``homebake.metrics``).

On a file of preference pairs (``{"prompt", "chosen", "rejected"}``, see docs/data.md) the measurement is
the **preference accuracy**: the share of pairs whose chosen reply the model gives a higher log-probability
than the rejected one (summed over the reply's tokens, as DPO scores them; the per-token mean, as ORPO
scores them, is reported next to it), with the margin; the loss is that of the chosen replies. ``compare``'s
verdict is then the paired sign test over the pairs that flipped.

An adapter is merged into full-precision (fp32) base weights before the model moves to its device/dtype,
so the fine-tuned model runs at the base model's speed. ``compare`` evaluates the base, swaps in the
merged weights, evaluates again, and gives a verdict with the numbers behind it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError, DataError
from .generate import greedy_batch
from .metrics import (ExampleScore, TaskScores, aggregate, loss_verdict, score_example, task_verdict,
                      verdict_from_pairs)

# An answer this many tokens longer than the longest reference cannot match it; stopping there keeps a
# rambling base model from spending minutes on text that is scored wrong anyway.
ANSWER_MARGIN_TOKENS = 16


@dataclass
class EvalOptions:
    max_examples: int | None = None  # evaluate only the first N examples of the file
    generate: int | None = None  # greedy answers for the first N examples with a reference (None: all)
    max_new_tokens: int | None = None  # None: longest reference + ANSWER_MARGIN_TOKENS
    max_seq_len: int = 2048  # longer examples are dropped from the loss (counted)
    batch_size: int = 8  # packed rows per forward pass for the loss
    generation_batch: int = 16  # prompts decoded together
    train_on: str = "all_assistant"  # which tokens the loss covers (as in training)

    def validate(self) -> None:
        for name in ("max_examples", "generate", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "generate" else 1)):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"must be a positive integer, got {value!r}", where=flag, fix="e.g. 50")
        if self.batch_size < 1 or self.generation_batch < 1 or self.max_seq_len < 2:
            raise ConfigError("batch size and max_seq_len must be positive", where="--batch-size / --max-seq-len",
                              fix="e.g. --batch-size 8 --max-seq-len 2048")


@dataclass
class EvalExample:
    source: str  # file:line
    encoded: object | None  # data.encode.Encoded (None when it could not be encoded for the loss)
    prompt_messages: list[dict] | None  # the turns before the reference answer (None for plain text)
    reference: str | None  # the last assistant turn
    tools: list | None = None

    @property
    def prompt_text(self) -> str:
        """The last user turn (what a reader needs to judge the answer)."""
        for message in reversed(self.prompt_messages or []):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


@dataclass
class EvalData:
    path: str
    examples: list[EvalExample]
    skipped: list = field(default_factory=list)  # data.formats.Skipped
    pairs: list = field(default_factory=list)  # data.encode.EncodedPair of a preference file


def load_eval_data(path: str, tokenizer, options: EvalOptions, *, data_format: str = "auto") -> EvalData:
    """Read ``path`` with the data pipeline; every chat example ending in an assistant turn has a reference."""
    from .data.encode import Encoder
    from .data.formats import RecordError, SkipLog, load_conversations

    log = SkipLog()
    loaded = load_conversations([path], fmt=data_format, log=log)
    conversations = loaded.conversations[:options.max_examples] if options.max_examples else loaded.conversations
    if not conversations:
        reasons = "; ".join(str(item) for item in log.items[:3]) or "the file holds no examples"
        raise DataError(f"no usable example ({reasons})", where=path,
                        fix="run `homebake data check` on it to see why")
    encoder = Encoder(tokenizer, train_on=options.train_on, max_seq_len=options.max_seq_len, truncation="drop")
    examples, pairs = [], []
    for conversation in conversations:
        try:
            encoded = encoder(conversation)
        except RecordError as error:
            log.add(error)
            encoded = None
        if conversation.is_pair:  # scored by preference accuracy; the loss is the chosen reply's
            if encoded is not None:
                pairs.append(encoded)
            examples.append(EvalExample(conversation.source, encoded.chosen if encoded else None, None, None))
            continue
        messages = conversation.messages
        if not conversation.is_text and messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
            examples.append(EvalExample(conversation.source, encoded, messages[:-1], str(messages[-1]["content"]),
                                        conversation.tools))
        else:
            examples.append(EvalExample(conversation.source, encoded, None, None))
    return EvalData(path, examples, log.items, pairs)


# ---------------------------------------------------------------------------------------------- loss


@dataclass
class LossResult:
    loss: float | None  # mean over all trained tokens
    tokens: int
    per_example: list[float | None]  # mean per trained token of each example (None: not scored)


@torch.inference_mode()
def dataset_loss(model, examples: list[EvalExample], *, pad_token_id: int, max_seq_len: int,
                 batch_size: int) -> LossResult:
    """Loss at trained positions with the training loss function, per example and overall."""
    from .data.pack import collate, pack_rows
    from .train.loss import head_loss, lm_head, shift_targets

    scored = [i for i, e in enumerate(examples) if e.encoded is not None and e.encoded.num_trained > 0]
    encoded = [examples[i].encoded for i in scored]
    per_example: list[float | None] = [None] * len(examples)
    if not encoded:
        return LossResult(None, 0, per_example)
    head = lm_head(model)
    device = next(model.parameters()).device
    rows = pack_rows([len(e.ids) for e in encoded], max_seq_len)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start:start + batch_size]
        batch = collate(encoded, batch_rows, pad_token_id).to(device)
        hidden = model(batch.input_ids, position_ids=batch.position_ids)
        targets = shift_targets(batch.labels, batch.position_ids)
        for r, row in enumerate(batch_rows):
            offset = 0
            for index in row:
                end = offset + len(encoded[index].ids)
                loss_sum, n = head_loss(hidden[r, offset:end], targets[r, offset:end], head)
                offset = end
                if n:
                    per_example[scored[index]] = float(loss_sum) / n
                    total += float(loss_sum)
                    count += n
    return LossResult(total / count if count else None, count, per_example)


@torch.inference_mode()
def preference_scores(model, pairs: list, *, pad_token_id: int, max_seq_len: int, batch_size: int) -> dict | None:
    """Preference accuracy over pairs: does the model give the chosen reply a higher log-probability than the
    rejected one? Summed over the reply tokens (``accuracy``, ``margin``) and per token (``accuracy_per_token``);
    ``correct`` / ``margins`` per pair, in file order, for the paired test."""
    from .data.pack import collate_pairs, pair_row_groups
    from .train.loss import lm_head, shift_targets
    from .train.objectives import sequence_logps

    if not pairs:
        return None
    head = lm_head(model)
    device = next(model.parameters()).device
    rows = pair_row_groups(pairs, max_seq_len=max_seq_len, packing=True)
    sums, means = [0.0] * (2 * len(pairs)), [0.0] * (2 * len(pairs))
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start:start + batch_size]
        batch = collate_pairs(pairs, batch_rows, pad_token_id).to(device)
        hidden = model(batch.input_ids, position_ids=batch.position_ids)
        seq_sums, counts = sequence_logps(hidden, shift_targets(batch.labels, batch.position_ids), batch.sequence_ids,
                                          head, 2 * batch.num_pairs)
        order = [index for row in batch_rows for index in row]  # the batch's pairs, in sequence order
        for j, index in enumerate(order):
            for side in (0, 1):
                total = float(seq_sums[2 * j + side])
                sums[2 * index + side] = total
                means[2 * index + side] = total / max(1, int(counts[2 * j + side]))
    correct = [sums[2 * i] > sums[2 * i + 1] for i in range(len(pairs))]
    margins = [sums[2 * i] - sums[2 * i + 1] for i in range(len(pairs))]
    n = len(pairs)
    return {"pairs": n, "accuracy": sum(correct) / n,
            "accuracy_per_token": sum(means[2 * i] > means[2 * i + 1] for i in range(n)) / n,
            "margin": sum(margins) / n, "chosen_logps": sum(sums[0::2]) / n, "rejected_logps": sum(sums[1::2]) / n,
            "correct": correct, "margins": margins}


# ---------------------------------------------------------------------------------------------- answers


def answer_budget(examples: list[EvalExample], tokenizer, options: EvalOptions) -> int:
    if options.max_new_tokens:
        return options.max_new_tokens
    longest = max((len(tokenizer.encode(e.reference)) for e in examples if e.reference is not None), default=0)
    return longest + ANSWER_MARGIN_TOKENS


def prompt_ids(tokenizer, example: EvalExample) -> list[int]:
    extra = {"tools": example.tools} if example.tools else {}
    return tokenizer.encode_chat(example.prompt_messages, add_generation_prompt=True, **extra)


def greedy_answers(model, tokenizer, examples: list[EvalExample], max_new_tokens: int, *, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> list[tuple[str, int]]:
    """(answer, tokens generated) per example, greedy, stopping at the model's end tokens."""
    encoded = [prompt_ids(tokenizer, e) for e in examples]
    context = getattr(model.args, "max_position_embeddings", None)
    if context:
        too_long = [e.source for e, ids in zip(examples, encoded) if len(ids) + max_new_tokens > context]
        if too_long:
            raise DataError(f"the prompt and answer do not fit the model's context of {context} tokens",
                            where=too_long[0], fix="shorten the example or lower --max-new-tokens")
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))  # similar lengths pad little
    size = math.ceil(len(order) / max(1, math.ceil(len(order) / batch_size)))  # 50 by 16: 13+13+12+12
    answers: list[tuple[str, int]] = [("", 0)] * len(examples)
    done = 0
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        generated = greedy_batch(model, [encoded[i] for i in chunk], max_new_tokens, tokenizer.end_token_ids,
                                 tokenizer.pad_token_id)
        for index, ids in zip(chunk, generated):
            answers[index] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids))
        done += len(chunk)
        if progress is not None:
            progress(done)
    return answers


# ---------------------------------------------------------------------------------------------- one model


@dataclass
class EvalResult:
    examples: int
    loss: float | None
    perplexity: float | None
    trained_tokens: int
    per_example_loss: list[float | None]
    task: TaskScores | None
    scores: list[ExampleScore]  # per generated example, in order
    samples: list[dict]
    generated_tokens: int
    generation_tokens_per_s: float | None
    seconds: float
    skipped: int = 0
    preference: dict | None = None  # preference_scores() on a file of pairs

    def to_dict(self) -> dict:
        return {"examples": self.examples, "loss": self.loss, "perplexity": self.perplexity,
                "trained_tokens": self.trained_tokens, "task": self.task.to_dict() if self.task else None,
                "generated_tokens": self.generated_tokens, "generation_tokens_per_s": self.generation_tokens_per_s,
                "seconds": self.seconds, "skipped": self.skipped, "per_example_loss": self.per_example_loss,
                "samples": self.samples, **({"preference": self.preference} if self.preference else {})}


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_model(model, tokenizer, data: EvalData, options: EvalOptions,
                   progress: Callable[[str], None] | None = None) -> EvalResult:
    """Loss on every example, greedy answers and task metrics on those with a reference."""
    started = time.perf_counter()
    model.eval()
    loss = dataset_loss(model, data.examples, pad_token_id=tokenizer.pad_token_id, max_seq_len=options.max_seq_len,
                        batch_size=options.batch_size)
    preference = preference_scores(model, data.pairs, pad_token_id=tokenizer.pad_token_id,
                                   max_seq_len=options.max_seq_len, batch_size=options.batch_size)
    with_reference = [e for e in data.examples if e.reference is not None]
    if options.generate is not None:
        with_reference = with_reference[:options.generate]
    budget = answer_budget(with_reference, tokenizer, options) if with_reference else 0
    tick = time.perf_counter()
    answers = greedy_answers(model, tokenizer, with_reference, budget, batch_size=options.generation_batch,
                             progress=(lambda n: progress(f"{n}/{len(with_reference)} answered"))
                             if progress else None) if with_reference else []
    gen_time = time.perf_counter() - tick
    scores, samples, generated = [], [], 0
    for example, (answer, count) in zip(with_reference, answers):
        generated += count
        score = score_example(answer, example.reference)
        scores.append(score)
        samples.append({"source": example.source, "prompt": example.prompt_text, "reference": example.reference,
                        "output": answer, "exact": score.exact, "normalized": score.normalized,
                        "fields": score.fields})
    return EvalResult(
        examples=len(data.examples), loss=loss.loss, perplexity=perplexity(loss.loss), trained_tokens=loss.tokens,
        per_example_loss=loss.per_example, task=aggregate(scores) if scores else None, scores=scores,
        samples=samples, generated_tokens=generated,
        generation_tokens_per_s=generated / gen_time if gen_time > 0 else None,
        seconds=time.perf_counter() - started, skipped=len(data.skipped), preference=preference)


# ---------------------------------------------------------------------------------------------- models


def run_comparison(model: str | None, adapter: str, data_path: str, options: EvalOptions, *, device: str = "auto",
                   dtype: str = "auto", data_format: str = "auto",
                   progress: Callable[[str], Callable[[str], None]] | None = None) -> tuple[EvalResult, EvalResult, str]:
    """Evaluate the base model, swap in the fine-tuned weights, evaluate again: (base, tuned, description)."""
    from .sources import open_model

    subject = open_model(model, adapter, device=device, dtype=dtype)
    loaded = subject.loaded
    data = load_eval_data(data_path, loaded.tokenizer, options, data_format=data_format)
    base = evaluate_model(loaded.model, loaded.tokenizer, data, options, progress=progress("base") if progress else None)
    subject.use_tuned()
    tuned = evaluate_model(loaded.model, loaded.tokenizer, data, options,
                           progress=progress("fine-tuned") if progress else None)
    return base, tuned, subject.description


def compare_verdicts(base: EvalResult, tuned: EvalResult) -> tuple[dict, dict | None]:
    """(primary verdict, loss verdict): the task metric decides when answers were scored, else the loss."""
    loss_pairs = [(b, t) for b, t in zip(base.per_example_loss, tuned.per_example_loss)
                  if b is not None and t is not None]
    by_loss = None
    if loss_pairs and base.loss is not None and tuned.loss is not None:
        by_loss = loss_verdict([b for b, _ in loss_pairs], [t for _, t in loss_pairs],
                               before_loss=base.loss, after_loss=tuned.loss).to_dict()
    if base.preference and tuned.preference:  # a preference file: which reply each model prefers, pair by pair
        return task_verdict(base.preference["correct"], tuned.preference["correct"],
                            metric="preference accuracy").to_dict(), by_loss
    if base.scores and len(base.scores) == len(tuned.scores):
        primary = task_verdict([s.exact for s in base.scores], [s.exact for s in tuned.scores]).to_dict()
        if not any(s.exact for s in base.scores + tuned.scores) and base.task.field_accuracy is not None:
            # nothing matched exactly on either side: per-field matches say more than 0 -> 0
            fields_before = [_field_share(s) for s in base.scores]
            fields_after = [_field_share(s) for s in tuned.scores]
            wins = sum(1 for b, a in zip(fields_before, fields_after) if a > b)
            losses = sum(1 for b, a in zip(fields_before, fields_after) if a < b)
            primary = verdict_from_pairs("per-field match", base.task.field_accuracy, tuned.task.field_accuracy,
                                         wins, losses, unit="points").to_dict()
        return primary, by_loss
    if by_loss is None:
        raise DataError("nothing to compare: no example has trained tokens or a reference answer",
                        where="--data", fix="use chat examples that end with an assistant answer")
    return by_loss, by_loss


def _field_share(score: ExampleScore) -> float:
    return sum(score.fields.values()) / len(score.fields) if score.fields else 0.0


def comparison_record(model: str | None, adapter: str, data: str, base: EvalResult, tuned: EvalResult) -> dict:
    """What compare.json holds (and what report.html reads)."""
    primary, by_loss = compare_verdicts(base, tuned)
    from .sources import describe_model

    return {"model": describe_model(model), "adapter": str(adapter), "data": str(data),
            "base": base.to_dict(), "tuned": tuned.to_dict(), "verdict": primary, "loss_verdict": by_loss}


def write_json(path: str | Path, record: dict) -> Path:
    import json

    from .fsutil import atomic_file

    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    return path
