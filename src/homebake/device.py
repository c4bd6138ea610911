"""Device and dtype choice, kept generic across cpu / cuda / mps."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}", where="--device", fix="use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", where="--device", fix="use --device cpu or auto")
    return device


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def has_fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls are fast on ``device``: GPUs with bf16, MPS, CPUs with AVX512-BF16 or AMX.

    The one bf16 capability check. Elsewhere (e.g. AVX2-only CPUs) PyTorch emulates bf16 matmuls ~10-100x
    slower than fp32, so fp32 is the fast choice there.
    """
    device = torch.device(device)
    if not supports_bf16(device):
        return False
    if device.type != "cpu":
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    try:  # a torch without the probes: ask the kernel
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device, *, prefer_bf16: bool) -> torch.dtype:
    """`auto` is bf16 where the device supports it and ``prefer_bf16`` holds, else fp32."""
    if name == "auto":
        return torch.bfloat16 if prefer_bf16 and supports_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", where="--dtype", fix="use auto, fp32, bf16 or fp16")
    return DTYPES[name]
