"""Task metrics for generated answers against reference answers, and the before/after verdict.

Pure functions over strings and numbers, so they are tested on hand-made cases:

- exact match: the answer equals the reference after stripping surrounding whitespace only;
- normalised match: equal after case-folding and collapsing whitespace; when both sides are JSON,
  equal as parsed values (key order, spacing and string case do not matter);
- per-field match for JSON-object references: which of the reference's keys the answer got right
  (an answer that is not a JSON object gets every field wrong);
- a verdict (improved / no change / worse) from paired per-example results, with a sign test so a
  handful of lucky examples on a small held-out set does not count as an improvement.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

_SPACES = re.compile(r"\s+")
# A JSON answer wrapped in a Markdown code fence: ```json {...} ```
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*(.*?)\s*```$", re.DOTALL)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def normalize_text(text: str) -> str:
    """Case-folded, whitespace-collapsed text (what a reader would call 'the same words')."""
    return _SPACES.sub(" ", text).strip().casefold()


def parse_json(text: str) -> Any | None:
    """The JSON value of ``text`` (a whole-text parse, or inside one Markdown code fence); None if not JSON."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def normalize_value(value: Any) -> Any:
    """A JSON value made comparable: strings case-folded and whitespace-collapsed, numbers as floats."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return normalize_text(value)
    if isinstance(value, list):
        return [normalize_value(item) for item in value]
    if isinstance(value, dict):
        return {normalize_text(str(key)): normalize_value(item) for key, item in value.items()}
    return value


def normalized_match(prediction: str, reference: str) -> bool:
    reference_json = parse_json(reference)
    if isinstance(reference_json, (dict, list)):
        prediction_json = parse_json(prediction)
        return prediction_json is not None and normalize_value(prediction_json) == normalize_value(reference_json)
    return normalize_text(prediction) == normalize_text(reference)


def field_matches(prediction: str, reference: str) -> dict[str, bool] | None:
    """For a JSON-object reference: {key: answer has that key with an equal (normalised) value}.

    None when the reference is not a JSON object (per-field match does not apply).
    """
    reference_json = parse_json(reference)
    if not isinstance(reference_json, dict):
        return None
    prediction_json = parse_json(prediction)
    if not isinstance(prediction_json, dict):
        return {str(key): False for key in reference_json}
    return {str(key): key in prediction_json and normalize_value(prediction_json[key]) == normalize_value(value)
            for key, value in reference_json.items()}


@dataclass
class ExampleScore:
    exact: bool
    normalized: bool
    valid_json: bool | None  # None when the reference is not JSON
    fields: dict[str, bool] | None


def score_example(prediction: str, reference: str) -> ExampleScore:
    reference_is_json = isinstance(parse_json(reference), (dict, list))
    return ExampleScore(
        exact=exact_match(prediction, reference),
        normalized=normalized_match(prediction, reference),
        valid_json=(parse_json(prediction) is not None) if reference_is_json else None,
        fields=field_matches(prediction, reference),
    )


@dataclass
class TaskScores:
    """Aggregate task metrics over examples, as fractions in [0, 1]."""

    count: int
    exact_match: float
    normalized_match: float
    valid_json: float | None = None  # share of answers that parse, over examples with a JSON reference
    field_accuracy: float | None = None  # share of (example, field) pairs right, over JSON-object references
    per_field: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"count": self.count, "exact_match": self.exact_match, "normalized_match": self.normalized_match,
                "valid_json": self.valid_json, "field_accuracy": self.field_accuracy, "per_field": self.per_field}


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def aggregate(scores: Sequence[ExampleScore]) -> TaskScores:
    json_flags = [s.valid_json for s in scores if s.valid_json is not None]
    field_flags: dict[str, list[bool]] = {}
    for score in scores:
        for key, ok in (score.fields or {}).items():
            field_flags.setdefault(key, []).append(ok)
    all_fields = [ok for flags in field_flags.values() for ok in flags]
    return TaskScores(
        count=len(scores),
        exact_match=_mean([s.exact for s in scores]),
        normalized_match=_mean([s.normalized for s in scores]),
        valid_json=_mean(json_flags) if json_flags else None,
        field_accuracy=_mean(all_fields) if all_fields else None,
        per_field={key: _mean(flags) for key, flags in field_flags.items()},
    )


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is if neither side is better."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


IMPROVED, NO_CHANGE, WORSE = "improved", "no change", "worse"


@dataclass
class Verdict:
    label: str  # improved | no change | worse
    metric: str  # what decided it, e.g. "exact match" or "validation loss"
    before: float
    after: float
    wins: int  # examples better after
    losses: int  # examples worse after
    p_value: float
    reason: str  # one sentence with the numbers

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verdict_from_pairs(metric: str, before: float, after: float, wins: int, losses: int,
                       *, unit: str, alpha: float = 0.05) -> Verdict:
    """Improved / worse when more examples moved one way than chance explains (sign test at ``alpha``)."""
    p = sign_test_p(wins, losses)
    if wins > losses and p < alpha:
        label = IMPROVED
    elif losses > wins and p < alpha:
        label = WORSE
    else:
        label = NO_CHANGE
    if unit == "points":
        delta = f"{100 * (after - before):+.1f} points"
        numbers = f"{100 * before:.1f}% -> {100 * after:.1f}%"
    else:
        delta = f"{after - before:+.3f}"
        numbers = f"{before:.3f} -> {after:.3f}"
    reason = (f"{metric} {numbers} ({delta}); {wins} examples better, {losses} worse "
              f"(sign test p={p:.2g})")
    return Verdict(label, metric, before, after, wins, losses, p, reason)


def task_verdict(before: Sequence[bool], after: Sequence[bool], *, metric: str = "exact match") -> Verdict:
    """Verdict from per-example success flags of the same examples before and after fine-tuning."""
    if len(before) != len(after):
        raise ValueError("before and after must score the same examples")
    wins = sum(1 for b, a in zip(before, after) if a and not b)
    losses = sum(1 for b, a in zip(before, after) if b and not a)
    return verdict_from_pairs(metric, _mean(before), _mean(after), wins, losses, unit="points")


def loss_verdict(before: Sequence[float], after: Sequence[float], *, before_loss: float, after_loss: float,
                 tolerance: float = 0.01) -> Verdict:
    """Verdict from per-example mean token losses (lower is better); changes under ``tolerance`` nats are ties.

    ``before_loss``/``after_loss`` are the token-weighted losses over the whole set, shown in the reason.
    """
    if len(before) != len(after):
        raise ValueError("before and after must score the same examples")
    wins = sum(1 for b, a in zip(before, after) if a < b - tolerance)
    losses = sum(1 for b, a in zip(before, after) if a > b + tolerance)
    return verdict_from_pairs("validation loss", before_loss, after_loss, wins, losses, unit="nats")


# ---------------------------------------------------------------------------------------------- the table

# The one before/after table, rendered as text by `homebake eval`/`compare` and as HTML by report.html.
METRIC_ROWS = (  # (label, key path in an EvalResult dict, kind, lower is better)
    ("validation loss (per trained token)", ("loss",), "num", True),
    ("perplexity", ("perplexity",), "num", True),
    ("exact match", ("task", "exact_match"), "pct", False),
    ("normalised match", ("task", "normalized_match"), "pct", False),
    ("valid JSON", ("task", "valid_json"), "pct", False),
    ("per-field match (all fields)", ("task", "field_accuracy"), "pct", False),
    ("preference accuracy (chosen > rejected)", ("preference", "accuracy"), "pct", False),
    ("preference accuracy per token", ("preference", "accuracy_per_token"), "pct", False),
    ("preference margin (log-prob)", ("preference", "margin"), "num", False),
)
INFO_ROWS = (("generation speed (tokens/s)", ("generation_tokens_per_s",)), ("evaluation time (s)", ("seconds",)))


@dataclass
class MetricRow:
    label: str
    values: list[Any]  # one per result column (None: not measured)
    kind: str  # "pct" (a share, shown in %), "num", or "info" (context, no change shown)
    lower_is_better: bool = False
    field_name: str | None = None  # a per-field row of the JSON match

    def change(self) -> float | None:
        """after - before for two columns of a metric (None otherwise)."""
        if self.kind == "info" or len(self.values) != 2:
            return None
        before, after = self.values
        if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
            return None
        return after - before

    def improved(self) -> bool | None:
        diff = self.change()
        if not diff:
            return None
        return diff < 0 if self.lower_is_better else diff > 0


def _get(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def metric_rows(results: Sequence[dict]) -> list[MetricRow]:
    """The rows of the before/after table for one or more result dicts (``EvalResult.to_dict()``), skipping
    metrics none of them has: the task metrics, then one row per JSON field, then speed and time."""
    rows = []
    for label, path, kind, lower in METRIC_ROWS:
        values = [_get(result, path) for result in results]
        if any(v is not None for v in values):
            rows.append(MetricRow(label, values, kind, lower))
    fields: dict[str, None] = {}
    for result in reversed(results):  # the fine-tuned model's field order first
        fields.update(dict.fromkeys(_get(result, ("task", "per_field")) or {}))
    for name in fields:
        values = [_get(result, ("task", "per_field", name)) for result in results]
        rows.append(MetricRow(f"field {name}", values, "pct", False, field_name=name))
    for label, path in INFO_ROWS:
        values = [_get(result, path) for result in results]
        if any(v is not None for v in values):
            rows.append(MetricRow(label, values, "info"))
    return rows


def format_value(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "info":
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def format_change(row: MetricRow) -> str:
    diff = row.change()
    if diff is None:
        return ""
    return f"{100 * diff:+.1f} pts" if row.kind == "pct" else f"{diff:+.4f}"
