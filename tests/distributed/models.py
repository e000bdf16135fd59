"""Small models and data shared by the multi-rank tests."""

import itertools

import torch
from torch import nn


def mlp(seed: int = 0, widths: tuple[int, ...] = (32, 64, 48, 10)) -> nn.Module:
    """An MLP whose weight matrices are compressible and whose biases are dense."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch(rank: int, step: int, n: int = 16, dim: int = 32, classes: int = 10):
    """Different data on every rank and step, the same in every run."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    x, y = batch(rank, step)
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()
