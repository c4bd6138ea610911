"""`homebake data check`: what the pipeline makes of a dataset, and exactly which tokens will be learned.

The report lists the detected format per file, example and turn counts, token-length statistics with a
histogram, the trained-token fraction, truncated/dropped/duplicate counts with reasons, every skipped
line as ``file:line: reason``, and a preview of rendered examples with trained tokens marked (colour
on a terminal, ``[[...]]`` markers otherwise). Preference pairs get their own lines: pair count, prompt and
reply lengths of each side with their trained tokens, and a preview showing the prompt once and both replies.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .encode import Encoded, EncodedPair
from .pipeline import PreparedDataset

GREEN, DIM, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
OPEN_MARK, CLOSE_MARK = "[[", "]]"
HISTOGRAM_BINS, BAR_WIDTH = 10, 40


@dataclass
class Marker:
    """How trained and untrained text is shown."""

    color: bool

    def trained(self, text: str) -> str:
        return f"{GREEN}{text}{RESET}" if self.color else f"{OPEN_MARK}{text}{CLOSE_MARK}"

    def untrained(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color else text

    def legend(self) -> str:
        return (f"trained tokens in {GREEN}green{RESET}, the rest {DIM}dimmed{RESET}" if self.color
                else f"trained tokens {OPEN_MARK}between markers{CLOSE_MARK}")


def render_marked(tokenizer, encoded: Encoded, marker: Marker) -> str:
    """The example's text with trained spans marked; spans are decoded whole so multi-byte characters
    split across tokens stay intact."""
    pieces, start = [], 0
    for end in range(1, len(encoded.ids) + 1):
        if end == len(encoded.ids) or encoded.mask[end] != encoded.mask[start]:
            text = tokenizer.decode(encoded.ids[start:end])
            pieces.append(marker.trained(text) if encoded.mask[start] else marker.untrained(text))
            start = end
    return "".join(pieces)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered), "mean": statistics.fmean(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def histogram(lengths: Sequence[int], bins: int = HISTOGRAM_BINS) -> list[str]:
    """Text histogram of token lengths over equal-width bins from the shortest to the longest example."""
    low, top = min(lengths), max(lengths)
    width = max(1, -(-(top - low + 1) // bins))
    counts = Counter((length - low) // width for length in lengths)
    most = max(counts.values())
    label_width = len(f"{top}")
    lines = []
    for b in range(-(-(top - low + 1) // width)):
        start = low + b * width
        bar = "#" * max(1 if counts[b] else 0, round(BAR_WIDTH * counts[b] / most))
        lines.append(f"  {start:>{label_width}}-{start + width - 1:<{label_width}} {bar:<{BAR_WIDTH}} {counts[b]:,}")
    return lines


def report(prepared: PreparedDataset, tokenizer, *, config, preview: int = 3, color: bool = False) -> str:
    """The full `homebake data check` text."""
    marker = Marker(color)
    examples = prepared.examples
    lines = ["Files"]
    for name, fmt in prepared.formats.items():
        lines.append(f"  {name}  format: {fmt}")
    lines.append("")
    kept = len(examples)
    split = (f" ({len(prepared.train):,} training, {len(prepared.validation):,} validation)"
             if prepared.validation else "")
    lines.append(f"Examples: {prepared.records:,} read, {kept:,} usable{split}, {len(prepared.skipped):,} skipped, "
                 f"{len(prepared.duplicates):,} duplicates removed")
    chats = [e for e in examples if e.messages]
    if chats:
        turns = sum(e.messages for e in chats)
        trained_turns = sum(e.trained_turns for e in chats)
        lines.append(f"Turns: {turns:,} messages in {len(chats):,} conversations, {trained_turns:,} assistant turns "
                     f"trained (train_on: {config.train_on})")
        unattributed = sum(e.unattributed_turns for e in chats)
        if unattributed:
            lines.append(f"  {unattributed:,} assistant turns left untrained: the chat template renders them "
                         "differently once later turns follow (use train_on: last_turn, or one turn per example)")
    if len(chats) < kept:
        lines.append(f"Plain text: {kept - len(chats):,} examples (every token trained)")
    pairs = [e for e in examples if isinstance(e, EncodedPair)]
    if pairs:
        lines += _pair_lines(pairs)
    if examples:
        lines += _token_lines(examples, config, pairs=bool(pairs))
    lines += _problem_lines(prepared, config)
    if examples and preview > 0:
        lines += ["", f"Preview of {min(preview, kept)} example(s) ({marker.legend()}):"]
        for encoded in examples[:preview]:
            if isinstance(encoded, EncodedPair):
                lines += _pair_preview(tokenizer, encoded, marker)
                continue
            lines.append(f"--- {encoded.source} ({len(encoded.ids):,} tokens, {encoded.num_trained:,} trained)")
            lines.append(render_marked(tokenizer, encoded, marker))
    return "\n".join(lines)


def _stats_text(values: Sequence[int]) -> str:
    stats = length_stats(values)
    return (f"min {stats['min']:,}, median {stats['median']:,.0f}, mean {stats['mean']:,.1f}, p95 {stats['p95']:,}, "
            f"max {stats['max']:,}")


def _pair_lines(pairs: Sequence[EncodedPair]) -> list[str]:
    """Pairs, the shared prompt's length and each side's reply length and trained tokens."""
    lines = [f"Pairs: {len(pairs):,} preference pairs (the prompt is shared; only the replies and their "
             "end-of-turn are trained)",
             f"  prompt tokens: {_stats_text([p.prompt_tokens for p in pairs])}"]
    for side in ("chosen", "rejected"):
        encoded = [getattr(p, side) for p in pairs]
        replies = [len(e.ids) - p.prompt_tokens for e, p in zip(encoded, pairs)]
        lines.append(f"  {side} reply tokens: {_stats_text(replies)}; trained {sum(e.num_trained for e in encoded):,}")
    longer = sum(len(p.chosen.ids) > len(p.rejected.ids) for p in pairs)
    lines.append(f"  chosen reply longer than rejected in {longer:,} of {len(pairs):,} pairs")
    return lines


@dataclass
class _Span:
    ids: list[int]
    mask: list[bool]


def _pair_preview(tokenizer, pair: EncodedPair, marker: Marker) -> list[str]:
    cut = pair.prompt_tokens
    lines = [f"--- {pair.source} (pair: prompt {cut:,} tokens; chosen {pair.chosen.num_trained:,} trained, "
             f"rejected {pair.rejected.num_trained:,} trained)",
             render_marked(tokenizer, _Span(pair.chosen.ids[:cut], pair.chosen.mask[:cut]), marker) if cut else ""]
    for side in ("chosen", "rejected"):
        encoded = getattr(pair, side)
        lines.append(f"{side}: " + render_marked(tokenizer, _Span(encoded.ids[cut:], encoded.mask[cut:]), marker))
    return lines


def _token_lines(examples: Sequence[Encoded], config, *, pairs: bool = False) -> list[str]:
    lengths = [len(e.ids) for e in examples]
    stats = length_stats(lengths)
    total, trained = sum(lengths), sum(e.num_trained for e in examples)
    unit = "pair (chosen + rejected)" if pairs else "example"
    limit = (f"max_seq_len {config.max_seq_len:,}" if config.max_seq_len is not None else
             f"max_seq_len unset: training would use {config.row_length(stats['max']):,}")
    lines = ["", f"Tokens per {unit} ({limit} per sequence): min {stats['min']:,}, "
             f"median {stats['median']:,.0f}, mean {stats['mean']:,.1f}, p95 {stats['p95']:,}, max {stats['max']:,}"]
    lines += histogram(lengths)
    lines.append(f"Trained tokens: {trained:,} of {total:,} ({trained / max(1, total):.1%})")
    eos_added = sum(e.eos_appended for e in examples)
    if eos_added:
        lines.append(f"  EOS appended to {eos_added:,} examples: the template writes no end-of-turn token "
                     "after the last reply")
    return lines


def _problem_lines(prepared: PreparedDataset, config) -> list[str]:
    examples = prepared.examples
    counts = prepared.skip_counts()
    truncated = [e for e in examples if e.truncated_tokens]
    lines = ["", f"Length limit (truncation: {config.truncation}): {counts.get('too long', 0):,} dropped as too long, "
             f"{len(truncated):,} truncated ({sum(e.truncated_tokens for e in truncated):,} tokens cut)"]
    if prepared.skipped:
        reasons = ", ".join(f"{kind} {count:,}" for kind, count in counts.most_common())
        lines += ["", f"Skipped {len(prepared.skipped):,} ({reasons}):"]
        lines += [f"  {item}" for item in sorted(prepared.skipped, key=lambda s: _natural(s.source))]
    if prepared.duplicates:
        lines += ["", f"Duplicates removed {len(prepared.duplicates):,}:"]
        lines += [f"  {item}" for item in prepared.duplicates]
    return lines


def _natural(text: str) -> list:
    """Sort key that puts file:9 before file:10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
