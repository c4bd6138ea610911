"""`LoraConfig`: the adapter settings (the `lora:` section of a training config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=_help("adapter rank: A is r x in, B is out x r"))
    alpha: float = field(default=32, metadata=_help(
        "scaling numerator: the adapter output is multiplied by alpha/r (alpha/sqrt(r) with use_rslora)"))
    dropout: float = field(default=0.05, metadata=_help("dropout on the adapter input during training (0 disables)"))
    target_modules: list[str] | str = field(default=ALL_LINEAR, metadata=_help(
        "linear layers to adapt: module names such as [q_proj, v_proj] (matching the end of a module path) "
        "or all-linear (every linear layer of the decoder blocks; never the LM head or embeddings)"))
    use_rslora: bool = field(default=False, metadata=_help(
        "rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r (keeps high ranks learning)"))
    use_dora: bool = field(default=False, metadata=_help(
        "DoRA: learn a per-output-row magnitude on top of the LoRA direction update"))
    init: str = field(default="kaiming", metadata=_help(
        "initialisation of A: kaiming (uniform, as PEFT) or gaussian (std 1/r); B always starts at zero, "
        "so the adapted model starts equal to the base model"))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def target_names(self) -> list[str] | None:
        """The explicit target names, or None for all-linear."""
        if isinstance(self.target_modules, str):
            return None if self.target_modules == ALL_LINEAR else [self.target_modules]
        return list(self.target_modules)

    def validate(self) -> "LoraConfig":
        def check(ok: bool, name: str, message: str, fix: str) -> None:
            if not ok:
                raise ConfigError(message, where=f"lora.{name}", fix=fix)

        check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "r",
              f"must be an integer >= 1, got {self.r!r}", "e.g. 8, 16 or 32")
        check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
              "alpha", f"must be a number > 0, got {self.alpha!r}", "e.g. twice the rank")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout",
              f"must be in [0, 1), got {self.dropout!r}", "e.g. 0.05, or 0 to disable")
        targets = self.target_modules
        names_ok = isinstance(targets, str) and bool(targets) or (
            isinstance(targets, (list, tuple)) and len(targets) > 0
            and all(isinstance(name, str) and name for name in targets))
        check(names_ok, "target_modules", f"must be {ALL_LINEAR!r} or a non-empty list of module names, "
              f"got {targets!r}", "e.g. [q_proj, k_proj, v_proj, o_proj] or all-linear")
        check(self.init in INITS, "init", f"unknown init {self.init!r}", f"use one of {', '.join(INITS)}")
        return self
