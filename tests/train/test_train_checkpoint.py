"""Checkpoints: a save/load round trip continues training bit for bit; pruning keeps last K + best."""

import random

import numpy as np
import pytest
import torch

from homebake.errors import ConfigError
from homebake.train.checkpoint import (TrainerState, latest_checkpoint, list_checkpoints, load_checkpoint,
                                       prune_checkpoints, save_checkpoint)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))


def train_steps(model, opt, n):
    losses = []
    for _ in range(n):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean() + random.random() * 0 + float(np.random.rand()) * 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    params = dict(model.named_parameters())
    path = save_checkpoint(tmp_path, TrainerState(step=3, param_names=list(params)), params, opt)
    expected = train_steps(model, opt, 4)
    expected_py, expected_np = random.random(), np.random.rand()

    model2 = make_model(seed=99)  # different weights, overwritten by the checkpoint
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(12345), random.seed(7), np.random.seed(7)  # different RNG, restored by the checkpoint
    state = load_checkpoint(path, dict(model2.named_parameters()), opt2)
    assert state.step == 3
    assert train_steps(model2, opt2, 4) == expected
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)


def test_mismatched_parameters_are_refused(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    params = dict(model.named_parameters())
    path = save_checkpoint(tmp_path, TrainerState(step=1, param_names=list(params)), params, opt)
    other = {"0.weight": params["0.weight"]}
    with pytest.raises(ConfigError, match="different parameters"):
        load_checkpoint(path, other, torch.optim.AdamW(other.values()))


def test_prune_keeps_last_k_and_best(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    params = dict(model.named_parameters())
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, TrainerState(step=step), params, opt)
    (tmp_path / "checkpoints" / ".step-00000060.abc.tmp").mkdir()  # an interrupted write is never listed
    prune_checkpoints(tmp_path, keep_last=2, best_step=20)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert latest_checkpoint(tmp_path).name == "step-00000050"
