"""The pruning job's channel path: structured pruning of the trainer's model on every rank alike.

:func:`prune_channels` scores the channel groups (Taylor: gradients of a few batches per rank,
all-reduced first, so every rank scores the same), checks that every rank chose the same channels
(one all-reduce of digests) before any weight changes, removes them, proves the smaller model is
the original with those channels zeroed, and rebuilds DDP, the optimizer and the hook.
"""

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dtrain.errors import UserError
from dtrain.pruning import Disagreement, verify_identical
from dtrain.pruning.agree import all_reduce_scores
from dtrain.pruning.apoz import ApozImportance, count_zeros, relu_feeders
from dtrain.pruning.recalibrate import recalibrate_batch_norms
from dtrain.pruning.structured import (
    apply_plan,
    check_removal,
    kept_indices,
    plan_channels,
    rebuild,
)
from dtrain.trainer import Trainer

__all__ = [
    "apoz_importance",
    "example_input",
    "ignored_modules",
    "prune_channels",
    "rebuild_from",
    "recalibrate",
    "taylor_grads",
]

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-3  # of check_removal, relative to the outputs' scale


def example_input(shape: list[int] | tuple[int, ...], device: torch.device) -> Tensor:
    """A batch of two inputs of ``shape`` for tracing (images: floats; text: token 0)."""
    if len(shape) == 1:  # token ids
        return torch.zeros(2, *shape, dtype=torch.long, device=device)
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)


def ignored_modules(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The modules whose outputs stay whole: ``names`` and the output layer (the last linear or
    convolution: its outputs are the classes)."""
    modules = dict(model.named_modules())
    out = [modules[n] for n in names]
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if layers:
        out.append(layers[-1])
    return out


def taylor_grads(trainer: Trainer, batches: int) -> None:
    """Fill ``.grad`` of the model's parameters with the mean gradient of ``batches`` training
    batches on every rank, all-reduced: the Taylor scores are then the same everywhere (on each
    rank's own gradients they pick different channels)."""
    model = trainer.model
    model.zero_grad(set_to_none=False)
    it = trainer.train_loader.epoch_batches(0)
    for _ in range(batches):
        x, y = next(it)
        x, y = x.to(trainer.info.device), y.to(trainer.info.device)
        loss, _, _ = trainer._loss(model(x), y)
        (loss / batches).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        pos = 0
        for g in grads:
            g.copy_(flat[pos : pos + g.numel()].view_as(g))
            pos += g.numel()


def recalibrate(trainer: Trainer, batches: int) -> bool:
    """Re-estimate the batch norms' statistics of the trainer's model from ``batches`` training
    batches per rank, averaged over the ranks; False if it has no batch norm."""
    it = trainer.train_loader.epoch_batches(0)
    device = trainer.info.device
    xs = (next(it)[0].to(device) for _ in range(batches))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws: the run's RNG stays as it was
        return recalibrate_batch_norms(trainer.model, xs) > 0


def apoz_importance(trainer: Trainer) -> ApozImportance:
    """APoZ of every layer that feeds a ReLU, counted over the held-out set on every rank (each
    its shard) and summed with one all-reduce: the same scores on every rank (the job's check
    made sure there are such layers)."""
    model = trainer.model
    names = relu_feeders(model)
    device = trainer.info.device
    batches = (x.to(device) for x, _ in trainer.test_loader.eval_batches())
    counts = all_reduce_scores(count_zeros(model, names, batches))
    return ApozImportance({n: c[:-1] / c[-1].clamp(min=1) for n, c in counts.items()})


def prune_channels(
    trainer: Trainer,
    *,
    importance: str,
    ratio: float,
    global_pruning: bool,
    round_to: int,
    ignore: tuple[str, ...],
    taylor_batches: int,
    groups: str = "all",
    rebuild: bool = True,
) -> list[Any]:
    """Remove ``ratio`` of the channels of the trainer's model (see the module docstring) and
    (``rebuild``) rebuild DDP, optimizer and hook, carrying over the optimizer's and the DGC
    hook's state of the entries that remain (sliced like the weights); returns the pruning
    history.

    Raises:
        UserError: the ranks disagree, a layer would lose every channel, or the dependency
            graph misread the model.
    """
    model = trainer.model
    example = example_input(trainer.data.info.in_shape, trainer.info.device)
    if importance == "taylor":
        taylor_grads(trainer, taylor_batches)
    scorer: Any = apoz_importance(trainer) if importance == "apoz" else importance
    original = copy.deepcopy(model)
    plan = plan_channels(
        model, example, importance=scorer, ratio=ratio, global_pruning=global_pruning,
        round_to=round_to, ignored=ignored_modules(model, ignore), groups=groups,
    )  # fmt: skip
    try:
        verify_identical(plan.index_tensors(), what="removed channels", device=example.device)
    except Disagreement as e:
        raise UserError(str(e)) from None
    modules = dict(model.named_modules())
    for items in plan.items:
        name, what, idxs = items[0]
        m = modules[name]
        size = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        if "out_" in what and len(idxs) >= size:
            raise UserError(
                f"prune.sparsity = {ratio} would remove every channel of {name}: lower it, use "
                f"prune.scope = 'layer', or add {name} to prune.ignore"
            )
    before = dict(model.named_parameters())
    history = apply_plan(plan)
    model.zero_grad(set_to_none=True)
    try:
        diff = check_removal(original, model, plan, example)
        with torch.no_grad():
            scale = float(original.eval()(example).abs().max()) or 1.0
    except RuntimeError as e:  # shapes that no longer meet
        diff, scale = float("inf"), 1.0
        logger.warning("pruned model does not run: %s", e)
    if not diff <= _TOLERANCE * scale:
        raise UserError(
            f"Torch-Pruning's dependency graph misread {trainer.cfg.model.name} (the pruned "
            f"model differs from the original with the removed channels zeroed by {diff:.3g}): "
            f"add the layers around the culprit to prune.ignore"
        )
    if not rebuild:  # a trial on a copy (the report's one-shot curve)
        return history
    kept = kept_indices(original, history, example)
    trainer.rebuild(carry={n: (before[n], at) for n, at in kept.items()})
    if trainer.info.is_main:
        logger.info(
            "removed %d channels in %d groups (%s, %s); check: max difference %.2g",
            plan.removed(), len(plan.items), importance,
            "global" if global_pruning else "per layer", diff,
        )  # fmt: skip
    return history


def rebuild_from(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """``model`` resized to the architecture a prune job's state records (its history): the
    removals beyond those ``model`` already had (``model.pruning_history``, e.g. a
    channel-pruned source's) are replayed."""
    history = list(state.get("history") or [])
    done = list(getattr(model, "pruning_history", []))
    if history[: len(done)] != done:
        raise UserError("the checkpoint's pruning history does not extend its source's")
    if history[len(done) :]:
        example = example_input(state["example_shape"], torch.device("cpu"))
        rebuild(model, history[len(done) :], example)
    setattr(model, "pruning_history", history)  # noqa: B010 (a plain attribute of nn.Module)
    return model
