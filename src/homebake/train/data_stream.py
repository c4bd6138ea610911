"""A resumable stream of training micro-batches over epochs.

The batch order of epoch ``e`` depends only on the examples, the data seed and ``e`` (see
``homebake.data.pack.row_groups``), so the stream's whole state is ``(epoch, index)``: a resumed run
rebuilds the same rows and continues at the same micro-batch.

Preference pairs (``data.encode.EncodedPair``) are batched whole (``data.pack.pair_row_groups`` /
``collate_pairs``): chosen and rejected of a pair share a row and a forward pass.

Several ranks (``train.distributed``): the stream cuts *global* micro-batches of ``batch_size x world_size``
rows, exactly as one process with that batch size would, and each rank collates its share, rows
``rank, rank + world_size, ...`` (disjoint, deterministic). The position stays ``(epoch, index)``, the same on
every rank, so resume is exact. A rank whose share is empty (an epoch's short last micro-batch) gets a
*filler*: one row of the micro-batch that the step runner weights 0, so every rank runs every collective.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..data.pack import PackedBatch, collate, collate_pairs, pair_row_groups, row_groups


def share(rows: Sequence, rank: int, world_size: int) -> list:
    """This rank's disjoint share of a global micro-batch's rows."""
    return list(rows[rank::world_size])


def is_filler(batch) -> bool:
    """A rank's stand-in for an empty share: its loss and its counts are weighted 0."""
    return getattr(batch, "filler", False)


def _collate_share(collate, examples, rows, pad_token_id: int, rank: int, world_size: int):
    mine = share(rows, rank, world_size)
    if mine:
        return collate(examples, mine, pad_token_id)
    batch = collate(examples, rows[:1], pad_token_id)
    batch.filler = True
    return batch


def _batching(examples: Sequence):
    """(row grouping, collate) for these examples: pairs are kept whole."""
    if examples and hasattr(examples[0], "rejected"):
        return pair_row_groups, collate_pairs
    return row_groups, collate


def example_tokens(example) -> int:
    """Tokens an example takes in a row (a preference pair: both sides, packed together)."""
    if hasattr(example, "rejected"):
        return len(example.chosen.ids) + len(example.rejected.ids)
    return len(example.ids)


def widest_row(examples: Sequence, rows: Sequence[Sequence[int]] | None = None, max_seq_len: int | None = None, *,
               packing: bool = False) -> int:
    """Tokens in the widest row any micro-batch collates to (each is padded to its widest row), what the memory
    plan sizes activations by; ``rows`` (example indices) default to the grouping for ``packing``. The rows
    depend on the lengths only, not on the batch size or the epoch."""
    if rows is None:
        rows = _batching(examples)[0](examples, max_seq_len=max_seq_len, packing=packing, seed=0, epoch=0)
    widest = max(sum(example_tokens(examples[i]) for i in row) for row in rows)
    return min(widest, max_seq_len) if max_seq_len else widest


class BatchStream:
    def __init__(self, examples: Sequence, *, batch_size: int, max_seq_len: int, pad_token_id: int,
                 packing: bool, seed: int, epoch: int = 0, index: int = 0, rank: int = 0, world_size: int = 1):
        self.examples = examples
        self.batch_size = batch_size  # rows per rank
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size  # rows per micro-batch over all ranks
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
        return math.ceil(len(self._rows_for(self.epoch)) / self.global_batch)

    @property
    def widest_row(self) -> int:
        return widest_row(self.examples, self._rows_for(self.epoch), self.max_seq_len)

    @property
    def consumed(self) -> int:
        """Micro-batches taken since the start of training."""
        return self.epoch * self.batches_per_epoch + self.index

    def next(self) -> PackedBatch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._rows_for(self.epoch)
        start = self.index * self.global_batch
        self.index += 1
        rows = rows[start:start + self.global_batch]
        if self.world_size == 1:
            return self._collate(self.examples, rows, self.pad_token_id)
        return _collate_share(self._collate, self.examples, rows, self.pad_token_id, self.rank, self.world_size)


def evaluation_batches(examples: Sequence, *, batch_size: int, max_seq_len: int, pad_token_id: int,
                       packing: bool, limit: int | None = None, rank: int = 0,
                       world_size: int = 1) -> list[PackedBatch]:
    """The validation set as batches in a fixed order (built once, reused at every evaluation); with several
    ranks, this rank's share of each batch of ``batch_size x world_size`` rows (``limit`` counts those)."""
    group, join = _batching(examples)
    rows = group(examples, max_seq_len=max_seq_len, packing=packing, seed=0, epoch=0)
    step = batch_size * world_size
    starts = range(0, len(rows), step)[:limit] if limit else range(0, len(rows), step)
    if world_size == 1:
        return [join(examples, rows[i:i + step], pad_token_id) for i in starts]
    return [_collate_share(join, examples, rows[i:i + step], pad_token_id, rank, world_size) for i in starts]
