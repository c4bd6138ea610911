"""`DataConfig`: every setting of the data pipeline, with help text (embedded in the training config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "completion", "text", "preference")
TRAIN_ON = ("all_assistant", "last_turn", "everything")
TRUNCATION = ("drop", "truncate")
# With max_seq_len unset, examples are encoded up to this (or the model's context, if shorter) and the row length
# becomes the longest example rounded up to a multiple of SEQ_LEN_MULTIPLE: short data is not padded or packed into
# 2048-token rows.
AUTO_MAX_SEQ_LEN = 4096
SEQ_LEN_MULTIPLE = 64


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list, metadata={"help": (
        "training data: JSONL, JSON, CSV or Parquet files, folders of them, or a hub dataset id "
        "(`owner/name` or `hf:owner/name`, needs the `data` extra)")})
    validation: str | None = field(default=None, metadata={"help": (
        "validation data (same kinds as `paths`); when unset, `validation_fraction` of the training "
        "examples is held out instead")})
    validation_fraction: float = field(default=0.05, metadata={"help": (
        "fraction of training examples held out for validation when no `validation` file is given "
        "(0 disables; at least one example is held out when the fraction is positive and there are 2+)")})
    seed: int = field(default=0, metadata={"help": "seed for the validation split and the packing/batch order"})
    format: str = field(default="auto", metadata={"help": (
        "example format: auto (detected per file), messages (OpenAI), sharegpt, alpaca, completion "
        "(prompt/completion), text (continued pre-training: every token trained) or preference (pairs: "
        "prompt/chosen/rejected, for --objective dpo/orpo)")})
    fields: dict[str, str] = field(default_factory=dict, metadata={"help": (
        "rename map from homebake's field names to yours, e.g. {messages: dialog, role: speaker, "
        "content: text} or {instruction: question, output: answer}; names: messages, conversations, role, "
        "content, from, value, tools, system, instruction, input, output, prompt, completion, text, chosen, rejected")})
    roles: dict[str, str] = field(default_factory=dict, metadata={"help": (
        "extra role names mapped to system/user/assistant/tool, e.g. {bot: assistant, customer: user}")})
    hub_split: str = field(default="train", metadata={"help": "split to read from a hub dataset"})
    train_on: str = field(default="all_assistant", metadata={"help": (
        "which tokens are learned: all_assistant (every assistant turn and its end-of-turn token), "
        "last_turn (only the final assistant turn) or everything (prompts too)")})
    max_seq_len: int | None = field(default=None, metadata={"help": (
        "longest example in tokens (and the packing bin size); default: the longest example rounded up to a "
        f"multiple of {SEQ_LEN_MULTIPLE}, at most the model's context and {AUTO_MAX_SEQ_LEN}")})
    truncation: str = field(default="drop", metadata={"help": (
        "what happens to longer examples: drop (skip and count them) or truncate (cut the end; "
        "counted, and skipped if no trained token is left)")})
    packing: bool = field(default=True, metadata={"help": (
        "pack several examples into each max_seq_len row; examples never attend to each other")})
    dedup: bool = field(default=True, metadata={"help": (
        "remove exact duplicate examples (and training examples that also appear in validation), counted")})
    strict: bool = field(default=False, metadata={"help": (
        "fail on the first bad example instead of skipping it with a per-reason count")})

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, message: str, fix: str) -> ConfigError:
            return ConfigError(message, where=f"data.{name}", fix=fix)

        for name, allowed in (("format", FORMATS), ("train_on", TRAIN_ON), ("truncation", TRUNCATION)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"unknown value {getattr(self, name)!r}", f"use one of {', '.join(allowed)}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise bad("max_seq_len", f"must be an integer >= 2, got {self.max_seq_len!r}", "e.g. 2048")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise bad("validation_fraction", f"must be in [0, 1), got {self.validation_fraction!r}",
                      "e.g. 0.05, or 0 for no validation split")
        for name in ("fields", "roles"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise bad(name, "must be a mapping of names to names", "e.g. {messages: dialog}")
        from .formats import CANONICAL_FIELDS, ROLES  # local: formats imports this module's constants

        unknown = sorted(set(self.fields) - set(CANONICAL_FIELDS))
        if unknown:
            raise bad("fields", f"unknown field name(s) {', '.join(unknown)}",
                      f"map these names: {', '.join(CANONICAL_FIELDS)}")
        wrong = sorted(v for v in self.roles.values() if v not in ROLES)
        if wrong:
            raise bad("roles", f"unknown target role(s) {', '.join(wrong)}", f"map to one of {', '.join(ROLES)}")

    def encoding_limit(self, context: int | None = None) -> int:
        """The longest example kept: max_seq_len when set, else the automatic cap (and the model's context)."""
        if self.max_seq_len is not None:
            return self.max_seq_len
        return min(AUTO_MAX_SEQ_LEN, context) if context else AUTO_MAX_SEQ_LEN

    def row_length(self, longest: int, context: int | None = None) -> int:
        """max_seq_len when set; else the longest kept example rounded up to a multiple of SEQ_LEN_MULTIPLE
        (within the encoding limit)."""
        if self.max_seq_len is not None:
            return self.max_seq_len
        rounded = -(-max(2, longest) // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE
        return min(rounded, self.encoding_limit(context))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """Build from a YAML/CLI mapping; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}", where="data",
                              fix=f"known settings: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Help text for every field, keyed by field name."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
