"""Optimizers and learning-rate schedules, built from an :class:`~dtrain.config.OptimConfig`."""

import math
from collections.abc import Callable

import torch
from torch import nn

from dtrain.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "schedule"]


def _param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    """Two groups: weights with decay; norms and biases (1-D) without, unless asked."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over ``model``'s trainable parameters."""
    groups = _param_groups(cfg, model)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    beta1, beta2 = cfg.betas  # two: OptimConfig checks
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2))


def lr_factor(cfg: OptimConfig, step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step``: linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        frac = step / max(1, total_steps)
        return cfg.gamma ** sum(frac >= m for m in cfg.milestones)
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def schedule(cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The run's learning-rate multiplier as a function of the optimizer step (warm-up given
    in epochs; ``cfg.cycles`` > 1: the schedule restarts every ``ceil(total / cycles)`` steps):
    what :func:`build_scheduler` applies, for planning ahead (DGC's density)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    length = math.ceil(total_steps / cfg.cycles)
    return lambda step: lr_factor(cfg, step % length, total_steps=length, warmup_steps=warmup)


def build_scheduler(
    cfg: OptimConfig,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step, by :func:`schedule`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    )
