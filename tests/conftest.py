"""Shared fixtures. Tests never reach a model hub (HF_HUB_OFFLINE is forced on)."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the default model GGUF from the cache `homebake setup` fills.

    Skipped when absent on a developer machine; in CI (HOMEBAKE_REQUIRE_DEFAULT_MODEL=1) absence fails.
    """
    from homebake.default_model import default_model_path

    path = default_model_path()
    if not path.is_file():
        if os.environ.get("HOMEBAKE_REQUIRE_DEFAULT_MODEL") == "1":
            pytest.fail(f"default model missing at {path}; run scripts/setup.sh")
        pytest.skip("default model not fetched; run scripts/setup.sh")
    return path


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny models gain nothing from threads, and on a shared 2-core
    machine OpenMP spinning makes them many times slower. Folders of tiny-model tests use it autouse."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
