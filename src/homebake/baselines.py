"""Prompting baselines: the base model given a few examples of the task in its prompt (few-shot).

Fine-tuning is only worth it when it beats what a prompt already does, so ``homebake compare`` also asks the
base model with ``k`` examples from the *training* data as prior turns:

- the examples (shots) come from the training data (a run's ``config.yaml`` ``data.paths``, or a file given
  with ``--shots-data``), chosen once, deterministically (a seeded sample), and the same for every evaluated
  example, like a prompt a person would write;
- never from the evaluated file: a training example that shares a user turn with any evaluated example
  (after case-folding and collapsing whitespace) is not eligible, nor is one with tools, plain text, or no
  final assistant turn;
- the prompt is the evaluated example's own system prompt (if any), then the shots' user and assistant turns in
  order (their system prompts left out), then the evaluated example's own turns, rendered with the model's chat
  template like any other prompt.

Pure functions over messages and conversations; ``homebake.evaluate`` runs the model on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import DataError
from .metrics import normalize_text
from .run_folder import read_run_config

DEFAULT_SHOTS = 5
DEFAULT_SEED = 0


@dataclass
class ShotSet:
    """The examples put in front of every evaluated prompt, and where they came from."""

    shots: list  # data.formats.Conversation, in prompt order
    data: list[str]  # the training data they were drawn from
    eligible: int  # training examples that could have been chosen
    excluded: int  # training examples left out because they share a user turn with the evaluated file
    seed: int = DEFAULT_SEED
    notes: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [shot.source for shot in self.shots]

    def to_dict(self) -> dict:
        return {"shots": len(self.shots), "data": self.data, "seed": self.seed, "sources": self.sources,
                "eligible": self.eligible, "excluded_overlap": self.excluded,
                "examples": [[{"role": m["role"], "content": m.get("content", "")} for m in shot_turns(shot)]
                             for shot in self.shots]}


@dataclass
class TrainingData:
    """Where a run's training examples are (``config.yaml`` ``data``) and how to read them."""

    paths: list[str]
    format: str = "auto"
    fields: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    hub_split: str = "train"


def run_training_data(run_dir: str | Path) -> TrainingData | None:
    """The training data recorded in a run's ``config.yaml`` (None for a bare adapter or a run without paths).

    Relative paths are tried from the current folder first, then from the run folder.
    """
    try:
        config = read_run_config(run_dir)
    except ValueError:
        return None
    data = (config or {}).get("data") or {}
    paths = data.get("paths") if isinstance(data, dict) else None
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        return None
    resolved = []
    for spec in map(str, paths):
        candidate = Path(spec).expanduser()
        if not candidate.exists() and not candidate.is_absolute() and (Path(run_dir) / candidate).exists():
            candidate = Path(run_dir) / candidate
        resolved.append(str(candidate) if candidate.exists() else spec)

    def mapping(name: str) -> dict:
        value = data.get(name)
        return dict(value) if isinstance(value, dict) else {}

    return TrainingData(resolved, str(data.get("format") or "auto"), mapping("fields"), mapping("roles"),
                        str(data.get("hub_split") or "train"))


def user_turns(messages: Iterable[dict]) -> set[str]:
    """Normalised text of every user turn (what 'the same example' means for leakage)."""
    return {normalize_text(str(m.get("content", ""))) for m in messages if m.get("role") == "user"}


def shot_turns(conversation) -> list[dict]:
    """The turns a shot contributes: every message but system ones."""
    return [dict(m) for m in conversation.messages if m.get("role") != "system"]


def eligible_shot(conversation) -> bool:
    messages = conversation.messages
    return (not conversation.is_text and not conversation.tools and bool(messages)
            and messages[-1].get("role") == "assistant"
            and any(m.get("role") == "user" for m in messages)
            and all(m.get("role") in ("system", "user", "assistant") and not m.get("tool_calls") for m in messages))


def choose_shots(conversations: Sequence, k: int, evaluated: Iterable[Sequence[dict]], *, seed: int = DEFAULT_SEED,
                 data: Sequence[str] = ()) -> ShotSet:
    """``k`` training conversations, a seeded sample of those eligible and not overlapping ``evaluated``.

    ``evaluated``: the message lists of every evaluated example (prompt turns, with or without the answer).
    Fewer than ``k`` eligible: all of them, with a note. The result is in the order of the sample.
    """
    taken: set[str] = set()
    for messages in evaluated:
        taken |= user_turns(messages)
    candidates = [c for c in conversations if eligible_shot(c)]
    eligible = [c for c in candidates if not (user_turns(c.messages) & taken)]
    shot_set = ShotSet([], list(data), len(eligible), len(candidates) - len(eligible), seed)
    if k <= 0:
        return shot_set
    if len(eligible) < k:
        shot_set.notes.append(f"only {len(eligible)} training examples are eligible as shots (asked for {k})")
    shot_set.shots = random.Random(seed).sample(eligible, min(k, len(eligible)))
    return shot_set


def load_shots(training: TrainingData, k: int, evaluated: Iterable[Sequence[dict]], *,
               seed: int = DEFAULT_SEED) -> ShotSet:
    """Read the training data with the data pipeline and choose ``k`` shots (see :func:`choose_shots`)."""
    from .data.formats import SkipLog, load_conversations

    log = SkipLog()
    loaded = load_conversations(training.paths, fmt=training.format, fields=training.fields or None,
                                roles=training.roles or None, hub_split=training.hub_split, log=log)
    if not loaded.conversations:
        raise DataError("no usable training example to take few-shot examples from",
                        where=", ".join(training.paths),
                        fix="pass --shots-data with the training file, or --shots 0 to skip the few-shot baseline")
    return choose_shots(loaded.conversations, k, evaluated, seed=seed, data=training.paths)


def few_shot_messages(shots: Sequence, prompt_messages: Sequence[dict]) -> list[dict]:
    """The evaluated prompt with the shots as prior turns: its leading system messages, every shot's user and
    assistant turns in order, then the rest of the evaluated prompt."""
    lead = 0
    while lead < len(prompt_messages) and prompt_messages[lead].get("role") == "system":
        lead += 1
    turns = [turn for shot in shots for turn in shot_turns(shot)]
    return [dict(m) for m in prompt_messages[:lead]] + turns + [dict(m) for m in prompt_messages[lead:]]
