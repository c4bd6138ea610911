"""Packing (bins, batch layout) and splits (dedup, seeded validation fraction) — no tokenizer needed."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from homebake.data.formats import Conversation
from homebake.data.pack import IGNORE_INDEX, collate, iter_batches, pack_rows, packing_efficiency, row_groups
from homebake.data.split import deduplicate, split_validation
from homebake.train.loss import shift_targets


@dataclass
class Ex:
    ids: list[int]
    mask: list[bool]


def random_examples(count, seed=0, low=3, high=120):
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = rng.randint(low, high)
        examples.append(Ex([rng.randint(1, 999) for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]))
    return examples


def test_pack_rows_places_every_example_once_within_the_limit():
    lengths = [len(e.ids) for e in random_examples(500)]
    rows = pack_rows(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    # Best-fit decreasing is near optimal: few rows beyond the lower bound.
    lower_bound = -(-sum(lengths) // 256)
    assert len(rows) <= lower_bound * 1.03 + 1
    assert pack_rows(lengths, 256) == rows  # deterministic


def test_pack_rows_exact_fit_and_oversize():
    assert pack_rows([3, 1, 2, 2], 4) == [[0, 1], [2, 3]]
    try:
        pack_rows([5], 4)
    except ValueError as error:
        assert "max_seq_len" in str(error)
    else:
        raise AssertionError("an example longer than a row must not be packed")


def test_row_order_depends_on_seed_and_epoch_only():
    examples = random_examples(200)
    a = row_groups(examples, max_seq_len=256, packing=True, seed=1, epoch=0)
    assert a == row_groups(examples, max_seq_len=256, packing=True, seed=1, epoch=0)
    assert a != row_groups(examples, max_seq_len=256, packing=True, seed=1, epoch=1)
    assert sorted(map(sorted, a)) == sorted(map(sorted, row_groups(examples, max_seq_len=256, packing=True, seed=2)))
    assert packing_efficiency(examples, a, 256) > 0.95


def test_collate_layout_positions_labels_and_padding():
    examples = [Ex([5, 6, 7], [True, False, True]), Ex([8, 9], [True, True]), Ex([1, 2, 3, 4], [False] * 4)]
    batch = collate(examples, [[0, 1], [2]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # First token of each example is never a label; untrained tokens and padding are -100.
    assert batch.labels.tolist() == [[-100, -100, 7, -100, 9], [-100] * 5]
    assert batch.num_trained_tokens == 2 and batch.num_real_tokens == 9
    # The training loop's shift never crosses an example boundary.
    targets = shift_targets(batch.labels, batch.position_ids)
    assert targets.tolist() == [[-100, 7, -100, 9, -100], [-100] * 5]


def test_padding_is_its_own_segment():
    batch = collate([Ex([1, 2], [True, True]), Ex([3, 4, 5, 6, 7], [True] * 5)], [[0], [1]], pad_token_id=99)
    assert batch.input_ids[0].tolist() == [1, 2, 99, 99, 99]
    assert batch.position_ids[0].tolist() == [0, 1, 0, 1, 2]


def test_iter_batches_covers_every_trained_token_once():
    examples = random_examples(300, seed=3)
    expected = sum(sum(e.mask[1:]) for e in examples)
    for packing in (True, False):
        batches = list(iter_batches(examples, batch_size=4, max_seq_len=256, pad_token_id=0, packing=packing))
        assert sum(b.num_trained_tokens for b in batches) == expected
        assert sum(b.num_real_tokens for b in batches) == sum(len(e.ids) for e in examples)
        assert all(b.input_ids.shape[1] <= 256 and b.input_ids.dtype == torch.long for b in batches)
        for b in batches:
            real = b.labels != IGNORE_INDEX
            assert torch.equal(b.labels[real], b.input_ids[real])


def conv(text, source):
    return Conversation([{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], source, "messages")


def test_deduplicate_keeps_the_first_and_names_it():
    items = [conv("a", "f:1"), conv("b", "f:2"), conv("a", "f:3"), conv("a", "f:4")]
    kept, removed = deduplicate(items)
    assert [c.source for c in kept] == ["f:1", "f:2"]
    assert [(s.source, s.kind, s.detail) for s in removed] == [("f:3", "duplicate", "same as f:1"),
                                                                ("f:4", "duplicate", "same as f:1")]
    kept, removed = deduplicate(items[:2], seen={items[1].key(): "val:7"})
    assert [c.source for c in kept] == ["f:1"] and removed[0].detail == "same as val:7"


def test_validation_fraction_is_seeded_and_disjoint():
    items = [conv(str(i), f"f:{i}") for i in range(100)]
    train, val = split_validation(items, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert {c.source for c in train}.isdisjoint(c.source for c in val)
    assert split_validation(items, 0.1, seed=0) == (train, val)
    assert split_validation(items, 0.1, seed=1)[1] != val
    assert len(split_validation(items[:3], 0.01, seed=0)[1]) == 1  # positive fraction holds out one
    assert split_validation(items[:1], 0.5, seed=0) == (items[:1], [])
    assert split_validation(items, 0.0, seed=0) == (items, [])
