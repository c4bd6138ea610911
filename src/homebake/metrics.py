"""Task metrics for generated answers against reference answers, and the before/after verdict.

Pure functions over strings and numbers, so they are tested on hand-made cases:

- exact match: the answer equals the reference after stripping surrounding whitespace only;
- normalised match: equal after case-folding and collapsing whitespace; when both sides are JSON,
  equal as parsed values (key order, spacing and string case do not matter);
- per-field match for JSON-object references: which of the reference's keys the answer got right
  (an answer that is not a JSON object gets every field wrong);
- a verdict (improved / no change / worse) from paired per-example results, with a sign test so a
  handful of lucky examples on a small held-out set does not count as an improvement;
- the prompting verdict: did fine-tuning beat the base model prompted with a few examples (few-shot);
- drift on general instructions: the base answer's key fact, whether a fine-tuned answer kept it, and a
  plain level (low / noticeable / high) from the mean KL divergence and the share of answers kept.
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


def paired_counts(before: Sequence[float], after: Sequence[float]) -> tuple[int, int]:
    """(examples better after, examples worse after) of per-example values (higher is better)."""
    if len(before) != len(after):
        raise ValueError("before and after must score the same examples")
    return (sum(1 for b, a in zip(before, after) if a > b), sum(1 for b, a in zip(before, after) if a < b))


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


# ---------------------------------------------------------------------------------------------- prompting

FINE_TUNING_WINS, PROMPTING_GETS_THERE, NEITHER = "fine-tuning wins", "prompting already gets there", "neither"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _tokens(value: float | None) -> str:
    return f"{value:,.0f} prompt tokens per request" if value is not None else "prompt length unknown"


def prompting_verdict(metric: str, base: Sequence[float], few_shot: Sequence[float], tuned: Sequence[float], *,
                      means: tuple[float, float, float], shots: int, few_shot_tokens: float | None = None,
                      tuned_tokens: float | None = None, alpha: float = 0.05) -> dict:
    """Did fine-tuning beat the base model prompted with ``shots`` examples (few-shot), and by how much?

    ``base``/``few_shot``/``tuned``: per-example scores of the same examples (1/0 for exact match, the share of
    fields right for per-field match); ``means``: the metric of each system over the set (base, few-shot,
    fine-tuned). Three outcomes, each decided by a paired sign test at ``alpha``:

    - **fine-tuning wins**: the fine-tuned model beats few-shot prompting;
    - **prompting already gets there**: it does not, and few-shot prompting beats the base model (prompting reaches
      what fine-tuning reaches, or more);
    - **neither**: neither is clearly ahead of the other and prompting does not beat the base (the reason says
      whether fine-tuning beat the base at least).
    """
    base_mean, few_mean, tuned_mean = means
    name = f"{shots}-shot"
    tuned_vs_few = verdict_from_pairs(metric, few_mean, tuned_mean, *paired_counts(few_shot, tuned), unit="points",
                                      alpha=alpha)
    few_vs_base = verdict_from_pairs(metric, base_mean, few_mean, *paired_counts(base, few_shot), unit="points",
                                     alpha=alpha)
    tuned_vs_base = verdict_from_pairs(metric, base_mean, tuned_mean, *paired_counts(base, tuned), unit="points",
                                       alpha=alpha)
    split = (f"{tuned_vs_few.wins} examples better, {tuned_vs_few.losses} worse than {name} "
             f"(sign test p={tuned_vs_few.p_value:.2g})")
    gap = f"{100 * (tuned_mean - few_mean):+.1f} points"
    if tuned_vs_few.label == IMPROVED:
        label = FINE_TUNING_WINS
        reason = (f"fine-tuning beat {name} prompting by {gap}: {metric} {_pct(few_mean)} with {shots} examples in "
                  f"the prompt ({_tokens(few_shot_tokens)}) -> {_pct(tuned_mean)} fine-tuned ({_tokens(tuned_tokens)}); "
                  f"{split}")
    elif few_vs_base.label == IMPROVED:
        label = PROMPTING_GETS_THERE
        ahead = " and is ahead of the fine-tune" if tuned_vs_few.label == WORSE else ""
        reason = (f"{name} prompting already gets there{ahead}: {metric} {_pct(few_mean)} with {shots} examples in the "
                  f"prompt ({_tokens(few_shot_tokens)}) vs {_pct(tuned_mean)} fine-tuned ({_tokens(tuned_tokens)}), "
                  f"{gap}; fine-tuned {split}; the base alone: {_pct(base_mean)}")
    else:
        label = NEITHER
        if tuned_vs_base.label == IMPROVED:
            reason = (f"neither is clearly ahead: fine-tuning beat the base ({_pct(base_mean)} -> {_pct(tuned_mean)} "
                      f"{metric}) but not clearly {name} prompting ({_pct(few_mean)}, {gap}; {split}), and {name} "
                      f"prompting did not clearly beat the base; more held-out examples would tell")
        else:
            reason = (f"neither fine-tuning nor {name} prompting clearly beat the base: {metric} base "
                      f"{_pct(base_mean)}, {name} {_pct(few_mean)}, fine-tuned {_pct(tuned_mean)}; fine-tuned {split}")
    return {"label": label, "metric": metric, "shots": shots, "base": base_mean, "few_shot": few_mean,
            "fine_tuned": tuned_mean, "wins": tuned_vs_few.wins, "losses": tuned_vs_few.losses,
            "p_value": tuned_vs_few.p_value, "few_shot_vs_base": few_vs_base.to_dict(),
            "fine_tuned_vs_base": tuned_vs_base.to_dict(), "few_shot_prompt_tokens": few_shot_tokens,
            "fine_tuned_prompt_tokens": tuned_tokens, "reason": reason}


# ---------------------------------------------------------------------------------------------- drift

# Levels of drift (docs/eval.md): the mean per-token KL divergence of the fine-tuned model from the base on the
# base's own answers (nats per token), and the share of answers kept (the same, or still holding the base's key
# fact). The level is the worse of the two.
DRIFT_KL_NOTICEABLE = 0.1  # nats per token: below it "low"
DRIFT_KL_HIGH = 0.5  # at or above it "high"
DRIFT_KEPT_NOTICEABLE = 0.8  # share of answers kept: at or above it "low"
DRIFT_KEPT_HIGH = 0.5  # below it "high"
LOW, NOTICEABLE, HIGH = "low", "noticeable", "high"

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*")
_TOKEN = re.compile(r"[-+]?\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’][^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")
# Words that never are the key fact: articles, pronouns, auxiliaries, fillers that open answers.
STOPWORDS = frozenset("""
a an the this that these those there here it its it's i you your we our they their he she his her them me my
is are was were be been being am do does did has have had will would can could should may might must shall
of in on at to for from by with as into onto about over under than then so and or but not no yes yeah sure
okay ok certainly of course absolutely well hello hi also just very really quite some any each every all
what which who whom whose when where why how answer answers question here's there's let's step steps first
""".split())


def _is_number(token: str) -> bool:
    return bool(_NUMBER.fullmatch(token))


def key_fact(answer: str, instruction: str = "") -> str | None:
    """The base answer's key fact: what a later answer must still say to count as keeping it.

    In order of the answer's text: the first number or capitalised word (a name: "Paris", "Au", "366") that is
    not a stopword and does not appear in the instruction; when there is none, the longest word of at least four
    letters of the answer's first sentence that is not a stopword and not in the instruction (the first on ties).
    None when the answer has no such word (then only an identical answer counts as kept).
    """
    asked = {token.casefold() for token in _TOKEN.findall(instruction)}

    def usable(token: str) -> bool:
        folded = token.casefold()
        return folded not in STOPWORDS and folded not in asked

    for token in _TOKEN.findall(answer):
        if (_is_number(token) or token[0].isupper()) and usable(token):
            return token
    first = _SENTENCE_END.split(answer.strip(), maxsplit=1)[0]
    words = [t for t in _TOKEN.findall(first) if not _is_number(t) and len(t) >= 4 and usable(t)]
    return max(words, key=len) if words else None


def contains_fact(answer: str, fact: str) -> bool:
    """Whether ``answer`` contains ``fact`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(fact)}(?![\w])", answer, re.IGNORECASE) is not None


def answer_kept(base_answer: str, tuned_answer: str, instruction: str = "") -> tuple[bool, bool, str | None]:
    """(same, kept, key fact): same = equal after case-folding and collapsing whitespace; kept = same, or the
    fine-tuned answer still contains the base answer's key fact."""
    same = normalize_text(base_answer) == normalize_text(tuned_answer)
    fact = key_fact(base_answer, instruction)
    return same, same or (fact is not None and contains_fact(tuned_answer, fact)), fact


def drift_level(mean_kl: float, kept_share: float) -> str:
    """low / noticeable / high: the worse of the KL level and the kept-answers level (thresholds above)."""
    by_kl = LOW if mean_kl < DRIFT_KL_NOTICEABLE else NOTICEABLE if mean_kl < DRIFT_KL_HIGH else HIGH
    by_kept = LOW if kept_share >= DRIFT_KEPT_NOTICEABLE else NOTICEABLE if kept_share >= DRIFT_KEPT_HIGH else HIGH
    order = (LOW, NOTICEABLE, HIGH)
    return order[max(order.index(by_kl), order.index(by_kept))]


def drift_thresholds() -> dict:
    return {"kl_noticeable": DRIFT_KL_NOTICEABLE, "kl_high": DRIFT_KL_HIGH,
            "kept_noticeable": DRIFT_KEPT_NOTICEABLE, "kept_high": DRIFT_KEPT_HIGH}


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
# after the per-field rows: whether answers stop where the model meant them to (an EOS problem shows here)
TAIL_ROWS = (("answers ended by the end token", ("stopped_share",), "pct", False),)
INFO_ROWS = (("prompt tokens per request", ("prompt_tokens_per_request",)),
             ("generation speed (tokens/s)", ("generation_tokens_per_s",)), ("evaluation time (s)", ("seconds",)))


@dataclass
class MetricRow:
    label: str
    values: list[Any]  # one per result column (None: not measured)
    kind: str  # "pct" (a share, shown in %), "num", or "info" (context, no change shown)
    lower_is_better: bool = False
    field_name: str | None = None  # a per-field row of the JSON match

    def change(self) -> float | None:
        """last column - first column of a metric (fine-tuned - base; None for context rows)."""
        if self.kind == "info" or len(self.values) < 2:
            return None
        before, after = self.values[0], self.values[-1]
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
    for label, path, kind, lower in TAIL_ROWS:
        values = [_get(result, path) for result in results]
        if any(v is not None for v in values):
            rows.append(MetricRow(label, values, kind, lower))
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
