"""Task metrics and the verdict on hand-made cases."""

import math

import pytest

from homebake.metrics import (IMPROVED, NO_CHANGE, WORSE, aggregate, exact_match, field_matches, loss_verdict,
                              normalized_match, parse_json, score_example, sign_test_p, task_verdict)

REF = '{"name": "Maria Lopez", "item": "blue mug", "qty": 3, "date": "03-04"}'


@pytest.mark.parametrize("prediction,expected", [
    (REF, True),
    ("  " + REF + "\n", True),  # surrounding whitespace is not part of the answer
    (REF.replace(": ", ":"), False),  # different spacing inside is not exact
    (REF.replace("Maria", "maria"), False),
    ("", False),
])
def test_exact_match(prediction, expected):
    assert exact_match(prediction, REF) is expected


@pytest.mark.parametrize("prediction,expected", [
    (REF, True),
    ('{"qty": 3.0, "date": "03-04", "item": "Blue  Mug", "name": "maria lopez"}', True),  # order/case/space/3.0
    ("```json\n" + REF + "\n```", True),  # fenced JSON
    ('{"name": "Maria Lopez", "item": "blue mug", "qty": "3", "date": "03-04"}', False),  # "3" is not 3
    ('{"name": "Maria Lopez", "item": "blue mug", "qty": 3}', False),  # a key missing
    ('{"name": "Maria Lopez", "item": "blue mug", "qty": 3, "date": "03-04", "x": 1}', False),  # an extra key
    ("Sure! Here is the JSON: " + REF, False),  # chatter around the JSON is not the answer
])
def test_normalized_match_json(prediction, expected):
    assert normalized_match(prediction, REF) is expected


def test_normalized_match_text():
    assert normalized_match("  The  Capital is PARIS ", "the capital is paris")
    assert not normalized_match("Paris.", "Paris")  # punctuation still counts
    assert not exact_match("paris", "Paris")


def test_parse_json():
    assert parse_json(REF)["qty"] == 3
    assert parse_json("```\n[1, 2]\n```") == [1, 2]
    assert parse_json("not json") is None
    assert parse_json('{"a": 1') is None
    assert parse_json("[" * 5000) is None  # deep nesting is "not JSON", never an exception


def test_field_matches():
    pred = '{"name": "MARIA LOPEZ", "item": "red mug", "qty": 3}'
    assert field_matches(pred, REF) == {"name": True, "item": False, "qty": True, "date": False}
    assert field_matches("I cannot do that", REF) == {"name": False, "item": False, "qty": False, "date": False}
    assert field_matches("[1, 2]", REF) == dict.fromkeys(["name", "item", "qty", "date"], False)
    assert field_matches("anything", "plain text reference") is None
    assert field_matches("[1]", "[1]") is None  # per-field applies to objects only


def test_aggregate_counts_fields_and_json_validity():
    scores = [
        score_example(REF, REF),
        score_example('{"name": "Maria Lopez", "item": "blue mug", "qty": 4, "date": "03-04"}', REF),
        score_example("no idea", REF),
        score_example("{broken", REF),
    ]
    result = aggregate(scores)
    assert result.count == 4
    assert result.exact_match == 0.25
    assert result.normalized_match == 0.25
    assert result.valid_json == 0.5
    assert result.per_field == {"name": 0.5, "item": 0.5, "qty": 0.25, "date": 0.5}
    assert result.field_accuracy == pytest.approx(7 / 16)


def test_aggregate_text_only_has_no_json_metrics():
    result = aggregate([score_example("a", "a"), score_example("b", "c")])
    assert result.exact_match == 0.5
    assert result.valid_json is None and result.field_accuracy is None and result.per_field == {}


def test_sign_test_matches_binomial_by_hand():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert sign_test_p(0, 6) == sign_test_p(6, 0)
    # 8 vs 2: P(X <= 2) for Binomial(10, 1/2), doubled
    assert sign_test_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert math.isclose(sign_test_p(40, 0), 2 * 0.5 ** 40)


def test_task_verdict_improved_worse_and_no_change():
    before = [False] * 50
    after = [True] * 43 + [False] * 7
    verdict = task_verdict(before, after)
    assert verdict.label == IMPROVED
    assert (verdict.wins, verdict.losses) == (43, 0)
    assert verdict.before == 0.0 and verdict.after == pytest.approx(0.86)
    assert "+86.0 points" in verdict.reason and "0.0% -> 86.0%" in verdict.reason

    assert task_verdict(after, before).label == WORSE
    # 3 fixed, 1 broken on a small set is within chance
    small_before = [False, False, False, True, True]
    small_after = [True, True, True, False, True]
    assert task_verdict(small_before, small_after).label == NO_CHANGE
    assert task_verdict([True] * 10, [True] * 10).label == NO_CHANGE
    with pytest.raises(ValueError):
        task_verdict([True], [True, False])


def test_loss_verdict_uses_per_example_pairs_and_tolerance():
    before = [2.0] * 12
    after = [1.0] * 12
    verdict = loss_verdict(before, after, before_loss=2.0, after_loss=1.0)
    assert verdict.label == IMPROVED and verdict.metric == "validation loss"
    assert "2.000 -> 1.000" in verdict.reason
    tiny = loss_verdict(before, [1.995] * 12, before_loss=2.0, after_loss=1.995)
    assert tiny.label == NO_CHANGE and tiny.wins == 0
    assert loss_verdict(after, before, before_loss=1.0, after_loss=2.0).label == WORSE


# ---------------------------------------------------------------------------------------------- prompting verdict

from homebake.metrics import (FINE_TUNING_WINS, HIGH, LOW, NEITHER, NOTICEABLE, PROMPTING_GETS_THERE,  # noqa: E402
                              answer_kept, contains_fact, drift_level, key_fact, metric_rows, prompting_verdict)


def _flags(ones: int, n: int = 20) -> list[float]:
    return [1.0] * ones + [0.0] * (n - ones)


def _verdict(base, few, tuned, **kw):
    n = len(base)
    means = (sum(base) / n, sum(few) / n, sum(tuned) / n)
    return prompting_verdict("exact match", base, few, tuned, means=means, shots=5, few_shot_tokens=612.4,
                             tuned_tokens=97.0, **kw)


def test_prompting_verdict_fine_tuning_wins():
    verdict = _verdict(_flags(0), _flags(4), _flags(18))  # 14 examples fine-tuned-only right, none the other way
    assert verdict["label"] == FINE_TUNING_WINS
    assert verdict["reason"] == ("fine-tuning beat 5-shot prompting by +70.0 points: exact match 20.0% with 5 "
                                 "examples in the prompt (612 prompt tokens per request) -> 90.0% fine-tuned "
                                 "(97 prompt tokens per request); 14 examples better, 0 worse than 5-shot "
                                 "(sign test p=0.00012)")
    assert (verdict["wins"], verdict["losses"]) == (14, 0) and verdict["few_shot"] == 0.2


def test_prompting_verdict_prompting_already_gets_there():
    verdict = _verdict(_flags(0), _flags(17), _flags(18))
    assert verdict["label"] == PROMPTING_GETS_THERE
    assert verdict["reason"].startswith("5-shot prompting already gets there: exact match 85.0% with 5 examples in "
                                        "the prompt (612 prompt tokens per request) vs 90.0% fine-tuned")
    assert "1 examples better, 0 worse than 5-shot (sign test p=1)" in verdict["reason"]
    assert verdict["reason"].endswith("the base alone: 0.0%")
    ahead = _verdict(_flags(0), _flags(18), _flags(8))  # prompting even beats the fine-tune
    assert ahead["label"] == PROMPTING_GETS_THERE and "and is ahead of the fine-tune" in ahead["reason"]


def test_prompting_verdict_neither():
    nothing = _verdict(_flags(1), _flags(2), _flags(2))
    assert nothing["label"] == NEITHER
    assert nothing["reason"].startswith("neither fine-tuning nor 5-shot prompting clearly beat the base: exact match "
                                        "base 5.0%, 5-shot 10.0%, fine-tuned 10.0%")
    # fine-tuning beats the base, prompting half-way: neither clearly ahead of the other on 20 examples
    between = _verdict(_flags(0), _flags(4), _flags(8))
    assert between["label"] == NEITHER
    assert "fine-tuning beat the base (0.0% -> 40.0% exact match) but not clearly 5-shot prompting" in between["reason"]
    assert "more held-out examples would tell" in between["reason"]


# ---------------------------------------------------------------------------------------------- drift


@pytest.mark.parametrize("answer,instruction,fact", [
    ("The capital of France is Paris.", "What is the capital of France?", "Paris"),
    ("A leap year has 366 days.", "How many days are there in a leap year?", "366"),
    ("12 x 12 = 144", "What is 12 multiplied by 12?", "144"),  # numbers from the question do not count
    ("There are seven continents on Earth.", "How many continents are there on Earth?", "seven"),
    ("Jupiter is the largest planet.", "Which planet is the largest?", "Jupiter"),
    ("Yes.", "Answer with only yes or no: is the sun a star?", None),  # nothing but the question's own words
    ("", "anything", None),
])
def test_key_fact(answer, instruction, fact):
    assert key_fact(answer, instruction) == fact


def test_answer_kept_same_or_with_the_key_fact():
    question = "What is the capital of France?"
    assert answer_kept("Paris is the capital.", "  paris IS the capital. ", question) == (True, True, "Paris")
    assert answer_kept("The capital of France is Paris.", "It's Paris, of course!", question) == \
        (False, True, "Paris")
    assert answer_kept("The capital of France is Paris.", '{"name": "Paris"}', question)[1]
    assert answer_kept("The capital of France is Paris.", "Lyon.", question) == (False, False, "Paris")
    assert not answer_kept("Yes.", "No.", "yes or no?")[1]  # no key fact: only the same answer counts
    assert contains_fact("about 100 degrees", "100") and not contains_fact("1000 degrees", "100")


@pytest.mark.parametrize("kl,kept,level", [
    (0.0, 1.0, LOW), (0.099, 0.8, LOW),
    (0.1, 1.0, NOTICEABLE), (0.01, 0.79, NOTICEABLE), (0.49, 0.5, NOTICEABLE),
    (0.5, 1.0, HIGH), (0.01, 0.49, HIGH), (2.0, 0.1, HIGH),
])
def test_drift_level_thresholds(kl, kept, level):
    assert drift_level(kl, kept) == level


def test_metric_rows_with_three_systems_change_against_the_base():
    base = {"loss": 1.0, "task": {"exact_match": 0.0, "per_field": {"a": 0.1}}, "prompt_tokens_per_request": 90.0,
            "stopped_share": 0.5}
    few = {"loss": 0.8, "task": {"exact_match": 0.3, "per_field": {"a": 0.5}}, "prompt_tokens_per_request": 600.0,
           "stopped_share": 1.0}
    tuned = {"loss": 0.1, "task": {"exact_match": 0.9, "per_field": {"a": 1.0}}, "prompt_tokens_per_request": 90.0,
             "stopped_share": 1.0}
    rows = {row.label: row for row in metric_rows([base, few, tuned])}
    assert rows["exact match"].values == [0.0, 0.3, 0.9] and rows["exact match"].change() == pytest.approx(0.9)
    assert rows["validation loss (per trained token)"].improved() is True
    assert rows["prompt tokens per request"].values == [90.0, 600.0, 90.0]
    assert rows["prompt tokens per request"].change() is None  # context, not a metric
    labels = list(rows)
    assert labels.index("field a") < labels.index("answers ended by the end token") < \
        labels.index("prompt tokens per request")
