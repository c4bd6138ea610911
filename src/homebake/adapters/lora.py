"""LoRA and DoRA adapters: a wrapper injected into a built model by module path, and a pure merge.

Shapes and maths are PEFT's: ``lora_A`` is r x in, ``lora_B`` is out x r (zero at start), and

    LoRA:  y = x W^T + b + s * B(A(dropout(x)))                         s = alpha/r (alpha/sqrt(r): rsLoRA)
    DoRA:  y = m / ||W + s B A||_row * (x W^T + s * B(A(x))) + b       (dropout 0 / eval)

where the row norm is treated as a constant (detached), as in the DoRA paper section 4.3 and PEFT. The
wrapped layer keeps the base parameters under their names (``q_proj.weight``, ``q_proj.bias``), so the
model's state dict still loads from and saves to HF checkpoints; adapter parameters are
``q_proj.lora_A.weight``, ``q_proj.lora_B.weight`` and, for DoRA, ``q_proj.lora_magnitude``.

Everything is computed in the activation dtype: the frozen weight is used as stored (keep it in the compute
dtype, e.g. bf16, so no per-step casts happen), and adapter weights (often fp32 masters) are cast to the
activation dtype, which costs r x (in + out) values per layer rather than in x out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError, ModelLoadError
from .config import LoraConfig
from .fused import LoraProjection, fused_lora_linears
from .nf4 import NF4Linear, NF4Weight, nf4_linear

ADAPTER_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude": "magnitude"}
_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _row_norm(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=1, dtype=dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projection computes in: autocast's where it is on (and x is floating), else x's."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoraLinear(nn.Module):
    """A frozen linear layer (dense or NF4) plus a trainable LoRA/DoRA adapter.

    LoRA runs as one fused autograd function (``adapters.fused``): dropout as a 1-byte mask, the scale folded
    into the N x r intermediate, the adapter term added in place; the decoder's projections of one input
    (q/k/v, gate/up) run together through ``project_shared``, with one dropout mask. ``fast_dropout`` draws the
    training masks from 31-bit integers (cheaper on CPU); off, they equal torch's dropout masks at the same seed.
    """

    def __init__(self, base: nn.Linear | NF4Linear, config: LoraConfig, *, adapter_dtype: torch.dtype = torch.float32,
                 fast_dropout: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, NF4Linear):
            self.register_parameter("weight", None)
            self.weight_nf4 = base.weight_nf4
            device = base.weight_nf4.packed.device
        else:
            self.weight = base.weight
            self.register_module("weight_nf4", None)
            device = base.weight.device
        self.bias = base.bias
        for param in (self.weight, self.bias):
            if param is not None:
                param.requires_grad_(False)

        self.r = config.r
        self.scaling = config.scaling
        self.dropout = float(config.dropout)
        self.fast_dropout = fast_dropout
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        with torch.no_grad():
            if config.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / config.r)
            else:  # PEFT's default: nn.Linear's own kaiming-uniform init
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if config.use_dora:
            # B = 0, so ||W + s B A|| = ||W||: the magnitude starts at the base weight's row norms.
            self.lora_magnitude = nn.Parameter(_row_norm(self.frozen_weight(torch.float32)).to(adapter_dtype))
        else:
            self.register_parameter("lora_magnitude", None)
        self.adapter_enabled = True  # False inside ``adapters_disabled``: the frozen base only

    # -- the frozen base ------------------------------------------------------------------------------
    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense base weight in ``dtype`` (no copy when it is stored in that dtype)."""
        if self.weight_nf4 is not None:
            return self.weight_nf4.dequantize(dtype)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def _base(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_nf4 is not None:
            return nf4_linear(x, self.weight_nf4, bias, dequantized=weight)
        if weight is None:
            weight = self.frozen_weight(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def quantize_base_(self) -> None:
        """Store the base weight as NF4 (QLoRA); a fresh DoRA magnitude is re-based on the quantised weight."""
        if self.weight_nf4 is not None:
            return
        self.weight_nf4 = NF4Weight.quantize(self.weight)
        self.weight = None
        if self.lora_magnitude is not None and not self.lora_B.weight.any():
            self.lora_magnitude.copy_(_row_norm(self.frozen_weight(torch.float32)))

    # -- the adapter ----------------------------------------------------------------------------------
    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.weight.to(x.dtype)), self.lora_B.weight.to(x.dtype))

    def _projection(self, dtype: torch.dtype) -> LoraProjection:
        weight = None if self.weight_nf4 is not None else self.frozen_weight(dtype)
        return LoraProjection(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.bias, self.weight_nf4)

    def _fused_options(self) -> tuple[float, bool, bool]:
        return self.dropout, self.training, self.fast_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self._base(x, None, self.bias)
        if self.lora_magnitude is None:
            return self.project_shared(x, [self])[0]
        return self._dora_forward(x)

    @staticmethod
    def project_shared(x: torch.Tensor, modules) -> list[torch.Tensor]:
        """Each module applied to the same ``x`` (a layer's q/k/v, gate/up; ``model.decoder.project``), the LoRA
        ones (not DoRA) as one fused call: one dropout mask on x, one masked copy and one matmul for the stacked
        A matrices (``adapters.fused``). Modules of other kinds, or with other dropout settings, run on their own."""
        fused = [m for m in modules if isinstance(m, LoraLinear) and m.lora_magnitude is None and m.adapter_enabled]
        if fused and any(m._fused_options() != fused[0]._fused_options() for m in fused):
            fused = fused[:1]
        results: dict[int, torch.Tensor] = {}
        if fused:
            dtype = _compute_dtype(x)
            dropout, training, fast = fused[0]._fused_options()
            outputs = fused_lora_linears(x.to(dtype), [m._projection(dtype) for m in fused], dropout=dropout,
                                         training=training, fast_masks=fast)
            results = {id(m): y for m, y in zip(fused, outputs)}
        return [results[id(m)] if id(m) in results else m(x) for m in modules]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused LoRA expression with module dropout (PEFT's form); the fused forward must equal it."""
        return self._base(x, None, self.bias) + self._adapter(self.lora_dropout(x)) * self.scaling

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.frozen_weight(x.dtype)
        with torch.no_grad():  # the row norm is a constant for the gradient (DoRA section 4.3)
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
            norm = _row_norm(weight + self.scaling * lora_weight, dtype=torch.float32)
        # fp32 scale (as PEFT's fp32 adapter path): in bf16 it would move in steps of 0.4%, hiding small updates.
        mag_scale = self.lora_magnitude.float() / norm
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # With dropout the direction term sees dropout(x) while the base output sees x (as PEFT).
            dropped = self.lora_dropout(x)
            out = (self._base(x, weight, self.bias) + (mag_scale - 1) * self._base(dropped, weight, None)
                   + mag_scale * self._adapter(dropped) * self.scaling)
            return out.to(x.dtype)
        out = mag_scale * (self._base(x, weight, None) + self._adapter(x) * self.scaling)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.lora_magnitude is not None else "LoRA"
        base = "nf4" if self.weight_nf4 is not None else str(self.weight.dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind} r={self.r}, scaling={self.scaling:g}, base={base}")


# -- injection -------------------------------------------------------------------------------------------
def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def find_target_modules(model: nn.Module, target_modules, *, allow_wrapped: bool = False) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs of the linear layers ``target_modules`` selects, in model order.

    A name selects every linear layer whose path is that name or ends with "." + name (PEFT's rule);
    "all-linear" selects every linear layer inside the decoder blocks (``...layers.<i>....``).
    """
    config = LoraConfig(target_modules=target_modules)
    config.validate()
    names = config.target_names()
    linears: list[tuple[str, nn.Module]] = []
    others: dict[str, nn.Module] = {}
    inside_wrapper: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if inside_wrapper and path.startswith(inside_wrapper):
            continue  # lora_A / lora_B of an existing wrapper
        if isinstance(module, LoraLinear):
            inside_wrapper += (path + ".",)
        if isinstance(module, (nn.Linear, NF4Linear, LoraLinear)):
            linears.append((path, module))
        elif path:
            others[path] = module

    def matches(path: str, name: str) -> bool:
        return path == name or path.endswith("." + name)

    if names is None:
        selected = [(path, module) for path, module in linears if _DECODER_LAYER.search(path)]
    else:
        selected = []
        short_names = sorted({path.rpartition(".")[2] for path, _ in linears})
        for name in names:
            found = [(path, module) for path, module in linears if matches(path, name)]
            if not found:
                wrong = [f"{path} ({type(module).__name__})" for path, module in others.items() if matches(path, name)]
                message = (f"{name!r} is not a linear layer: {', '.join(wrong[:3])}" if wrong
                           else f"no linear layer is named {name!r}")
                raise ConfigError(message, where="lora.target_modules",
                                  fix=f"use all-linear or names of linear layers: {', '.join(short_names)}")
            selected += [item for item in found if item not in selected]
        order = {path: i for i, (path, _) in enumerate(linears)}
        selected.sort(key=lambda item: order[item[0]])
    if not selected:
        raise ConfigError("the model has no linear layers inside decoder blocks (model.layers.<i>)",
                          where="lora.target_modules", fix="list the linear layers to adapt by name")
    wrapped = [path for path, module in selected if isinstance(module, LoraLinear)]
    if wrapped and not allow_wrapped:
        raise ConfigError(f"adapters are already injected into {wrapped[0]}", where="lora.target_modules",
                          fix="inject adapters once per model")
    return selected


def inject_lora(model: nn.Module, config: LoraConfig, *, adapter_dtype: torch.dtype = torch.float32,
                fast_dropout: bool = False) -> list[str]:
    """Wrap the targeted linear layers in ``LoraLinear`` (in place) and freeze everything but the adapters.

    Returns the wrapped module paths. The adapters are created on each layer's device in ``adapter_dtype``;
    use torch's RNG seed for reproducible initialisation. ``fast_dropout`` (what training uses) draws dropout
    masks from 31-bit integers, about half the cost of torch's; without it the masks equal torch's dropout
    (and so PEFT's) at the same seed.
    """
    config.validate()
    targets = find_target_modules(model, config.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for path, module in targets:
        replace_module(model, path, LoraLinear(module, config, adapter_dtype=adapter_dtype,
                                               fast_dropout=fast_dropout))
    return [path for path, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed by our names (``<path>.lora_A.weight`` ...), sharing storage."""
    state = {}
    for path, module in lora_modules(model).items():
        state[f"{path}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{path}.lora_B.weight"] = module.lora_B.weight.detach()
        if module.lora_magnitude is not None:
            state[f"{path}.lora_magnitude"] = module.lora_magnitude.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, adapter_state: dict[str, torch.Tensor], *, where: str = "adapter") -> None:
    """Copy adapter weights (our names) into an injected model; every adapter tensor must match exactly."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(adapter_state))
    unexpected = sorted(set(adapter_state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"the adapter does not fit this model ({len(missing)} missing, {len(unexpected)} "
                             f"unexpected tensors; {detail})", where=where,
                             fix="load it onto the base model and target modules it was trained with")
    for key, target in expected.items():
        value = adapter_state[key]
        if value.shape != target.shape:
            raise ModelLoadError(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}",
                                 where=where, fix="use the rank and base model the adapter was trained with")
        target.copy_(value)


# -- merging ----------------------------------------------------------------------------------------------
def split_adapter_state(adapter_state: dict[str, torch.Tensor], *, where: str = "adapter",
                        error: type = ExportError) -> dict[str, dict[str, torch.Tensor]]:
    """Group adapter tensors by module path: {path: {"A": ..., "B": ..., ["magnitude": ...]}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        for suffix, part in ADAPTER_SUFFIXES.items():
            if key.endswith("." + suffix):
                modules.setdefault(key[:-len(suffix) - 1], {})[part] = tensor
                break
        else:
            raise error(f"unexpected tensor {key!r} in the adapter", where=where,
                        fix="an adapter holds only lora_A.weight, lora_B.weight and lora_magnitude tensors")
    for path, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise error(f"{path} lacks lora_{'A' if 'A' not in parts else 'B'}.weight", where=where,
                        fix="the adapter file is incomplete; save it again")
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise error(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form B @ A",
                        where=where, fix="the adapter file is corrupt; save it again")
        if "magnitude" in parts and parts["magnitude"].shape != (b.shape[0],):
            raise error(f"{path}: lora_magnitude has shape {tuple(parts['magnitude'].shape)}, "
                        f"expected ({b.shape[0]},)", where=where, fix="the adapter file is corrupt; save it again")
    return modules


@torch.no_grad()
def merge_lora(base_state_dict: dict[str, torch.Tensor], adapter_state_dict: dict[str, torch.Tensor],
               config: LoraConfig, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A new state dict with every adapter folded into its base weight; the inputs are not modified.

    The merge is computed in fp32 from the full-precision base weights (never from NF4 ones) and stored in
    ``dtype`` (default: each base weight's own dtype). Untouched tensors are shared, not copied.
    """
    config.validate()
    merged = dict(base_state_dict)
    for path, parts in split_adapter_state(adapter_state_dict).items():
        key = f"{path}.weight"
        if key not in base_state_dict:
            raise ExportError(f"the adapter targets {path}, which the base model does not have", where=key,
                              fix="merge into the base model the adapter was trained on")
        base = base_state_dict[key]
        if ("magnitude" in parts) != config.use_dora:
            raise ExportError(f"{path}: the adapter is {'DoRA' if 'magnitude' in parts else 'LoRA'} but the config "
                              f"says use_dora={config.use_dora}", where=key,
                              fix="merge with the config the adapter was trained with")
        if parts["A"].shape[0] != config.r:
            raise ExportError(f"{path}: the adapter has rank {parts['A'].shape[0]}, the config r={config.r}",
                              where=key, fix="merge with the config the adapter was trained with")
        expected = (parts["B"].shape[0], parts["A"].shape[1])
        if tuple(base.shape) != expected:
            raise ExportError(f"{path}: base weight {tuple(base.shape)} does not match the adapter's {expected}",
                              where=key, fix="merge into the base model the adapter was trained on")
        weight = base.float() + config.scaling * (parts["B"].float() @ parts["A"].float())
        if "magnitude" in parts:
            weight *= (parts["magnitude"].float() / _row_norm(weight)).unsqueeze(1)
        merged[key] = weight.to(dtype or base.dtype)
    return merged


# -- accounting ---------------------------------------------------------------------------------------------
@dataclass
class PartSize:
    params: int = 0
    bytes: int = 0


@dataclass
class ParameterSummary:
    """Parameter counts and storage by part: adapters, other trainable, frozen dense, frozen NF4."""

    parts: dict[str, PartSize] = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return self.parts["adapters"].params + self.parts["trainable (other)"].params

    @property
    def total_params(self) -> int:
        return sum(part.params for part in self.parts.values())

    @property
    def total_bytes(self) -> int:
        return sum(part.bytes for part in self.parts.values())

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:.1f} MiB"

        parts = ", ".join(f"{name} {part.params:,} ({mib(part.bytes)})" for name, part in self.parts.items()
                          if part.params)
        return (f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
                f"({100 * self.trainable_fraction:.2f}%); weights {mib(self.total_bytes)}: {parts}")


def describe_parameters(model: nn.Module) -> ParameterSummary:
    """Count parameters (NF4 weights by their logical size) and their storage by part; tied weights once."""
    summary = ParameterSummary({name: PartSize() for name in
                                ("adapters", "trainable (other)", "frozen", "frozen NF4")})
    adapter_ids = {id(p) for module in lora_modules(model).values()
                   for p in (module.lora_A.weight, module.lora_B.weight, module.lora_magnitude) if p is not None}
    for param in model.parameters():
        if id(param) in adapter_ids:
            part = "adapters"
        else:
            part = "trainable (other)" if param.requires_grad else "frozen"
        summary.parts[part].params += param.numel()
        summary.parts[part].bytes += param.numel() * param.element_size()
    for module in model.modules():
        if isinstance(module, NF4Weight):
            summary.parts["frozen NF4"].params += module.shape.numel()
            summary.parts["frozen NF4"].bytes += module.nbytes
    return summary


def quantize_base_to_nf4(model: nn.Module, target_modules) -> list[str]:
    """Store the weights of the targeted linear layers as NF4; returns the module paths quantised.

    ``target_modules`` is a list of module names or "all-linear" (as in LoraConfig). Plain ``nn.Linear``
    modules become ``NF4Linear``; already LoRA-wrapped layers keep their adapters and get an NF4 base.
    Quantise before ``inject_lora`` so that DoRA's magnitude starts from the quantised weight.
    """
    quantized = []
    for path, module in find_target_modules(model, target_modules, allow_wrapped=True):
        if isinstance(module, NF4Linear):
            continue
        if isinstance(module, LoraLinear):
            module.quantize_base_()
        else:
            replace_module(model, path, NF4Linear.from_linear(module))
        quantized.append(path)
    if quantized:
        _own_the_rest(model)
    return quantized


def _own_the_rest(model: nn.Module) -> None:
    """Copy the weights left unquantised (embeddings, norms) out of whatever they share storage with: weights
    loaded from safetensors are views of the memory-mapped file, whose pages -- every one of them, touched while
    quantising -- stay resident until no tensor refers to the mapping."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and not isinstance(module, NF4Weight):
                    setattr(module, name, buffer.clone())


class adapters_disabled:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with adapters_disabled(model):`` every LoraLinear computes its frozen base only (LoRA, DoRA and an NF4
    base alike): the model is then the base it was built from, with no second copy in memory -- DPO's
    reference. The adapters are untouched and come back on exit (also after an exception)."""

    def __init__(self, model: nn.Module):
        self.modules = list(lora_modules(model).values())

    def __enter__(self):
        # A flag, not a patched forward: ``project_shared`` (q/k/v, gate/up) calls no module's forward.
        self.previous = [module.adapter_enabled for module in self.modules]
        for module in self.modules:
            module.adapter_enabled = False
        return self

    def __exit__(self, *exc):
        for module, enabled in zip(self.modules, self.previous):
            module.adapter_enabled = enabled
        return False
