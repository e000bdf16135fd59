"""Structured channel pruning with physical removal, on Torch-Pruning's dependency graph.

Torch-Pruning (``torch-pruning``, the ``prune`` extra) traces the model and groups the layers
whose channels must go together (a convolution's outputs, its batch norm, the next layer's
inputs, both sides of a residual add, the features a flatten feeds). :func:`plan_channels`
scores the groups and returns which channels each would remove, changing nothing, so that the
choice can be compared across ranks first; :func:`apply_plan` removes them; :func:`check_removal`
proves the smaller model computes what the original computes with those channels zeroed (a
dependency graph that misread the model, e.g. a zero-padding shortcut, fails it);
:func:`rebuild` replays the saved history on a freshly built model (the pruned architecture
from plain data, ``torch.load(weights_only=True)``).
"""

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.models.vision import ZeroPadShortcut

__all__ = [
    "CHANNEL_IMPORTANCES",
    "GROUPS",
    "ChannelPlan",
    "apply_plan",
    "check_removal",
    "kept_indices",
    "plan_channels",
    "rebuild",
    "widths",
]

CHANNEL_IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "apoz")
"""``l1``/``l2``: the norm of each channel's weights (filters) over the group; ``taylor``: the
first-order Taylor estimate |w · dL/dw| (needs gradients in ``.grad``, the same on every rank);
``bn_scale``: |γ| of the batch norms (Network Slimming); ``apoz``: the average percentage of
zeros after the ReLU a layer feeds (:mod:`dtrain.pruning.apoz`; pass an
:class:`~dtrain.pruning.apoz.ApozImportance`)."""


GROUPS = ("all", "blocks", "stages")
"""Which channel groups are pruned: ``all``; ``stages``: only those a residual add shares (a
ResNet stage's width: the stem, every block's second convolution and the shortcuts of a
stage lose the same channels); ``blocks``: only the others (the channels inside blocks)."""


def _tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError as e:  # the extra is not installed
        raise ImportError(
            "structured pruning needs Torch-Pruning: pip install 'dtrain[prune]'"
        ) from e
    return tp


def _importance(name: str) -> Any:
    tp = _tp()
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "apoz":
        raise ValueError("importance 'apoz' needs the counts: pass an ApozImportance")
    raise ValueError(f"importance must be one of {', '.join(CHANNEL_IMPORTANCES)}, got {name!r}")


def _shortcut_pruner() -> Any:
    """Torch-Pruning's pruner of :class:`~dtrain.models.vision.ZeroPadShortcut`: its inputs and
    outputs are removed independently (like a convolution's), the placement follows."""
    tp = _tp()

    class ShortcutPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[name-defined]
        TARGET_MODULES = (ZeroPadShortcut,)

        def prune_out_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> nn.Module:
            keep = _renumber(layer.out_channels, idxs)
            pairs = [(s, keep[d]) for s, d in _pairs(layer) if d in keep]
            layer.out_channels = len(keep)
            return _place(layer, pairs)

        def prune_in_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> nn.Module:
            keep = _renumber(layer.in_channels, idxs)
            pairs = [(keep[s], d) for s, d in _pairs(layer) if s in keep]
            layer.in_channels = len(keep)
            return _place(layer, pairs)

        def get_out_channels(self, layer: ZeroPadShortcut) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: ZeroPadShortcut) -> int:
            return layer.in_channels

    return ShortcutPruner()


def _renumber(size: int, removed: Sequence[int]) -> dict[int, int]:
    gone = {int(i) for i in removed}
    return {old: new for new, old in enumerate(i for i in range(size) if i not in gone)}


def _pairs(layer: ZeroPadShortcut) -> list[tuple[int, int]]:
    return list(zip(layer.src.tolist(), layer.dst.tolist(), strict=True))


def _place(layer: ZeroPadShortcut, pairs: list[tuple[int, int]]) -> ZeroPadShortcut:
    device = layer.src.device
    layer.src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
    layer.dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
    return layer


def _custom_pruners() -> dict[type, Any]:
    return {ZeroPadShortcut: _shortcut_pruner()}


def _shared(group: Any) -> bool:
    """Whether a residual add shares the group's channels."""
    return any(
        type(dep.target.module).__name__ == "_ElementWiseOp"
        and str(getattr(dep.target.module, "_grad_fn", "")).startswith("AddBackward")
        for dep, _ in group
    )


class ChannelPlan:
    """The channels a pruner would remove, per group, before anything changes.

    Attributes:
        groups: Torch-Pruning's groups, applied by :func:`apply_plan`.
        items: per group, ``(layer name, what is pruned, removed indices)`` of every layer it
            touches (e.g. ``("conv1", "ConvPruner.prune_out_channels", [0, 5, ...])``).
        graph: the dependency graph (its ``pruning_history()`` once applied).
    """

    def __init__(self, groups: list[Any], graph: Any) -> None:
        self.groups, self.graph = groups, graph
        names = graph._module2name
        self.items: list[list[tuple[str, str, list[int]]]] = [
            [
                (names[dep.target.module], dep.handler.__qualname__, sorted(int(i) for i in idxs))
                for dep, idxs in group
                if isinstance(dep.target.module, nn.Module) and dep.target.module in names
            ]
            for group in groups
        ]

    def index_tensors(self) -> dict[str, Tensor]:
        """``{"<root layer>:<what>": removed indices}`` of each group (for
        :func:`~dtrain.pruning.agree.verify_identical`)."""
        return {
            f"{items[0][0]}:{items[0][1]}": torch.tensor(items[0][2], dtype=torch.int64)
            for items in self.items
            if items
        }

    def removed(self) -> int:
        """Channels removed (counted once per group)."""
        return sum(len(items[0][2]) for items in self.items if items)


def plan_channels(
    model: nn.Module,
    example: Tensor,
    *,
    importance: str | Any,
    ratio: float,
    global_pruning: bool,
    round_to: int = 1,
    ignored: Sequence[nn.Module] = (),
    groups: str = "all",
) -> ChannelPlan:
    """Score ``model``'s channel groups and choose the ``ratio`` fraction to remove from each
    (``global_pruning``: the lowest-scoring across all groups, scores normalised per group);
    nothing changes until :func:`apply_plan`.

    Args:
        model: the model (its ``.grad`` filled for ``importance="taylor"``).
        example: an input batch for tracing.
        importance: one of :data:`CHANNEL_IMPORTANCES` but ``apoz``, or an importance object
            (an :class:`~dtrain.pruning.apoz.ApozImportance`: groups it scores None stay whole).
        ratio: fraction of each group's channels removed, in [0, 1).
        global_pruning: rank all groups together.
        round_to: keep a multiple of this many channels (Torch-Pruning rounds down; a group
            that would keep none is left whole).
        ignored: modules whose outputs are never pruned (the classifier, say).
        groups: one of :data:`GROUPS`.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {', '.join(GROUPS)}, got {groups!r}")
    tp = _tp()
    imp = _importance(importance) if isinstance(importance, str) else importance
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example,
        importance=imp,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        round_to=round_to if round_to > 1 else None,
        ignored_layers=list(ignored),
        customized_pruners=_custom_pruners(),
    )
    if groups != "all":  # leave the other kind whole: ignore their root layers
        pruner.ignored_layers.extend(
            found[0].dep.target.module
            for found in pruner.DG.get_all_groups(
                ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
            )
            if _shared(found) != (groups == "stages")
        )
    if hasattr(imp, "names"):  # ApozImportance: scores are kept by layer name
        imp.names = pruner.DG._module2name
    chosen = list(pruner.step(interactive=True)) if ratio > 0 else []
    return ChannelPlan(chosen, pruner.DG)


def apply_plan(plan: ChannelPlan) -> list[Any]:
    """Remove the planned channels (the modules are resized in place: their parameters are new
    tensors, so build a new optimizer and DDP afterwards); returns the pruning history, plain
    lists of names, flags and indices."""
    for group in plan.groups:
        group.prune()
    return copy.deepcopy(plan.graph.pruning_history())


@torch.no_grad()
def check_removal(
    original: nn.Module, pruned: nn.Module, plan: ChannelPlan, example: Tensor
) -> float:
    """The largest difference between ``pruned(example)`` and ``original(example)`` with the
    removed channels zeroed (output rows of convolutions and linear layers, batch norms' scale
    and shift, a zero-padding shortcut's outputs), both in eval mode: ~1e-6 when the dependency
    graph read the model right."""
    ref = copy.deepcopy(original).eval()
    modules = dict(ref.named_modules())
    for items in plan.items:
        for name, what, idxs in items:
            m, at = modules[name], torch.tensor(idxs, dtype=torch.long)
            out = "out_channels" in what
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias):
                    if t is not None:
                        t[at] = 0
            elif out and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                m.weight[at] = 0
                if m.bias is not None:
                    m.bias[at] = 0
            elif out and isinstance(m, ZeroPadShortcut):
                gone = set(idxs)
                _place(m, [(s, d) for s, d in _pairs(m) if d not in gone])
    was = pruned.training
    pruned.eval()
    diff = float((pruned(example) - ref(example)).abs().max())
    pruned.train(was)
    return diff


def rebuild(model: nn.Module, history: list[Any], example: Tensor) -> nn.Module:
    """``model`` (freshly built, unpruned) resized as ``history`` says, in place; returns it."""
    graph = (
        _tp()
        .DependencyGraph()
        .build_dependency(model, example_inputs=example, customized_pruners=_custom_pruners())
    )
    graph.load_pruning_history(history)
    return model


def kept_indices(original: nn.Module, history: list[Any], example: Tensor) -> dict[str, Tensor]:
    """Where each parameter's remaining entries were: ``{name: positions}``, the flat positions
    (memory order) in ``original``'s parameter of the entries the parameter pruned by
    ``history`` keeps, in its own memory order (to slice momentum and residuals like the
    weights). ``original`` is left as it is: the history is replayed on a float64 copy whose
    entries hold their own positions (exact up to 2**53)."""
    ids = copy.deepcopy(original).to(torch.float64)
    with torch.no_grad():
        for p in ids.parameters():
            _memory_order(p).copy_(torch.arange(p.numel(), dtype=torch.float64, device=p.device))
    rebuild(ids, history, example.to(torch.float64) if example.is_floating_point() else example)
    return {n: _memory_order(p).to(torch.int64) for n, p in ids.named_parameters()}


def _memory_order(p: Tensor) -> Tensor:
    w = p.detach()
    return w.view(-1) if w.is_contiguous() else w.as_strided((w.numel(),), (1,))


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every convolution and linear layer, by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out
