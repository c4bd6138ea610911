"""What fits before anything is loaded: the memory plan and a rough speed of each way to train a model, from its
architecture alone (``homebake plan``).

The model is built on the meta device (shapes, no storage) exactly as training builds it -- frozen base in the
storage dtype, NF4 for QLoRA, adapters injected -- and planned by ``train.plan.training_plan``, the planner a run
uses, so ``plan`` and ``train`` cannot disagree. The speed is a floating-point-operation count over a measured
matrix-multiply rate (the same probe ``bench/train.py`` calls the roofline), scaled by the share of it a training
step reaches (measured, see docs/train.md): rough, within about 2x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .plan import MemoryPlan, training_plan

TIERS_GIB = (8, 12, 16, 24, 32, 64)
METHOD_ORDER = ("lora", "dora", "qlora", "full")
# The share of the matmul rate a step reaches, measured on the 2-core AMX Xeon (docs/train.md): SmolLM2-135M
# LoRA bf16 8 x 256 ran at 11% of it, the 1B Llama at 22%; QLoRA dequantises every weight twice a step.
STEP_EFFICIENCY = {"lora": 0.15, "dora": 0.08, "qlora": 0.03, "full": 0.15}


@dataclass
class Option:
    method: str
    checkpointing: bool
    plan: MemoryPlan
    tokens_per_s: float | None


def meta_model(args, config, storage_dtype: torch.dtype) -> torch.nn.Module:
    """The trainable model ``train.setup.build_model`` would build, on the meta device."""
    from ..adapters.lora import find_target_modules, inject_lora, replace_module
    from ..adapters.nf4 import NF4Linear, NF4Weight
    from ..model.families import build_causal_lm

    full = config.method == "full"
    with torch.device("meta"):
        model = build_causal_lm(args).to(torch.float32 if full else storage_dtype)
        if full:
            return model
        for param in model.parameters():
            param.requires_grad_(False)
        if config.method == "qlora":
            for path, linear in find_target_modules(model, config.lora.target_modules):
                replace_module(model, path, NF4Linear(NF4Weight(tuple(linear.weight.shape), storage_dtype, "meta"),
                                                      linear.bias))
        inject_lora(model, config.lora)
    return model


def planner(args, config, *, source_kind: str, file_bytes: int, device_type: str, compute_dtype: torch.dtype,
            widest_row: int) -> Callable[[int, bool], MemoryPlan]:
    """``plan_for(rows, checkpointing)``: the plan of ``config`` (its method, LoRA settings and objective) for
    ``rows`` rows of ``widest_row`` tokens -- what ``training_plan`` gives for the loaded model, so a run is
    fitted before its weights are read. The meta model is built once for all the candidates auto-fit tries."""
    from .loss import default_chunk_rows
    from .objectives import build_objective

    storage = torch.float32 if config.method == "full" else compute_dtype
    model = meta_model(args, config, storage)
    objective = build_objective(config, model, compute_dtype)
    chunk_rows = config.loss_chunk_rows or default_chunk_rows(args.vocab_size, compute_dtype.itemsize)

    def plan_for(rows: int, checkpointing: bool) -> MemoryPlan:
        return training_plan(config, model, args, source_kind=source_kind, file_bytes=file_bytes,
                             device_type=device_type, compute_dtype=compute_dtype, widest_row=widest_row,
                             chunk_rows=chunk_rows, objective=objective, rows=rows,
                             gradient_checkpointing=checkpointing)

    return plan_for


def forecast(args, config, *, rows: int, checkpointing: bool, **source) -> MemoryPlan:
    """One plan of ``planner`` (same keywords)."""
    return planner(args, config, **source)(rows, checkpointing)


def parameter_count(args) -> int:
    from ..model.families import build_causal_lm

    with torch.device("meta"):
        model = build_causal_lm(args)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def step_flops_per_token(parameters: int, method: str, checkpointing: bool) -> float:
    """Forward 2N; backward 2N for the input gradients, 2N more for the weights' in a full fine-tune; a
    checkpointed step runs the forward twice."""
    flops = 2 * parameters + 2 * parameters + (2 * parameters if method == "full" else 0)
    return flops + (2 * parameters if checkpointing else 0)


def matmul_rate(dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a 1024-square matmul on this machine's CPU in ``dtype`` (a half-second probe)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b  # warm-up
    started, runs = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return runs * 2 * 1024 ** 3 / (time.perf_counter() - started)


def options(args, base_config, *, source_kind: str, file_bytes: int, device_type: str, compute_dtype: torch.dtype,
            widest_row: int, rows: int, methods=METHOD_ORDER, rate: float | None = None,
            parameters: int = 0) -> list[Option]:
    """Each method with and without checkpointing; ``rate`` (FLOP/s, this machine's) and ``parameters``
    (``parameter_count(args)``) give the speeds."""
    found = []
    for method in methods:
        config = replace(base_config, method=method, lora=replace(base_config.lora, use_dora=method == "dora"))
        plan_for = planner(args, config, source_kind=source_kind, file_bytes=file_bytes, device_type=device_type,
                           compute_dtype=compute_dtype, widest_row=widest_row)
        for checkpointing in (False, True):
            plan = plan_for(rows, checkpointing)
            speed = rate * STEP_EFFICIENCY[method] / step_flops_per_token(parameters, method, checkpointing) \
                if rate and parameters else None
            found.append(Option(method, checkpointing, plan, speed))
    return found
