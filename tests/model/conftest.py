"""Fixtures for the model-layer tests: tiny random checkpoints saved once per session, per variant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(variant) -> folder with config.json + model.safetensors, built once per variant."""
    from tiny_models import save_tiny_hf_model

    cache: dict[str, Path] = {}

    def make(variant: str = "llama") -> Path:
        if variant not in cache:
            cache[variant] = save_tiny_hf_model(tmp_path_factory.mktemp(variant) / "model", variant, seed=0)
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def hf_reference(tiny_dir):
    """hf_reference(variant) -> the transformers model saved in tiny_dir(variant), loaded once."""
    from tiny_models import load_hf_reference

    cache: dict = {}

    def get(variant: str = "llama"):
        if variant not in cache:
            cache[variant] = load_hf_reference(tiny_dir(variant))
        return cache[variant]

    return get


@pytest.fixture
def token_ids():
    return torch.randint(3, 320, (2, 13), generator=torch.Generator().manual_seed(7))
