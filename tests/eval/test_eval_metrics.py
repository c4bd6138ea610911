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
