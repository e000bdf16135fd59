"""APoZ (Hu et al., 2016): the average percentage of zeros a ReLU outputs, per channel or neuron.

:func:`relu_feeders` finds, by tracing the model with ``torch.fx``, the layers whose output goes
straight into a ReLU (a convolution, a linear layer, or the batch norm after one);
:func:`count_zeros` counts, over batches, how often each of their channels is ``<= 0`` (a zero
after the ReLU); the counts are plain sums, so ranks add them with one all-reduce
(:func:`~dtrain.pruning.agree.all_reduce_scores`). :class:`ApozImportance` hands the result to
Torch-Pruning: the channels with the highest APoZ are removed first.
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ApozImportance", "count_zeros", "relu_feeders"]

_FEEDS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def relu_feeders(model: nn.Module) -> list[str]:
    """Names of the modules whose output is the input of a ReLU (``F.relu``, ``torch.relu`` or
    ``nn.ReLU``), in model order. Raises ``torch.fx`` errors for untraceable models."""
    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    found = []
    for node in graph.nodes:
        relu = (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
            node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.ReLU)
        )
        if not relu or not node.args:
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            name = str(src.target)
            if isinstance(modules.get(name), _FEEDS) and name not in found:
                found.append(name)
    order = list(modules)
    return sorted(found, key=order.index)


@torch.no_grad()
def count_zeros(model: nn.Module, names: list[str], batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """``{name: [zeros per channel..., outputs per channel]}`` (float64) over ``batches``, in
    eval mode: channel = dimension 1 of each output, every other dimension counted."""
    modules = dict(model.named_modules())
    counts: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str) -> Any:
        def count(_m: nn.Module, _i: Any, out: Tensor) -> None:
            dims = [d for d in range(out.dim()) if d != 1]
            zeros = (out <= 0).sum(dim=dims).double()
            c = counts.setdefault(name, torch.zeros(out.shape[1] + 1, dtype=torch.float64))
            c[:-1] += zeros.to(c.device)
            c[-1] += out.numel() / out.shape[1]

        return count

    for n in names:
        hooks.append(modules[n].register_forward_hook(hook(n)))
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return counts


class ApozImportance:
    """A Torch-Pruning importance from APoZ: for each group, minus the APoZ of the layer in it
    that feeds a ReLU (its out-channel item); groups without one are left whole (None).

    Args:
        apoz: ``{module name: APoZ per channel}`` (zeros / outputs, from :func:`count_zeros`).
        names: the dependency graph's ``module -> name`` map (``DependencyGraph._module2name``),
            set by :func:`~dtrain.pruning.structured.plan_channels`.
    """

    def __init__(self, apoz: dict[str, Tensor]) -> None:
        self.apoz = apoz
        self.names: dict[nn.Module, str] = {}

    def __call__(self, group: Any) -> Tensor | None:
        root = group[0].idxs
        for item in group:
            name = self.names.get(item.dep.target.module)
            if name in self.apoz and "out_channels" in item.dep.handler.__qualname__:
                score = torch.zeros(len(root), dtype=torch.float64)
                score[torch.as_tensor(item.root_idxs)] = -self.apoz[name][
                    torch.as_tensor(item.idxs)
                ]
                return score
        return None
