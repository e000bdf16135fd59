"""Batch-norm statistics re-estimated after channels were removed.

Removing channels changes what every later batch norm sees, and its running statistics, kept
from the unpruned model, no longer fit: a one-shot pruned ResNet evaluates near chance although
its remaining filters are fine. :func:`recalibrate_batch_norms` re-estimates them from a few
batches (no weight changes), averaged over the ranks, so that every rank holds the same
statistics and the one-shot accuracy measures the choice of channels, not stale statistics.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dtrain.pruning.agree import all_reduce_scores

__all__ = ["recalibrate_batch_norms"]


@torch.no_grad()
def recalibrate_batch_norms(
    model: nn.Module, batches: Iterable[Tensor], *, group: dist.ProcessGroup | None = None
) -> int:
    """Replace every batch norm's running mean and variance by their average over ``batches``
    (train-mode forward passes, a cumulative average; the weights do not change), then average
    them over the ranks of ``group`` with one all-reduce; returns the number of batch norms (0:
    nothing to do, ``batches`` untouched). Every rank must call it with the same model."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta, was = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative moving average: every batch weighs the same
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was)
    stats: dict[str, Tensor] = {}
    for i, m in enumerate(norms):
        assert m.running_mean is not None and m.running_var is not None
        stats[f"{i}.mean"], stats[f"{i}.var"] = m.running_mean, m.running_var
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        all_reduce_scores(stats, group=group)
        for t in stats.values():
            t.div_(world)
    return len(norms)
