"""Helpers for the adapter tests: tiny host models and PEFT twins (transformers/peft are test-only references)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_model(variant: str = "llama", seed: int = 0):
    """A random 2-layer transformers model (hidden 64, O(1) weights) with homebake's decoder module names.

    "qwen2" has q/k/v biases and tied embeddings.
    """
    from tiny_models import build_tiny_hf_model, tiny_hf_config

    return build_tiny_hf_model(tiny_hf_config(variant), seed=seed)


def peft_twin(base_model, config, module_paths):
    """A PEFT model over a copy of ``base_model`` with the same LoRA settings as our ``config``."""
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(module_paths),
        use_rslora=config.use_rslora, use_dora=config.use_dora, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(base_model), peft_config)


def randomize_adapters(model, seed: int = 1) -> None:
    """Give every adapter non-trivial weights (B = 0 would hide most bugs)."""
    from homebake.adapters.lora import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            for param in (module.lora_A.weight, module.lora_B.weight):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if module.lora_magnitude is not None:
                module.lora_magnitude.mul_(1 + 0.3 * torch.rand(module.lora_magnitude.shape, generator=generator))


def copy_adapters_into_peft(ours, peft_model) -> None:
    """Copy our adapter weights into the PEFT model's "default" adapter."""
    from homebake.adapters.lora import lora_modules

    with torch.no_grad():
        for path, module in lora_modules(ours).items():
            twin = peft_model.base_model.model.get_submodule(path)
            twin.lora_A["default"].weight.copy_(module.lora_A.weight)
            twin.lora_B["default"].weight.copy_(module.lora_B.weight)
            if module.lora_magnitude is not None:
                twin.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude)
