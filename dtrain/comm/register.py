"""The two-line path for existing DDP code: ``register_dgc(ddp_model, optimizer)``."""

import logging
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dtrain.comm.dgc import DGCState, dgc_hook
from dtrain.comm.hierarchical import HierarchicalDGCState, hierarchical_dgc_hook

__all__ = ["register_dgc", "unwrap_ddp"]

logger = logging.getLogger(__name__)


def unwrap_ddp(model: torch.nn.Module) -> DistributedDataParallel:
    """The DDP module behind ``model`` (unwrapping ``torch.compile``), or TypeError."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(inner, DistributedDataParallel):
        raise TypeError(
            f"DGC needs a DistributedDataParallel model, got {type(inner).__name__}: "
            f"wrap it first, e.g. DistributedDataParallel(model)"
        )
    return inner


def _momentum_from(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """Hook momentum and Nesterov of the optimizer (SGD: its own, others: 0); changes nothing."""
    if not isinstance(optimizer, torch.optim.SGD):
        kind = type(optimizer).__name__
        logger.info(
            "DGC: %s keeps its own moment estimates; hook momentum is 0 (error feedback only)", kind
        )
        return 0.0, False
    groups = optimizer.param_groups
    momenta = {float(g["momentum"]) for g in groups}
    nesterovs = {bool(g["nesterov"]) for g in groups}
    dampenings = {float(g["dampening"]) for g in groups}
    if len(momenta) > 1 or len(nesterovs) > 1:
        raise ValueError(
            f"DGC applies one momentum to every parameter, but the SGD param groups "
            f"have momentum {sorted(momenta)} / nesterov {sorted(nesterovs)}: "
            f"use one value in all groups"
        )
    if dampenings != {0.0}:
        raise ValueError(
            f"DGC's momentum correction has no dampening, but SGD has dampening "
            f"{sorted(dampenings)}: set dampening=0"
        )
    return momenta.pop(), nesterovs.pop()


def _move_momentum(
    optimizer: torch.optim.Optimizer,
    momentum: float,
    nesterov: bool,
    *,
    compensate_weight_decay: bool,
) -> None:
    """Set SGD's momentum to 0 (it now lives in the hook), compensating weight decay."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for g in optimizer.param_groups:  # momentum now lives in the hook: not to be applied twice
        g["momentum"] = 0.0
        g["nesterov"] = False
        if compensate_weight_decay and momentum > 0 and g["weight_decay"]:
            # SGD with momentum m applies weight decay through its momentum buffer, which
            # amplifies it by 1/(1-m) in steady state; without optimizer momentum the same
            # decay needs a 1/(1-m) larger factor.
            logger.info(
                "DGC: SGD weight decay %g -> %g (x 1/(1-m)): it no longer passes through momentum",
                g["weight_decay"],
                g["weight_decay"] / (1.0 - momentum),
            )
            g["weight_decay"] = g["weight_decay"] / (1.0 - momentum)
    optimizer.defaults["momentum"] = 0.0
    optimizer.defaults["nesterov"] = False
    logger.info(
        "DGC: moved SGD momentum %g (nesterov=%s) into the hook; optimizer momentum set to 0",
        momentum,
        nesterov,
    )


def register_dgc(
    ddp_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grad_scaler: Any = None,
    compensate_weight_decay: bool = True,
    hierarchical_local_size: int | None = None,
    **dgc_kwargs: Any,
) -> DGCState | HierarchicalDGCState:
    """Register the DGC hook on ``ddp_model`` and move the optimizer's momentum into it.

    Args:
        ddp_model: a ``DistributedDataParallel`` model (or ``torch.compile`` of one) without a
            communication hook.
        optimizer: the model's optimizer. SGD: its momentum and Nesterov flag move into the hook
            and its own momentum becomes 0. Adam/AdamW and others: hook momentum 0.
        grad_scaler: a ``torch.amp.GradScaler`` used with this model, so that residuals follow
            loss-scale changes and clipping works in unscaled units.
        compensate_weight_decay: with SGD momentum m moved into the hook, multiply each param
            group's weight decay by 1/(1-m), so that decay keeps the strength it had when it
            passed through SGD's momentum buffer (weight decay stays in the optimizer, as
            DGC.md fixes; it is never communicated).
        hierarchical_local_size: ranks per node: dense averaging inside each node and DGC only
            across nodes (:mod:`dtrain.comm.hierarchical`); None for flat DGC.
        **dgc_kwargs: the other :class:`DGCState` arguments (density, clip_norm, exchange, ...).

    Returns:
        The registered :class:`DGCState` (save its ``state_dict()`` per rank).

    Example::
        >>> ddp = DistributedDataParallel(model)
        >>> opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        >>> state = register_dgc(ddp, opt, density=0.001)
    """
    ddp = unwrap_ddp(ddp_model)
    for key in ("momentum", "nesterov"):
        if key in dgc_kwargs:
            raise TypeError(
                f"register_dgc takes {key} from the optimizer; set it there "
                f"(or build DGCState yourself)"
            )
    if ddp._comm_hooks:
        raise RuntimeError(
            "this DDP model already has a communication hook; DDP allows one: "
            "register DGC on a freshly built DDP model"
        )
    # Validate everything (optimizer, DGC arguments, the hook slot) before the optimizer changes:
    # a refused call leaves it as it was.
    momentum, nesterov = _momentum_from(optimizer)
    hook: Any = dgc_hook
    if hierarchical_local_size is None:
        dgc_kwargs.setdefault("process_group", ddp.process_group)
        state: Any = DGCState(momentum=momentum, nesterov=nesterov, **dgc_kwargs)
    else:
        state = HierarchicalDGCState(
            local_size=hierarchical_local_size, momentum=momentum, nesterov=nesterov, **dgc_kwargs
        )
        hook = hierarchical_dgc_hook
    state.grad_scaler = grad_scaler
    state.attach(ddp.module.named_parameters())
    try:
        ddp.register_comm_hook(state, hook)
    except RuntimeError as e:  # a built-in hook is not listed in _comm_hooks
        raise RuntimeError(f"this DDP model already has a communication hook ({e})") from None
    _move_momentum(optimizer, momentum, nesterov, compensate_weight_decay=compensate_weight_decay)
    logger.info("DGC: %s registered on %s", hook.__name__, type(ddp.module).__name__)
    return state
