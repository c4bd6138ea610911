"""The whole data path for one `DataConfig`: read, normalise, deduplicate, split, encode — with counts.

``prepare_dataset(config, tokenizer)`` is what training calls; ``homebake data check`` prints the same
result in detail. Bad examples are skipped with a per-reason count (every one is listed in
``skipped``), or raised at the first one when ``config.strict``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import DataConfig
from .encode import Encoded, Encoder
from .formats import Conversation, RecordError, SkipLog, Skipped, load_conversations
from .split import deduplicate, split_validation


@dataclass
class PreparedDataset:
    train: list[Encoded]
    validation: list[Encoded]
    formats: dict[str, str] = field(default_factory=dict)  # file (or hub id) -> format
    records: int = 0  # examples read, before anything was skipped
    skipped: list[Skipped] = field(default_factory=list)  # bad input and unencodable examples, in order
    duplicates: list[Skipped] = field(default_factory=list)
    validation_source: str = "none"  # "file", "fraction" or "none"

    @property
    def examples(self) -> list[Encoded]:
        return self.train + self.validation

    def skip_counts(self) -> Counter:
        return Counter(item.kind for item in self.skipped)

    def summary(self) -> str:
        """One line for the training log (``homebake data check`` lists every skipped line)."""
        examples = self.examples
        tokens = sum(len(e.ids) for e in examples)
        trained = sum(e.num_trained for e in examples)
        parts = [f"{len(self.train):,} training and {len(self.validation):,} validation examples",
                 f"{tokens:,} tokens ({trained / max(1, tokens):.0%} trained)"]
        if self.skipped:
            reasons = ", ".join(f"{kind} {count:,}" for kind, count in self.skip_counts().most_common())
            first = "; ".join(str(item) for item in self.skipped[:3])
            more = f" and {len(self.skipped) - 3:,} more" if len(self.skipped) > 3 else ""
            parts.append(f"skipped {len(self.skipped):,} ({reasons}: {first}{more})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates):,} duplicates removed")
        truncated = sum(1 for e in examples if e.truncated_tokens)
        if truncated:
            parts.append(f"{truncated:,} truncated")
        return "; ".join(parts)


def prepare_dataset(config: DataConfig, tokenizer, *, context: int | None = None) -> PreparedDataset:
    """Read ``config.paths`` (and ``config.validation``), then encode with ``tokenizer``; with ``max_seq_len``
    unset, examples up to ``config.encoding_limit(context)`` tokens are kept."""
    config.validate()
    log = SkipLog(strict=config.strict)
    options = dict(fmt=config.format, fields=config.fields, roles=config.roles, hub_split=config.hub_split, log=log)
    train = load_conversations(config.paths, **options)
    result = PreparedDataset([], [], formats=dict(train.formats), records=train.records)
    conversations, validation = train.conversations, []
    if config.validation:
        held = load_conversations([config.validation], **options)
        result.formats.update(held.formats)
        result.records += held.records
        validation, result.validation_source = held.conversations, "file"
    if config.dedup:
        validation, removed = deduplicate(validation)
        result.duplicates += removed
        conversations, removed = deduplicate(conversations, seen={c.key(): c.source for c in validation})
        result.duplicates += removed
    if not config.validation and config.validation_fraction > 0:
        conversations, validation = split_validation(conversations, config.validation_fraction, config.seed)
        result.validation_source = "fraction" if validation else "none"
    encoder = Encoder(tokenizer, train_on=config.train_on, max_seq_len=config.encoding_limit(context),
                      truncation=config.truncation)
    result.train = _encode_all(encoder, conversations, log)
    result.validation = _encode_all(encoder, validation, log)
    result.skipped = log.items
    return result


def _encode_all(encoder: Encoder, conversations: list[Conversation], log: SkipLog) -> list[Encoded]:
    encoded = []
    for conversation in conversations:
        try:
            encoded.append(encoder(conversation))
        except RecordError as error:
            log.add(error)
    return encoded
