"""An up-front memory estimate, so a run that will not fit says so before loading data for an hour.

The estimate is deliberately simple: exact sizes for weights, gradients and AdamW state, and a
per-token activation count for a Llama-style block (what autograd keeps for backward: norms, the
q/k/v/o and MLP inputs/outputs, and the adapters' dropout copies), plus the LM-head chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1024 ** 3


@dataclass
class MemoryPlan:
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    loss_head: int
    reference_weights: int = 0  # full-fine-tune DPO: the frozen copy of the starting weights

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state
                + self.activations + self.loss_head + self.reference_weights)

    def describe(self) -> str:
        parts = [("frozen weights", self.frozen_weights), ("trainable weights", self.trainable_weights),
                 ("gradients", self.gradients), ("AdamW state", self.optimizer_state),
                 ("activations", self.activations), ("LM head chunk", self.loss_head),
                 ("DPO reference", self.reference_weights)]
        listed = ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts if size)
        return f"estimated peak memory {self.total / GIB:.2f} GiB ({listed})"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores (quantised tensor subclasses report their packed storage)."""
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None:  # e.g. an NF4 tensor: sum its inner tensors
        names, _ = inner()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def estimate_memory(
    model: torch.nn.Module,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    vocab_size: int,
    tokens_per_micro_batch: int,
    activation_bytes: int,
    gradient_checkpointing: bool,
    adapter_dropout: bool,
    head_chunk_rows: int,
    reference_bytes: int = 0,
) -> MemoryPlan:
    frozen = trainable = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        if param.requires_grad:
            trainable += param.numel() * 4  # fp32 master copies
        else:
            frozen += tensor_bytes(param)
    frozen += sum(tensor_bytes(b) for b in model.buffers())
    h, i = hidden_size, intermediate_size
    per_layer_elements = 10 * h + 4 * i + ((6 * h + i) if adapter_dropout else 0)
    if gradient_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        per_token = num_layers * h + per_layer_elements
    else:
        per_token = num_layers * per_layer_elements
    activations = tokens_per_micro_batch * per_token * activation_bytes
    head = head_chunk_rows * vocab_size * 4 * 2  # fp32 logits and their gradient for one chunk
    return MemoryPlan(frozen, trainable, trainable, 2 * trainable, activations, head, reference_bytes)


def available_memory(device: torch.device) -> int | None:
    """Free memory where the run will live: device memory on CUDA, otherwise available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
