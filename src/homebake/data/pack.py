"""Packing encoded examples into rows, and the batch format the training loop consumes.

`PackedBatch` (all tensors (B, T), torch.long):

- ``input_ids``: token ids; padding uses the tokenizer's pad id (never EOS).
- ``position_ids``: restart at 0 at the start of every example in a row. The decoder treats each restart
  as a new segment (block-diagonal causal attention), so packed examples never see each other.
  Padding at the end of a row is its own segment (positions 0, 1, ...), so real tokens never attend to it.
- ``labels``: aligned with ``input_ids`` (HF convention): the token id where that token is learned, -100
  elsewhere (prompts, padding, and the first token of every example, which nothing predicts). Shift
  with ``homebake.train.loss.shift_targets(labels, position_ids)`` to get next-token targets; the
  shift never crosses an example boundary because every example's first label is -100.
- ``num_trained_tokens``: ``(labels != -100).sum()`` — the loss normaliser.
- ``num_real_tokens``: non-padding tokens (for tokens/s).

Packing is best-fit-decreasing into ``max_seq_len`` bins (deterministic); the row order is shuffled by
``seed`` and ``epoch``. Without packing every example is its own row, padded to the longest in the batch.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

IGNORE_INDEX = -100


class EncodedLike(Protocol):
    ids: list[int]
    mask: list[bool]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    num_trained_tokens: int
    num_real_tokens: int

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                           self.num_trained_tokens, self.num_real_tokens)


def pack_rows(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_seq_len`` tokens (best-fit decreasing).

    Each example goes into the fullest row that still has room, longest examples first; ties break by
    index, so the result depends only on the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows that are not full
    for index in order:
        length = lengths[index]
        if length > max_seq_len:
            raise ValueError(f"example {index} has {length} tokens > max_seq_len {max_seq_len}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    return rows


def row_groups(examples: Sequence[EncodedLike], *, max_seq_len: int, packing: bool, seed: int = 0,
               epoch: int = 0) -> list[list[int]]:
    """Rows (lists of example indices) in the order they are trained for this epoch."""
    if packing:
        rows = pack_rows([len(e.ids) for e in examples], max_seq_len)
    else:
        rows = [[i] for i in range(len(examples))]
    random.Random(f"{seed}:{epoch}").shuffle(rows)
    return rows


def collate(examples: Sequence[EncodedLike], rows: Sequence[Sequence[int]], pad_token_id: int) -> PackedBatch:
    """Build one batch from rows of example indices, padded to the longest row."""
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids = torch.tensor(examples[i].ids, dtype=torch.long)
            mask = torch.tensor(examples[i].mask, dtype=torch.bool)
            mask[0] = False  # nothing predicts an example's first token
            end = start + len(ids)
            input_ids[r, start:end] = ids
            labels[r, start:end] = torch.where(mask, ids, IGNORE_INDEX)
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        real += start
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own segment
    return PackedBatch(input_ids, position_ids, labels, int((labels != IGNORE_INDEX).sum()), real)


def iter_batches(examples: Sequence[EncodedLike], *, batch_size: int, max_seq_len: int, pad_token_id: int,
                 packing: bool = True, seed: int = 0, epoch: int = 0) -> Iterator[PackedBatch]:
    """Batches of ``batch_size`` rows (the last may be smaller) for one epoch."""
    rows = row_groups(examples, max_seq_len=max_seq_len, packing=packing, seed=seed, epoch=epoch)
    for start in range(0, len(rows), batch_size):
        yield collate(examples, rows[start:start + batch_size], pad_token_id)


def packing_efficiency(examples: Sequence[EncodedLike], rows: Sequence[Sequence[int]], max_seq_len: int) -> float:
    """Fraction of the ``rows × max_seq_len`` slots holding real tokens."""
    used = sum(len(examples[i].ids) for row in rows for i in row)
    return used / max(1, len(rows) * max_seq_len)


# --------------------------------------------------------------------------------------------------
# Preference pairs: chosen and rejected of one pair always share a row (two segments, isolated like any
# packed examples), so they go through the model in the same forward pass.


@dataclass
class PairBatch(PackedBatch):
    """A `PackedBatch` of preference pairs. ``sequence_ids`` (B, T) long: for every token the batch-local
    sequence it belongs to -- ``2 j`` the chosen and ``2 j + 1`` the rejected sequence of the batch's pair
    ``j`` -- and -1 at padding. ``num_pairs`` is the loss normaliser of the preference objectives."""

    sequence_ids: torch.Tensor = None
    num_pairs: int = 0

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                         self.num_trained_tokens, self.num_real_tokens, self.sequence_ids.to(device), self.num_pairs)


class PairLike(Protocol):
    chosen: EncodedLike
    rejected: EncodedLike


def pair_row_groups(pairs: Sequence[PairLike], *, max_seq_len: int, packing: bool, seed: int = 0,
                    epoch: int = 0) -> list[list[int]]:
    """Rows (lists of pair indices) for this epoch: whole pairs packed best-fit decreasing into
    ``max_seq_len``-token rows; a pair longer than that (each side is at most ``max_seq_len``) gets a row of
    its own. Without packing every pair is its own row."""
    if packing:
        lengths = [min(max_seq_len, len(p.chosen.ids) + len(p.rejected.ids)) for p in pairs]
        rows = pack_rows(lengths, max_seq_len)
    else:
        rows = [[i] for i in range(len(pairs))]
    random.Random(f"{seed}:{epoch}").shuffle(rows)
    return rows


def collate_pairs(pairs: Sequence[PairLike], rows: Sequence[Sequence[int]], pad_token_id: int) -> PairBatch:
    """One batch from rows of pair indices: each pair's chosen then rejected sequence, as packed segments."""
    flat, flat_rows, owner = [], [], []
    for row in rows:
        flat_row = []
        for index in row:
            flat_row += [len(flat), len(flat) + 1]
            flat += [pairs[index].chosen, pairs[index].rejected]
        flat_rows.append(flat_row)
    batch = collate(flat, flat_rows, pad_token_id)
    sequence_ids = torch.full_like(batch.input_ids, -1)
    for r, row in enumerate(flat_rows):
        start = 0
        for i in row:  # flat example i is sequence i of the batch (pairs numbered in row order)
            owner.append(i)
            end = start + len(flat[i].ids)
            sequence_ids[r, start:end] = len(owner) - 1
            start = end
    # sequence numbers follow the rows, which list each pair's chosen side right before its rejected side
    return PairBatch(batch.input_ids, batch.position_ids, batch.labels, batch.num_trained_tokens,
                     batch.num_real_tokens, sequence_ids, len(owner) // 2)
