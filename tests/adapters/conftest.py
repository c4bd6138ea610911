"""Fixtures for the adapter tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def input_ids():
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(7))
