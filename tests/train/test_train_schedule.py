"""Learning-rate schedules against their closed forms."""

import math

import pytest
import torch

from homebake.train.schedule import LRSchedule


def test_warmup_is_linear_then_cosine_reaches_min():
    s = LRSchedule(base_lr=1.0, total_steps=110, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert [round(s.lr(i), 6) for i in range(3)] == [0.1, 0.2, 0.3]
    assert s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(110) == pytest.approx(0.1)
    assert s.lr(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = LRSchedule(base_lr=2.0, total_steps=10, kind="linear")
    assert [lin.lr(i) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    const = LRSchedule(base_lr=2.0, total_steps=10, warmup_steps=2, kind="constant")
    assert [const.lr(i) for i in (0, 1, 2, 9)] == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_matches_torch_cosine_annealing_without_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.0)
    ours = LRSchedule(base_lr=0.5, total_steps=20, kind="cosine")
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(ours.lr(step), abs=1e-9)
        opt.step()
        ref.step()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError):
        LRSchedule(base_lr=1.0, total_steps=1, kind="exp")
