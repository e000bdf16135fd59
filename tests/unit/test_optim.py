"""Optimizer param groups and LR schedules."""

import itertools

import pytest
import torch
from torch import nn

from dtrain.config import OptimConfig
from dtrain.optim import build_optimizer, build_scheduler, lr_factor


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_norms_and_biases_get_no_weight_decay_unless_asked():
    opt = build_optimizer(OptimConfig(weight_decay=0.1), _model())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    opt = build_optimizer(OptimConfig(weight_decay=0.1, decay_norm_and_bias=True), _model())
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 6


def test_sgd_and_adamw():
    sgd = build_optimizer(OptimConfig(momentum=0.8, nesterov=True), _model())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adamw = build_optimizer(OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9)), _model())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)


def test_warmup_then_cosine_to_zero():
    cfg = OptimConfig(schedule="cosine")
    f = [lr_factor(cfg, s, total_steps=110, warmup_steps=10) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert (
        f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0)
    )
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_step_schedule_and_constant():
    cfg = OptimConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    f = [lr_factor(cfg, s, total_steps=100, warmup_steps=0) for s in (0, 49, 50, 74, 75, 99)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(OptimConfig(schedule="constant"), 77, total_steps=100, warmup_steps=0) == 1


def test_scheduler_follows_lr_factor_and_restores():
    cfg = OptimConfig(lr=0.2, warmup_epochs=1.0)
    opt = build_optimizer(cfg, _model())
    sched = build_scheduler(cfg, opt, total_steps=50, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    opt2 = build_optimizer(cfg, _model())
    sched2 = build_scheduler(cfg, opt2, total_steps=50, steps_per_epoch=5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
