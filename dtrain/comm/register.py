"""The two-line path for existing DDP code: ``register_dgc(ddp_model, optimizer)``."""

import logging
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dtrain.comm.dgc import DGCState, dgc_hook
from dtrain.comm.hierarchical import HierarchicalDGCState, hierarchical_dgc_hook

__all__ = ["prepare_dgc", "register_dgc", "unwrap_ddp"]

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


# What register_dgc moved out of an SGD param group, kept in the group itself: the optimizer's
# state_dict() carries it, so an optimizer converted before (a second registration, or a saved
# converted state loaded before register_dgc) gives back its momentum and decay exactly.
_MARKS = ("dgc_momentum", "dgc_nesterov", "dgc_weight_decay")
WEIGHT_DECAY_MODES = ("momentum", "scaled", "optimizer")


def _settings_from(optimizer: torch.optim.Optimizer) -> tuple[float, bool, list[float]]:
    """Hook momentum, Nesterov and each group's original weight decay (SGD: its own or what an
    earlier ``register_dgc`` moved; others: momentum 0); changes nothing."""
    groups = optimizer.param_groups
    if not isinstance(optimizer, torch.optim.SGD):
        kind = type(optimizer).__name__
        logger.info(
            "DGC: %s keeps its own moment estimates; hook momentum is 0 (error feedback only)", kind
        )
        return 0.0, False, [float(g.get("weight_decay", 0.0)) for g in groups]
    marked = [all(k in g for k in _MARKS) for g in groups]
    if any(marked):
        if not all(marked):
            raise ValueError(
                "some SGD param groups were converted by an earlier register_dgc and others "
                "not: build the optimizer anew, or load a state saved with the same groups"
            )
        moved = sorted({float(g["momentum"]) for g in groups} - {0.0})
        if moved:
            raise ValueError(
                f"this SGD optimizer was converted by an earlier register_dgc (its momentum "
                f"lives in the hook), but its momentum is now {moved}: set it in the optimizer "
                f"before the first register_dgc only"
            )
        momentum, nesterov = float(groups[0]["dgc_momentum"]), bool(groups[0]["dgc_nesterov"])
        logger.info(
            "DGC: the optimizer was converted by an earlier register_dgc: its momentum %g "
            "(nesterov=%s) and weight decay are taken from what that call moved",
            momentum,
            nesterov,
        )
    prefix = "dgc_" if any(marked) else ""  # read what was moved, or the optimizer's own
    momenta = {float(g[f"{prefix}momentum"]) for g in groups}
    nesterovs = {bool(g[f"{prefix}nesterov"]) for g in groups}
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
    decays = [float(g[f"{prefix}weight_decay"]) for g in groups]
    return momenta.pop(), nesterovs.pop(), decays


def _move_momentum(
    optimizer: torch.optim.Optimizer,
    momentum: float,
    nesterov: bool,
    decays: list[float],
    *,
    weight_decay: str,
) -> None:
    """Set SGD's momentum to 0 (it now lives in the hook) and its weight decay by the mode,
    remembering in each param group what was moved."""
    if not isinstance(optimizer, torch.optim.SGD) or momentum == 0.0:
        return
    for g, wd in zip(optimizer.param_groups, decays, strict=True):
        g.update(dgc_momentum=momentum, dgc_nesterov=nesterov, dgc_weight_decay=wd)
        g["momentum"] = 0.0  # momentum now lives in the hook: not to be applied twice
        g["nesterov"] = False
        if weight_decay == "momentum":
            g["weight_decay"] = 0.0  # applied in the hook, through its own momentum buffer
        elif weight_decay == "scaled":
            # SGD with momentum m applies weight decay through its momentum buffer, which
            # amplifies it by 1/(1-m) in steady state (only there: not after an LR change).
            g["weight_decay"] = wd / (1.0 - momentum)
        else:
            g["weight_decay"] = wd
    optimizer.defaults["momentum"] = 0.0
    optimizer.defaults["nesterov"] = False
    logger.info(
        "DGC: moved SGD momentum %g (nesterov=%s) into the hook; optimizer momentum set to 0; "
        "weight decay %s: %s",
        momentum,
        nesterov,
        sorted(set(decays)),
        {
            "momentum": "in the hook, with its own momentum buffer (exactly SGD's)",
            "scaled": "in the optimizer, x 1/(1-m)",
            "optimizer": "in the optimizer, as given (no momentum on it)",
        }[weight_decay],
    )


def prepare_dgc(
    optimizer: torch.optim.Optimizer,
    named_parameters: Any,
    *,
    param_groups: list[list[torch.Tensor]] | None = None,
    grad_scaler: Any = None,
    weight_decay: str = "momentum",
    hierarchical_local_size: int | None = None,
    **dgc_kwargs: Any,
) -> tuple[Any, Any, Any]:
    """What :func:`register_dgc` does besides the DDP registration, for a caller that feeds the
    hook its own buckets (:mod:`dtrain.integrations.deepspeed`).

    Args:
        optimizer: the model's torch optimizer (see :func:`register_dgc`).
        named_parameters: the model's ``named_parameters()`` (the state is keyed by name).
        param_groups: the model parameters of each of ``optimizer``'s param groups, where the
            optimizer holds other tensors (DeepSpeed's ZeRO holds flat partitions); default:
            the groups' own ``params``.
        grad_scaler, weight_decay, hierarchical_local_size, **dgc_kwargs: as for
            :func:`register_dgc`.

    Returns:
        ``(state, hook, commit)``: the validated state (attached, learning rates and weight
        decay wired), the hook function, and ``commit()``, which moves SGD's momentum and
        decay out of the optimizer: call it once the hook is in place.
    """
    if "compensate_weight_decay" in dgc_kwargs:
        raise TypeError(
            "register_dgc's compensate_weight_decay is now weight_decay: 'momentum' (default, "
            "exactly SGD's), 'scaled' (was True) or 'optimizer' (was False)"
        )
    for key in ("momentum", "nesterov"):
        if key in dgc_kwargs:
            raise TypeError(
                f"register_dgc takes {key} from the optimizer; set it there "
                f"(or build DGCState yourself)"
            )
    if weight_decay not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"weight_decay must be one of {', '.join(map(repr, WEIGHT_DECAY_MODES))}, "
            f"got {weight_decay!r}"
        )
    # Validate everything (optimizer, DGC arguments) before the optimizer changes: a refused
    # call leaves it as it was.
    momentum, nesterov, decays = _settings_from(optimizer)
    hook: Any = dgc_hook
    if hierarchical_local_size is None:
        state: Any = DGCState(momentum=momentum, nesterov=nesterov, **dgc_kwargs)
    else:
        state = HierarchicalDGCState(
            local_size=hierarchical_local_size, momentum=momentum, nesterov=nesterov, **dgc_kwargs
        )
        hook = hierarchical_dgc_hook
    state.grad_scaler = grad_scaler
    state.attach(named_parameters)
    groups = param_groups or [list(g["params"]) for g in optimizer.param_groups]
    if isinstance(optimizer, torch.optim.SGD):  # lr_weighted: v <- v + (lr_t / lr_ref) * u
        state.set_lr_source(optimizer, param_groups=groups)
    sgd_moves = isinstance(optimizer, torch.optim.SGD) and momentum > 0
    if sgd_moves and weight_decay == "momentum":
        state.set_weight_decay({p: wd for ps, wd in zip(groups, decays, strict=True) for p in ps})

    def commit() -> None:
        _move_momentum(optimizer, momentum, nesterov, decays, weight_decay=weight_decay)

    return state, hook, commit


def register_dgc(
    ddp_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grad_scaler: Any = None,
    weight_decay: str = "momentum",
    hierarchical_local_size: int | None = None,
    **dgc_kwargs: Any,
) -> DGCState | HierarchicalDGCState:
    """Register the DGC hook on ``ddp_model`` and move the optimizer's momentum into it.

    Args:
        ddp_model: a ``DistributedDataParallel`` model (or ``torch.compile`` of one) without a
            communication hook.
        optimizer: the model's optimizer. SGD: its momentum and Nesterov flag move into the hook
            and its own momentum becomes 0; what was moved is kept in its param groups, so a
            second call (or a converted state loaded before this call) restores it exactly.
            Adam/AdamW and others: hook momentum 0.
        grad_scaler: a ``torch.amp.GradScaler`` used with this model, so that residuals follow
            loss-scale changes and clipping works in unscaled units.
        weight_decay: where SGD's weight decay goes once its momentum m is in the hook (it is
            never communicated): ``"momentum"`` (default) in the hook, through a decay-only
            momentum buffer per parameter, exactly SGD-with-momentum's decay; ``"scaled"`` in
            the optimizer, multiplied by 1/(1-m) (SGD's strength in steady state only);
            ``"optimizer"`` in the optimizer as given (weaker: no momentum on it).
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
    if ddp._comm_hooks:
        raise RuntimeError(
            "this DDP model already has a communication hook; DDP allows one: "
            "register DGC on a freshly built DDP model"
        )
    if hierarchical_local_size is None:
        dgc_kwargs.setdefault("process_group", ddp.process_group)
    state, hook, commit = prepare_dgc(
        optimizer,
        ddp.module.named_parameters(),
        grad_scaler=grad_scaler,
        weight_decay=weight_decay,
        hierarchical_local_size=hierarchical_local_size,
        **dgc_kwargs,
    )
    try:
        ddp.register_comm_hook(state, hook)
    except RuntimeError as e:  # a built-in hook is not listed in _comm_hooks
        raise RuntimeError(f"this DDP model already has a communication hook ({e})") from None
    commit()
    logger.info("DGC: %s registered on %s", hook.__name__, type(ddp.module).__name__)
    return state
