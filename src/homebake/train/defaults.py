"""Defaults chosen from the data: the row length and the number of epochs, when the user left them unset.

A 2048-token row for 60-token examples packs 30 of them into one row, so a few hundred examples make a handful
of optimizer steps (undertrained) and every step is large (memory). With both unset, the row is as long as the
longest example needs and a small dataset is seen often enough to learn from. The resolved values are written
into the run's config.yaml (so ``--resume`` uses them) and the header says what was chosen and why.
"""

from __future__ import annotations

import math
from typing import Sequence

from .data_stream import example_tokens

# Epochs, when unset: enough passes for at least MIN_AUTO_STEPS optimizer steps, at most MAX_AUTO_EPOCHS.
MIN_AUTO_STEPS = 60
MAX_AUTO_EPOCHS = 5


def resolve_max_seq_len(config, examples: Sequence, context: int) -> str | None:
    """Set ``config.data.max_seq_len`` from the longest example when unset; returns the header's reason."""
    data = config.data
    if data.max_seq_len is not None:
        return None
    longest = max(example_tokens(e) for e in examples)
    limit = data.encoding_limit(context)
    data.max_seq_len = data.row_length(longest, context)
    return (f"max_seq_len {data.max_seq_len} (unset: the longest example has {longest} tokens; "
            f"rounded up, at most {limit})")


def resolve_epochs(config, batches_per_epoch: int) -> str | None:
    """Set ``config.epochs`` when unset: 1, or more until MIN_AUTO_STEPS optimizer steps (at most
    MAX_AUTO_EPOCHS); returns the header's reason."""
    if config.epochs is not None:
        return None
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    config.epochs = float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_AUTO_STEPS / steps_per_epoch))))
    if config.max_steps is not None:
        return None  # --max-steps decides the length; epochs only fills config.yaml
    return (f"epochs {config.epochs:g} (unset: {steps_per_epoch} optimizer steps per epoch; at least "
            f"{MIN_AUTO_STEPS} steps, at most {MAX_AUTO_EPOCHS} epochs)")
