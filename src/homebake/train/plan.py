"""An up-front memory estimate, so a run that will not fit says so before loading data for an hour.

Exact sizes for weights, gradients and AdamW state; a per-token activation count for a Llama-style block (what
autograd keeps for backward: norms, the q/k/v/o and MLP inputs/outputs, the fused LoRA's 1-byte dropout masks);
the LM-head chunk; and, on a CPU, what the process itself costs (Python, torch, the tokenizer) plus what glibc's
heap holds beyond the live activations without checkpointing (with checkpointing the allocator is set to hand
large blocks back: ``train/allocator.py``). Both CPU terms are measured (see docs/train.md, "memory plan").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .loss import head_loss_bytes

GIB = 1024 ** 3
# Measured on the CPU (docs/train.md): the interpreter with torch and homebake imported and a tokenizer loaded,
# and the peak RSS of non-checkpointed steps over the live activations this plan counts.
CPU_PROCESS_BYTES = int(0.30 * GIB)
CPU_HEAP_FACTOR = 1.40
# ... and, with checkpointing (whose small, short-lived tensors stay in glibc's arenas), a constant on top.
CPU_CHECKPOINT_BYTES = int(0.10 * GIB)
# Over a long CPU run with rows of varying shape, glibc's heap fragments and the peak RSS creeps above what the
# first steps reach (the plan): measured +25-40% after 30-70 steps without checkpointing, +0.55 GiB after 48
# checkpointed 1 x 1024 steps (docs/train.md). Auto-fit keeps room for it: the activations again, at least this.
CPU_HEAP_GROWTH_FLOOR = int(0.75 * GIB)


@dataclass
class MemoryPlan:
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    loss_head: int
    reference_weights: int = 0  # full-fine-tune DPO: the frozen copy of the starting weights
    process: int = 0  # CPU: the interpreter, torch and the tokenizer (0 on GPUs: not device memory)
    loading: int = 0  # the peak while the weights are read and converted, process included (see loading_bytes)
    heap_growth: int = 0  # CPU: room for the heap's fragmentation over a long run (CPU_HEAP_GROWTH_FLOOR)
    # Of ``loading``, the weight file's mapped pages: in the peak RSS, but clean page cache, which the kernel drops
    # under pressure instead of killing the process; what a run must have leaves them out.
    loading_file: int = 0

    @property
    def training(self) -> int:
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state
                + self.activations + self.loss_head + self.reference_weights + self.process)

    @property
    def total(self) -> int:
        """The peak of loading and the first steps: what the validation test measures."""
        return max(self.training, self.loading)

    @property
    def loading_needed(self) -> int:
        """What loading must have in memory: its peak less the file's droppable pages."""
        return self.loading - self.loading_file

    @property
    def required(self) -> int:
        """What the first steps and loading must have (the memory tiers of ``homebake plan``)."""
        return max(self.training, self.loading_needed)

    @property
    def bound(self) -> int:
        """What a whole run must have, fragmentation included: what auto-fit keeps under the budget."""
        return max(self.training + self.heap_growth, self.loading_needed)

    def describe(self) -> str:
        parts = [("frozen weights", self.frozen_weights), ("trainable weights", self.trainable_weights),
                 ("gradients", self.gradients), ("AdamW state", self.optimizer_state),
                 ("activations", self.activations), ("LM head chunk", self.loss_head),
                 ("DPO reference", self.reference_weights), ("process", self.process)]
        listed = ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts if size)
        if self.loading > self.training:
            listed = f"loading the weights {self.loading / GIB:.2f}; training {self.training / GIB:.2f}: {listed}"
        growth = f"; up to {self.bound / GIB:.2f} GiB as the heap fragments over a long run" \
            if self.bound > self.total else ""
        return f"estimated peak memory {self.total / GIB:.2f} GiB ({listed}){growth}"


def loading_bytes(*, source_kind: str, parameters: int, largest_tensor: int, file_bytes: int,
                  storage_bytes: int, quantised_bytes: int = 0, device_type: str = "cpu") -> tuple[int, int]:
    """The peak while ``model.load`` reads the weights (``parameters`` elements, ``largest_tensor`` the biggest
    tensor's) into tensors of ``storage_bytes`` per element: a GGUF is dequantised to float32 whole while its
    file is mapped (plus one float32 tensor of temporaries), then cast tensor by tensor. Safetensors are mapped:
    read in the file's own dtype the tensors are the mapped pages; converted (bf16 read as float32), every page
    read stays resident beside the copies until the last tensor is converted. CPU and MPS only: a CUDA load
    stages on the host, so device memory never holds more than the converted weights (counted in the training
    part). QLoRA (``quantised_bytes``: the frozen base once quantised) then reads every converted weight while
    the NF4 copy is built: a safetensors file's mapped pages all become resident. Returns the peak and, of it, the
    file's mapped pages (page cache: the kernel drops them rather than kill the process)."""
    if device_type not in ("cpu", "mps"):
        return 0, 0
    converted = parameters * storage_bytes
    if source_kind == "gguf":
        held = parameters * 4 + file_bytes + largest_tensor * 4
    elif round(file_bytes / max(parameters, 1)) == storage_bytes:  # stored as it is read: no copy
        converted = max(file_bytes, converted)
        held = converted + largest_tensor * storage_bytes
    else:
        held = file_bytes + converted
    if quantised_bytes:
        held = max(held, converted + quantised_bytes)
    return CPU_PROCESS_BYTES + held, min(file_bytes, held)


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
    device_type: str = "cpu",
    kv_size: int | None = None,
    dora: bool = False,
) -> MemoryPlan:
    """``kv_size``: the k/v projections' output width (key-value heads x head dim; default ``hidden_size``)."""
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
    h, i, kv = hidden_size, intermediate_size, kv_size or hidden_size
    projection_inputs, projection_outputs = 6 * h + i, 3 * h + 2 * kv + 2 * i  # summed over the 7 projections
    # norms, q/k/v/o and residuals: 10 h; the MLP's gate, up and their gated product: 3 i (model/activation.py)
    per_layer_bytes = (10 * h + 3 * i) * activation_bytes
    if adapter_dropout:  # 1-byte keep masks: one per input shared by its fused LoRA projections (q/k/v, o,
        # gate/up, down: adapters/fused.py); DoRA's unfused projections draw one each
        per_layer_bytes += projection_inputs if dora else 3 * h + i
    if dora:  # unfused: the adapter's input and, per output, the base and the fp32 direction terms it scales
        per_layer_bytes += projection_inputs * activation_bytes + projection_outputs * (activation_bytes + 4)
    if gradient_checkpointing:  # each layer keeps its input; one layer is recomputed, with its gradients, at a time
        per_token = num_layers * h * activation_bytes + 2 * per_layer_bytes
    else:
        per_token = num_layers * per_layer_bytes
    activations = tokens_per_micro_batch * per_token
    on_cpu = device_type in ("cpu", "mps")  # unified memory: the process's RSS is what counts
    if device_type == "cpu":  # glibc's heap (train/allocator.py)
        activations = CPU_CHECKPOINT_BYTES + activations if gradient_checkpointing \
            else int(activations * CPU_HEAP_FACTOR)
    head = head_loss_bytes(head_chunk_rows, vocab_size, activation_bytes)
    growth = max(activations, CPU_HEAP_GROWTH_FLOOR) if device_type == "cpu" else 0
    return MemoryPlan(frozen, trainable, trainable, 2 * trainable, activations, head, reference_bytes,
                      CPU_PROCESS_BYTES if on_cpu else 0, heap_growth=growth)


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


def reference_bytes(objective) -> int:
    """The frozen reference copy a full-fine-tune DPO run keeps (``train.objectives.frozen_reference``)."""
    reference = getattr(objective, "reference_model", None)
    if reference is None:
        return 0
    unique = {id(p): p for p in reference.parameters()}.values()  # tied embeddings count once
    return sum(tensor_bytes(p) for p in unique) + sum(tensor_bytes(b) for b in reference.buffers())


def training_plan(config, model: torch.nn.Module, args, *, source_kind: str, file_bytes: int, device_type: str,
                  compute_dtype: torch.dtype, widest_row: int, chunk_rows: int, objective=None,
                  rows: int | None = None, gradient_checkpointing: bool | None = None) -> MemoryPlan:
    """The plan of a run of ``config`` over ``model`` (built and made trainable as training does it; real or on
    the meta device) of architecture ``args``, read from ``file_bytes`` of ``source_kind`` weights, whose widest
    row has ``widest_row`` tokens; ``rows`` and ``gradient_checkpointing`` override the config's (auto-fit and
    ``homebake plan`` try candidates). FSDP2 parameters are DTensors: numel() is the whole tensor's."""
    rows = rows if rows is not None else config.batch_size
    checkpointing = gradient_checkpointing if gradient_checkpointing is not None else bool(
        config.gradient_checkpointing)
    adapters = config.method != "full"
    plan = estimate_memory(
        model, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_hidden_layers, vocab_size=args.vocab_size, tokens_per_micro_batch=rows * widest_row,
        activation_bytes=torch.finfo(compute_dtype).bits // 8, gradient_checkpointing=checkpointing,
        adapter_dropout=adapters and config.lora.dropout > 0, head_chunk_rows=chunk_rows,
        reference_bytes=reference_bytes(objective), device_type=device_type,
        kv_size=args.num_key_value_heads * args.head_dim, dora=adapters and config.lora.use_dora)
    quantised = plan.frozen_weights if config.method == "qlora" else 0
    plan.loading, plan.loading_file = _loading_peak(config, model, source_kind, file_bytes, device_type,
                                                    compute_dtype, quantised)
    return plan


def weight_file_bytes(source: Path) -> int:
    """Bytes of a model's weight files: the .gguf, or a folder's safetensors."""
    files = [source] if source.is_file() else list(source.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def _loading_peak(config, model: torch.nn.Module, source_kind: str, file_bytes: int, device_type: str,
                  compute_dtype: torch.dtype, quantised_bytes: int) -> tuple[int, int]:
    """``loading_bytes`` for the base weights this run reads (a full fine-tune's are all its parameters)."""
    from ..adapters.nf4 import NF4Weight

    full = config.method == "full"
    unique = {id(p): p for p in model.parameters() if full or not p.requires_grad}.values()
    sizes = [math.prod(p.shape) for p in unique]
    sizes += [m.shape.numel() for m in model.modules() if isinstance(m, NF4Weight)]  # QLoRA's base
    return loading_bytes(source_kind=source_kind, parameters=sum(sizes), largest_tensor=max(sizes, default=0),
                         file_bytes=file_bytes, storage_bytes=4 if full else torch.finfo(compute_dtype).bits // 8,
                         quantised_bytes=quantised_bytes, device_type=device_type)
