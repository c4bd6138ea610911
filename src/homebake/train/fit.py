"""Auto-fit: before the first step, choose what the user left unset so the memory plan fits.

The budget is ``--memory-limit`` or 85% of what is available now (RAM on a CPU or MPS, free device memory on
CUDA). Only unset settings are chosen: rows per micro-batch (``batch_size``, at most 8) with gradient
accumulation raised to keep the rows per optimizer step, then gradient checkpointing if nothing fits without it.
Explicit settings are kept; when they cannot fit, or nothing does, the run is refused before it starts, naming
what would fit.
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import ConfigError
from .plan import GIB, MemoryPlan

DEFAULT_ROWS = 8  # rows per optimizer step when batch_size is unset
MEMORY_SHARE = 0.85  # of the available memory, when --memory-limit is not given
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory(text: str, where: str = "memory_limit") -> int:
    """Bytes in "12GB", "12 GiB", "800MB", "1.5T" (binary units: a "16 GB" machine holds 16 GiB)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read {text!r} as an amount of memory", where=where, fix="e.g. 12GB or 800MB")
    power = "KMGT".find(match.group(2).upper()) + 1 if match.group(2) else 0
    return int(float(match.group(1)) * 1024 ** power)


def memory_budget(limit: str | None, available: int | None) -> tuple[int | None, str]:
    """The bytes this run may use, and how they were set (for the header and the errors)."""
    if limit:
        budget = parse_memory(limit)
        return budget, f"the --memory-limit of {limit} ({budget / GIB:.2f} GiB)"
    if available is None:
        return None, "unknown available memory"
    return int(available * MEMORY_SHARE), f"{MEMORY_SHARE:.0%} of the {available / GIB:.1f} GiB available"


def fit_to_memory(config, plan_for: Callable[[int, bool], MemoryPlan], budget: int | None, budget_text: str) -> str:
    """Set ``config.batch_size``, ``grad_accum`` and ``gradient_checkpointing`` where unset so that
    ``plan_for(rows, checkpointing).bound`` (the peak over the whole run) fits ``budget``; returns the header line
    saying what and why."""
    rows_given, checkpointing_given = config.batch_size, config.gradient_checkpointing
    per_step = (rows_given or DEFAULT_ROWS) * config.grad_accum
    row_choices = [rows_given] if rows_given else [r for r in (8, 4, 2, 1) if per_step % r == 0]
    checkpointing_choices = [checkpointing_given] if checkpointing_given is not None else [False, True]
    tried = [(rows, checkpointing, plan_for(rows, checkpointing).bound)
             for checkpointing in checkpointing_choices for rows in row_choices]
    fitting = [t for t in tried if budget is None or t[2] <= budget]
    if not fitting:
        raise ConfigError(_nothing_fits(plan_for, budget_text, tried), where="memory",
                          fix=_what_would_fit(config, plan_for, budget))
    rows, checkpointing, total = fitting[0]
    config.batch_size, config.gradient_checkpointing = rows, checkpointing
    if not rows_given:
        config.grad_accum = per_step // rows
    shape = f"{_rows(rows)} x {config.grad_accum} accumulation, checkpointing {'on' if checkpointing else 'off'}"
    if budget is None:
        return f"{shape} (the available memory is unknown: not checked)"
    why = f"plan {total / GIB:.2f} GiB over the run within {budget_text}"
    if (rows, checkpointing) != tried[0][:2]:
        first = tried[0]
        why += (f"; {_rows(first[0])}{' with checkpointing' if first[1] else ''} would need "
                f"{first[2] / GIB:.2f} GiB")
    return f"{shape}: {why}"


def _nothing_fits(plan_for, budget_text: str, tried) -> str:
    rows, checkpointing, total = min(tried, key=lambda t: t[2])
    plan = plan_for(rows, checkpointing)
    what = "loading the weights" if plan.loading_needed >= plan.bound else \
        f"{_rows(rows)} per micro-batch, checkpointing {'on' if checkpointing else 'off'}"
    return f"this run needs at least {total / GIB:.2f} GiB ({what}), more than {budget_text}"


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def _what_would_fit(config, plan_for, budget: int) -> str:
    """The settings that would fit, relaxing the explicit ones (the smallest micro-batch, checkpointing)."""
    plan = plan_for(1, True)
    smallest = plan.bound
    if smallest <= budget:
        explicit = [flag for flag, value in (("--batch-size", config.batch_size),
                                             ("--no-gradient-checkpointing", config.gradient_checkpointing is False))
                    if value]
        return (f"--batch-size 1 --gradient-checkpointing fits ({smallest / GIB:.2f} GiB)"
                + (f"; drop {' and '.join(explicit)}" if explicit else ""))
    if plan.loading_needed >= plan.bound:
        hints = ["a smaller model", "a model saved as bf16 safetensors (read without a float32 copy)"]
    else:
        hints = ["--max-seq-len lower", "--method qlora" if config.method != "qlora" else None, "a smaller model"]
    hints.append("--memory-limit higher if more memory is free")
    return f"even 1 row with checkpointing needs {smallest / GIB:.2f} GiB: try " + ", ".join(h for h in hints if h)
