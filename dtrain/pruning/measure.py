"""What a pruned model costs: parameters, MACs and CPU latency."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["latency_ms", "layer_macs", "macs", "nonzero_parameters"]


def layer_macs(model: nn.Module, example: Tensor) -> dict[str, int]:
    """``{module name: multiply-accumulates}`` of one forward pass of ``example`` for every
    module that does any (convolutions, linear layers, ...), from PyTorch's
    ``FlopCounterMode`` (its FLOPs / 2: exact for convolutions and matrix products; batch norm
    and pooling are not counted). The root module is ``""``."""
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, depth=99) as counter:
        model(example)
    model.train(was)
    root = type(model).__name__
    out = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.removeprefix(root + ".")
        out[name] = sum(ops.values()) // 2
    return out


def macs(model: nn.Module, example: Tensor, *, keep: dict[str, Tensor] | None = None) -> int:
    """MACs of one forward pass of ``example``; with ``keep`` (``{"<module>.weight": mask}``),
    each masked module's MACs scaled by the fraction of its weight that is kept (what a sparse
    kernel would do; a dense kernel does them all)."""
    per = layer_macs(model, example)
    total = per.get("", sum(per.values()))
    for name, m in (keep or {}).items():
        module = name.removesuffix(".weight")
        if module in per:
            total -= per[module] - round(per[module] * float(m.float().mean()))
    return total


def nonzero_parameters(model: nn.Module) -> int:
    """Parameters that are not exactly zero."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def latency_ms(
    model: nn.Module | Callable[[Tensor], Any],
    example: Tensor,
    *,
    repeats: int = 20,
    warmup: int = 5,
) -> float:
    """Median wall time in milliseconds of ``model(example)`` (eval mode, no autograd); any
    callable, e.g. an onnxruntime session's run."""
    was = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(example)
        times.append((time.perf_counter() - t0) * 1e3)
    if isinstance(model, nn.Module):
        model.train(was)
    return statistics.median(times)
