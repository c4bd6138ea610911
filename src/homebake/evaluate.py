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
so the fine-tuned model runs at the base model's speed. ``compare`` evaluates the base, the base prompted with
a few training examples (``homebake.baselines``), the base's answers to general instructions (``homebake.drift``),
swaps in the merged weights, evaluates again, measures drift, optionally scores the exported GGUF in llama.cpp
(``homebake.gguf_eval``), and gives the verdicts with the numbers behind them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .baselines import DEFAULT_SEED, DEFAULT_SHOTS, ShotSet
from .drift import DRIFT_MAX_NEW_TOKENS
from .errors import ConfigError, DataError
from .generate import greedy_batch, length_chunks
from .metrics import (WORSE, ExampleScore, TaskScores, aggregate, loss_verdict, paired_counts, prompting_verdict,
                      score_example, task_verdict, verdict_from_pairs)

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


@dataclass
class Answer:
    text: str
    tokens: int  # generated (the end token not counted)
    prompt_tokens: int
    stopped: bool  # ended by an end token, not by the length limit


def greedy_answers(model, tokenizer, examples: list[EvalExample], max_new_tokens: int, *, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> list[Answer]:
    """The greedy answer to every example, stopping at the model's end tokens."""
    encoded = [prompt_ids(tokenizer, e) for e in examples]
    context = getattr(model.args, "max_position_embeddings", None)
    if context:
        too_long = [e.source for e, ids in zip(examples, encoded) if len(ids) + max_new_tokens > context]
        if too_long:
            raise DataError(f"the prompt and answer do not fit the model's context of {context} tokens",
                            where=too_long[0], fix="shorten the example or lower --max-new-tokens")
    answers: list[Answer] = [Answer("", 0, 0, False)] * len(examples)
    done = 0
    for chunk in length_chunks([len(ids) for ids in encoded], batch_size):
        generated = greedy_batch(model, [encoded[i] for i in chunk], max_new_tokens, tokenizer.end_token_ids,
                                 tokenizer.pad_token_id)
        for index, ids in zip(chunk, generated):
            answers[index] = Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids),
                                    len(encoded[index]), len(ids) < max_new_tokens)
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
    prompt_tokens_per_request: float | None = None  # mean prompt length of the answered examples
    stopped_share: float | None = None  # share of answers ended by the end token (not the length limit)
    preference: dict | None = None  # preference_scores() on a file of pairs

    def to_dict(self) -> dict:
        return {"examples": self.examples, "loss": self.loss, "perplexity": self.perplexity,
                "trained_tokens": self.trained_tokens, "task": self.task.to_dict() if self.task else None,
                "prompt_tokens_per_request": self.prompt_tokens_per_request, "stopped_share": self.stopped_share,
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
    with_reference = answered_examples(data, options)
    budget = answer_budget(with_reference, tokenizer, options) if with_reference else 0
    tick = time.perf_counter()
    answers = greedy_answers(model, tokenizer, with_reference, budget, batch_size=options.generation_batch,
                             progress=(lambda n: progress(f"{n}/{len(with_reference)} answered"))
                             if progress else None) if with_reference else []
    result = scored_result(data, with_reference, answers, loss, gen_seconds=time.perf_counter() - tick,
                           started=started)
    result.preference = preference
    return result


def answered_examples(data: EvalData, options: EvalOptions) -> list[EvalExample]:
    """The examples that get an answer: those with a reference, the first ``options.generate`` of them."""
    with_reference = [e for e in data.examples if e.reference is not None]
    return with_reference[:options.generate] if options.generate is not None else with_reference


def scored_result(data: EvalData, examples: list[EvalExample], answers: list[Answer], loss: LossResult | None, *,
                  gen_seconds: float, started: float) -> EvalResult:
    """Score ``answers`` (one per example of ``examples``) into an EvalResult; the one scoring for every system."""
    scores, samples, generated = [], [], 0
    for example, answer in zip(examples, answers):
        generated += answer.tokens
        score = score_example(answer.text, example.reference)
        scores.append(score)
        samples.append({"source": example.source, "prompt": example.prompt_text, "reference": example.reference,
                        "output": answer.text, "exact": score.exact, "normalized": score.normalized,
                        "fields": score.fields})
    count = len(answers)
    loss = loss or LossResult(None, 0, [None] * len(data.examples))
    return EvalResult(
        examples=len(data.examples), loss=loss.loss, perplexity=perplexity(loss.loss), trained_tokens=loss.tokens,
        per_example_loss=loss.per_example, task=aggregate(scores) if scores else None, scores=scores,
        samples=samples, generated_tokens=generated,
        generation_tokens_per_s=generated / gen_seconds if gen_seconds > 0 and generated else None,
        seconds=time.perf_counter() - started, skipped=len(data.skipped),
        prompt_tokens_per_request=sum(a.prompt_tokens for a in answers) / count if count else None,
        stopped_share=sum(a.stopped for a in answers) / count if count else None)


# ---------------------------------------------------------------------------------------------- few-shot


def few_shot_data(data: EvalData, shots: list, tokenizer, options: EvalOptions, *, with_loss: bool = True) -> EvalData:
    """``data`` with the shots as prior turns of every prompt (``homebake.baselines.few_shot_messages``).

    The loss covers the reference answer only (``train_on: last_turn``), not the shots' answers; without
    ``with_loss`` no example is encoded for it (the loss is then None: scoring the long prompts costs about as
    much again as answering them)."""
    from .baselines import few_shot_messages
    from .data.encode import Encoder
    from .data.formats import Conversation, RecordError

    encoder = Encoder(tokenizer, train_on="last_turn", max_seq_len=options.max_seq_len, truncation="drop")
    examples = []
    for example in data.examples:
        if example.reference is None:
            examples.append(EvalExample(example.source, None, None, None))
            continue
        messages = few_shot_messages(shots, example.prompt_messages)
        conversation = Conversation(messages + [{"role": "assistant", "content": example.reference}],
                                    example.source, "messages", example.tools)
        encoded = None
        if with_loss:
            try:
                encoded = encoder(conversation)
            except RecordError:
                pass
        examples.append(EvalExample(example.source, encoded, messages, example.reference, example.tools))
    return EvalData(data.path, examples, data.skipped)


def evaluated_messages(path: str, data_format: str = "auto") -> list[list[dict]]:
    """Every chat example of the evaluated file (all of it, whatever --max-examples): what shots must avoid."""
    from .data.formats import SkipLog, load_conversations

    loaded = load_conversations([path], fmt=data_format, log=SkipLog())
    return [c.messages for c in loaded.conversations if not c.is_text]


def _longest_prompt(data: EvalData, tokenizer, options: EvalOptions) -> int:
    examples = answered_examples(data, options)
    return max((len(prompt_ids(tokenizer, e)) for e in examples), default=0)


# ---------------------------------------------------------------------------------------------- the GGUF


def evaluate_gguf(path: str | Path, data: EvalData, tokenizer, options: EvalOptions, *, threads: int | None = None,
                  progress: Callable[[str], None] | None = None) -> EvalResult:
    """The same answered examples through llama.cpp's runtime and chat handling (``homebake.gguf_eval``), scored
    like homebake's answers. ``tokenizer`` (the model's own) sets the same answer budget as for the other systems.
    No loss: llama.cpp answers only."""
    from .gguf_eval import chat_answers

    started = time.perf_counter()
    examples = answered_examples(data, options)
    budget = answer_budget(examples, tokenizer, options) if examples else 0
    longest = max((len(prompt_ids(tokenizer, e)) for e in examples), default=0)
    n_ctx = 256 * math.ceil((longest + budget + 64) / 256)
    requests = [(e.prompt_messages, e.tools) for e in examples]
    tick = time.perf_counter()
    raw = chat_answers(str(path), requests, budget, n_ctx=n_ctx, threads=threads,
                       progress=(lambda n: progress(f"{n}/{len(examples)} answered")) if progress else None)
    answers = [Answer(a.text, a.completion_tokens, a.prompt_tokens, a.stopped) for a in raw]
    return scored_result(data, examples, answers, None, gen_seconds=time.perf_counter() - tick, started=started)


def gguf_record(path: str | Path, gguf: EvalResult, merged: EvalResult, *, runtime: str) -> dict:
    """compare.json's ``"gguf"``: the GGUF's result (same keys as ``"fine_tuned"``), how many answers equal
    homebake's merged model's, and a paired verdict: ``kept`` unless the file is clearly worse (sign test)."""
    record = gguf.to_dict()
    same = sum(1 for a, b in zip(gguf.samples, merged.samples) if a["output"] == b["output"])
    count = len(gguf.samples)
    record.update(file=str(path), runtime=runtime, same_answers=same)
    if merged.scores and len(merged.scores) == len(gguf.scores):
        metric, merged_values, gguf_values, means = _paired_metric([merged, gguf])
        verdict = verdict_from_pairs(metric, means[0], means[1], *paired_counts(merged_values, gguf_values),
                                     unit="points").to_dict()
        stops = f"{round((gguf.stopped_share or 0) * count)} of {count}"
        verdict["reason"] = (f"{metric} {100 * means[0]:.1f}% in homebake -> {100 * means[1]:.1f}% in {runtime} "
                             f"({100 * (means[1] - means[0]):+.1f} points; {verdict['wins']} examples better, "
                             f"{verdict['losses']} worse, sign test p={verdict['p_value']:.2g}); same answer on "
                             f"{same} of {count}; {stops} ended by the end token")
        verdict["label"] = "lost" if verdict["label"] == WORSE else "kept"
        record["verdict"] = verdict
    return record


# ---------------------------------------------------------------------------------------------- models


@dataclass
class CompareOptions:
    """What ``compare`` measures besides base vs fine-tuned."""

    shots: int = DEFAULT_SHOTS  # few-shot examples in the prompting baseline (0: no baseline)
    shots_data: list[str] | None = None  # training data for the shots (None: the run's config.yaml data.paths)
    shots_seed: int = DEFAULT_SEED
    drift: bool = True
    drift_data: str | None = None  # None: the bundled general instructions
    drift_max_new_tokens: int = DRIFT_MAX_NEW_TOKENS
    few_shot_loss: bool = False  # also the loss of the references under the few-shot prompts (as long again)
    gguf: str | None = None  # an exported GGUF to score in llama.cpp
    threads: int | None = None  # llama.cpp threads (None: torch's)

    def validate(self) -> None:
        if not isinstance(self.shots, int) or self.shots < 0:
            raise ConfigError(f"must be 0 or more, got {self.shots!r}", where="--shots", fix="e.g. --shots 5")
        if self.drift_max_new_tokens < 1:
            raise ConfigError("must be positive", where="--drift-max-new-tokens", fix="e.g. 48")


@dataclass
class Comparison:
    base: EvalResult
    tuned: EvalResult
    description: str
    few_shot: EvalResult | None = None
    shot_set: ShotSet | None = None
    drift: dict | None = None
    gguf: dict | None = None
    notes: list[str] = field(default_factory=list)  # what was not measured, and why
    data: EvalData | None = None  # the evaluated examples (to score an exported GGUF on the same ones later)
    tokenizer: object = None  # the model's tokenizer (its answer budget applies to every system)


def _shots_for(adapter: str, data: EvalData, data_path: str, data_format: str, tokenizer, model, options: EvalOptions,
               compare: CompareOptions, notes: list[str]) -> ShotSet | None:
    """The few-shot examples, or None with a note saying why there is no few-shot baseline."""
    from .baselines import TrainingData, load_shots, run_training_data

    if compare.shots_data:
        training = TrainingData(list(compare.shots_data))
    else:
        training = run_training_data(adapter)
        if training is None:
            notes.append(f"few-shot baseline skipped: {adapter} does not record its training data (no config.yaml "
                         "with data.paths); pass --shots-data TRAIN.jsonl")
            return None
    if not any(e.reference is not None for e in data.examples):
        notes.append("few-shot baseline skipped: the evaluated examples have no reference answers")
        return None
    try:
        shot_set = load_shots(training, compare.shots, evaluated_messages(data_path, data_format),
                              seed=compare.shots_seed)
    except DataError as error:
        if compare.shots_data:
            raise
        notes.append(f"few-shot baseline skipped: the run's training data cannot be read ({error}); "
                     "pass --shots-data TRAIN.jsonl")
        return None
    notes.extend(f"few-shot: {note}" for note in shot_set.notes)
    if not shot_set.shots:
        notes.append(f"few-shot baseline skipped: no training example in {', '.join(training.paths)} is eligible "
                     f"({shot_set.excluded} share a user turn with the evaluated file)")
        return None
    context = getattr(model.args, "max_position_embeddings", None)
    if context:
        shaped = few_shot_data(data, shot_set.shots, tokenizer, options, with_loss=False)
        examples = answered_examples(shaped, options)
        needed = _longest_prompt(shaped, tokenizer, options) + answer_budget(examples, tokenizer, options)
        if needed > context:
            notes.append(f"few-shot baseline skipped: prompts with {len(shot_set.shots)} examples need {needed} "
                         f"tokens, the model's context is {context}; try fewer --shots")
            return None
    return shot_set


def run_comparison(model: str | None, adapter: str, data_path: str, options: EvalOptions,
                   compare: CompareOptions | None = None, *, device: str = "auto", dtype: str = "auto",
                   data_format: str = "auto",
                   progress: Callable[[str], Callable[[str], None]] | None = None) -> Comparison:
    """Base, few-shot base, base on the drift set; swap in the fine-tuned weights; fine-tuned, drift; the GGUF."""
    from . import drift
    from .sources import open_model

    compare = compare or CompareOptions()
    compare.validate()
    notes: list[str] = []
    subject = open_model(model, adapter, device=device, dtype=dtype)
    loaded = subject.loaded
    data = load_eval_data(data_path, loaded.tokenizer, options, data_format=data_format)
    base = evaluate_model(loaded.model, loaded.tokenizer, data, options, progress=progress("base") if progress else None)
    few_shot = shot_set = None
    if compare.shots:
        shot_set = _shots_for(adapter, data, data_path, data_format, loaded.tokenizer, loaded.model, options,
                              compare, notes)
        if shot_set is not None:
            name = f"{len(shot_set.shots)}-shot"
            shaped = few_shot_data(data, shot_set.shots, loaded.tokenizer, options, with_loss=compare.few_shot_loss)
            few_shot = evaluate_model(loaded.model, loaded.tokenizer, shaped, options,
                                      progress=progress(name) if progress else None)
    baseline, drift_seconds = None, 0.0
    if compare.drift:
        tick = time.perf_counter()
        instructions = drift.load_instructions(compare.drift_data)
        if progress:
            progress("drift")(f"base answers to {len(instructions)} general instructions")
        baseline = drift.base_pass(loaded.model, loaded.tokenizer, instructions,
                                   data=str(compare.drift_data or drift.DRIFT_FILE),
                                   max_new_tokens=compare.drift_max_new_tokens, batch_size=options.generation_batch)
        drift_seconds = time.perf_counter() - tick
    subject.use_tuned()
    tuned = evaluate_model(loaded.model, loaded.tokenizer, data, options,
                           progress=progress("fine-tuned") if progress else None)
    drift_record = None
    if baseline is not None:
        if progress:
            progress("drift")("fine-tuned model on the same instructions")
        tick = time.perf_counter()
        drift_record = drift.tuned_pass(loaded.model, loaded.tokenizer, baseline, batch_size=options.generation_batch)
        drift_record["seconds"] = drift_seconds + time.perf_counter() - tick
        del baseline
    else:
        notes.append("drift not measured (--no-drift)")
    comparison = Comparison(base, tuned, subject.description, few_shot, shot_set, drift_record, None, notes, data,
                            loaded.tokenizer)
    if compare.gguf:
        comparison.gguf = score_gguf(compare.gguf, data, loaded.tokenizer, options, tuned, notes,
                                     threads=compare.threads, progress=progress)
    return comparison


def score_gguf(path: str | Path, data: EvalData, tokenizer, options: EvalOptions, merged: EvalResult,
               notes: list[str], *, threads: int | None = None,
               progress: Callable[[str], Callable[[str], None]] | None = None) -> dict | None:
    """The ``"gguf"`` record for ``path`` scored in llama.cpp, or None and a note when llama-cpp-python is missing."""
    from .gguf_eval import available, missing_message, runtime_name

    if not available():
        notes.append(missing_message())
        return None
    if threads is None:
        threads = torch.get_num_threads()
    result = evaluate_gguf(path, data, tokenizer, options, threads=threads,
                           progress=progress("GGUF in llama.cpp") if progress else None)
    return gguf_record(path, result, merged, runtime=runtime_name())


def _field_share(score: ExampleScore) -> float:
    return sum(score.fields.values()) / len(score.fields) if score.fields else 0.0


def _paired_metric(results: list[EvalResult]) -> tuple[str, list[float], list[float], list[float]]:
    """The metric that decides between systems on the same examples: exact match, or per-field match when no
    system got any example exactly right (and the references are JSON objects). (metric, values of the first
    two systems per example, each system's mean); values of further systems come from :func:`_values`."""
    metric = _metric_name(results)
    values = [_values(r, metric) for r in results]
    return metric, values[0], values[1], [_mean_of(r, metric) for r in results]


def _metric_name(results: list[EvalResult]) -> str:
    any_exact = any(s.exact for r in results for s in r.scores)
    if not any_exact and all(r.task is not None and r.task.field_accuracy is not None for r in results):
        return "per-field match"
    return "exact match"


def _values(result: EvalResult, metric: str) -> list[float]:
    if metric == "per-field match":
        return [_field_share(s) for s in result.scores]
    return [1.0 if s.exact else 0.0 for s in result.scores]


def _mean_of(result: EvalResult, metric: str) -> float:
    return result.task.field_accuracy if metric == "per-field match" else result.task.exact_match


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
        metric, before, after, means = _paired_metric([base, tuned])
        if metric == "exact match":
            primary = task_verdict([s.exact for s in base.scores], [s.exact for s in tuned.scores]).to_dict()
        else:  # nothing matched exactly on either side: per-field matches say more than 0 -> 0
            primary = verdict_from_pairs(metric, means[0], means[1], *paired_counts(before, after),
                                         unit="points").to_dict()
        return primary, by_loss
    if by_loss is None:
        raise DataError("nothing to compare: no example has trained tokens or a reference answer",
                        where="--data", fix="use chat examples that end with an assistant answer")
    return by_loss, by_loss


def prompting_record(base: EvalResult, few_shot: EvalResult, tuned: EvalResult, shots: int) -> dict | None:
    """The prompting verdict (``homebake.metrics.prompting_verdict``) on the same answered examples."""
    if not base.scores or not len(base.scores) == len(few_shot.scores) == len(tuned.scores):
        return None
    results = [base, few_shot, tuned]
    metric = _metric_name(results)
    values = [_values(r, metric) for r in results]
    return prompting_verdict(metric, *values, means=tuple(_mean_of(r, metric) for r in results), shots=shots,
                             few_shot_tokens=few_shot.prompt_tokens_per_request,
                             tuned_tokens=tuned.prompt_tokens_per_request)


def comparison_record(model: str | None, adapter: str, data: str, comparison: Comparison) -> dict:
    """What compare.json holds (and what report.html reads): ``base``, ``few_shot`` and ``fine_tuned`` with the
    same keys (``EvalResult.to_dict()``), the verdicts, ``drift``, ``gguf`` and ``notes``."""
    from .sources import describe_model

    base, tuned, few = comparison.base, comparison.tuned, comparison.few_shot
    primary, by_loss = compare_verdicts(base, tuned)
    few_dict = None
    if few is not None:
        few_dict = few.to_dict()
        few_dict["shots"] = comparison.shot_set.to_dict() if comparison.shot_set else None
    shots = len(comparison.shot_set.shots) if comparison.shot_set else 0
    return {"model": describe_model(model), "adapter": str(adapter), "data": str(data),
            "base": base.to_dict(), "few_shot": few_dict, "fine_tuned": tuned.to_dict(),
            "verdict": primary, "loss_verdict": by_loss,
            "prompting_verdict": prompting_record(base, few, tuned, shots) if few is not None else None,
            "drift": comparison.drift, "gguf": comparison.gguf, "notes": list(comparison.notes)}


def write_json(path: str | Path, record: dict) -> Path:
    import json

    from .fsutil import atomic_file

    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    return path
