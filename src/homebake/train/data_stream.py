"""A resumable stream of training micro-batches over epochs.

The batch order of epoch ``e`` depends only on the examples, the data seed and ``e`` (see
``homebake.data.pack.row_groups``), so the stream's whole state is ``(epoch, index)``: a resumed run
rebuilds the same rows and continues at the same micro-batch.

Preference pairs (``data.encode.EncodedPair``) are batched whole (``data.pack.pair_row_groups`` /
``collate_pairs``): chosen and rejected of a pair share a row and a forward pass.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..data.pack import PackedBatch, collate, collate_pairs, pair_row_groups, row_groups


def _batching(examples: Sequence):
    """(row grouping, collate) for these examples: pairs are kept whole."""
    if examples and hasattr(examples[0], "rejected"):
        return pair_row_groups, collate_pairs
    return row_groups, collate


class BatchStream:
    def __init__(self, examples: Sequence, *, batch_size: int, max_seq_len: int, pad_token_id: int,
                 packing: bool, seed: int, epoch: int = 0, index: int = 0):
        self.examples = examples
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self._rows: list[list[int]] | None = None
        self._rows_epoch = -1
        self._row_groups, self._collate = _batching(examples)

    def _rows_for(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            self._rows = self._row_groups(self.examples, max_seq_len=self.max_seq_len, packing=self.packing,
                                    seed=self.seed, epoch=epoch)
            self._rows_epoch = epoch
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        # Packing depends only on the lengths, so every epoch has the same number of rows.
        return math.ceil(len(self._rows_for(self.epoch)) / self.batch_size)

    @property
    def consumed(self) -> int:
        """Micro-batches taken since the start of training."""
        return self.epoch * self.batches_per_epoch + self.index

    def next(self) -> PackedBatch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._rows_for(self.epoch)
        start = self.index * self.batch_size
        self.index += 1
        return self._collate(self.examples, rows[start:start + self.batch_size], self.pad_token_id)


def evaluation_batches(examples: Sequence, *, batch_size: int, max_seq_len: int, pad_token_id: int,
                       packing: bool, limit: int | None = None) -> list[PackedBatch]:
    """The validation set as batches in a fixed order (built once, reused at every evaluation)."""
    group, join = _batching(examples)
    rows = group(examples, max_seq_len=max_seq_len, packing=packing, seed=0, epoch=0)
    batches = [join(examples, rows[i:i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
    return batches[:limit] if limit else batches
