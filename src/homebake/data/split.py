"""Exact-duplicate removal and the seeded validation split (done on conversations, before encoding)."""

from __future__ import annotations

import random
from typing import Sequence

from .formats import Conversation, Skipped


def deduplicate(conversations: Sequence[Conversation],
                seen: dict[str, str] | None = None) -> tuple[list[Conversation], list[Skipped]]:
    """Keep the first of each set of exact duplicates; report the others with the source they repeat.

    ``seen`` (key -> source) pre-loads examples that already exist elsewhere, e.g. the validation set, so
    that training never contains an example it is evaluated on.
    """
    seen = dict(seen or {})
    kept, removed = [], []
    for conversation in conversations:
        key = conversation.key()
        if key in seen:
            removed.append(Skipped(conversation.source, "duplicate", f"same as {seen[key]}"))
        else:
            seen[key] = conversation.source
            kept.append(conversation)
    return kept, removed


def split_validation(conversations: Sequence[Conversation], fraction: float,
                     seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out ``fraction`` of the examples, chosen by ``seed``; both parts keep the file order.

    A positive fraction holds out at least one example when there are two or more, and always leaves
    at least one for training.
    """
    count = len(conversations)
    if fraction <= 0 or count < 2:
        return list(conversations), []
    held = min(count - 1, max(1, round(fraction * count)))
    chosen = set(random.Random(seed).sample(range(count), held))
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    validation = [c for i, c in enumerate(conversations) if i in chosen]
    return train, validation
