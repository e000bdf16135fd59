"""Every communication hook dtrain can run, behind one name: ``make_hook(name, ...)``.

The baselines are PyTorch's own implementations, not re-written, so comparisons are against
what a PyTorch user already has.
"""

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from dtrain.comm.dgc import DGCState, dgc_hook

__all__ = ["HOOKS", "make_hook", "powersgd_waiting_hook"]

HOOKS = ("allreduce", "fp16", "powersgd", "dgc")


def powersgd_waiting_hook(
    state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's PowerSGD hook, completed bucket by bucket (for gloo).

    PowerSGD starts its second and third collectives inside ``Future.then`` callbacks; gloo runs
    those on its own threads in varying order, so with more than one bucket the ranks' collectives
    mismatch ("Received data size doesn't match expected size"). Waiting for each bucket before
    DDP hands over the next keeps the order, at the price of overlap with backward.
    """
    result = powerSGD_hook.powerSGD_hook(state, bucket).wait()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(result)
    return fut


def make_hook(
    name: str, process_group: dist.ProcessGroup | None = None, **kwargs: Any
) -> tuple[Any, Callable]:
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    Args:
        name: ``"allreduce"``, ``"fp16"``, ``"powersgd"`` or ``"dgc"``.
        process_group: the group to communicate in (default group when None).
        **kwargs: the hook's own arguments: :class:`DGCState` for ``"dgc"``,
            ``PowerSGDState`` for ``"powersgd"`` (e.g. ``matrix_approximation_rank``,
            ``start_powerSGD_iter``); none for the others.

    Returns:
        The state and the hook. With gloo, ``"powersgd"`` returns :func:`powersgd_waiting_hook`.
    """
    if name not in HOOKS:
        raise ValueError(f"unknown hook {name!r}; choose one of {', '.join(HOOKS)}")
    if name == "dgc":
        return DGCState(process_group, **kwargs), dgc_hook
    if name == "powersgd":
        allowed = set(inspect.signature(powerSGD_hook.PowerSGDState.__init__).parameters)
        _check_kwargs(name, kwargs, allowed - {"self", "process_group"})
        state = powerSGD_hook.PowerSGDState(process_group, **kwargs)
        gloo = dist.get_backend(process_group) == "gloo"
        return state, powersgd_waiting_hook if gloo else powerSGD_hook.powerSGD_hook
    _check_kwargs(name, kwargs, set())
    hook = default_hooks.allreduce_hook if name == "allreduce" else default_hooks.fp16_compress_hook
    return process_group, hook


def _check_kwargs(name: str, kwargs: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        choices = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"hook {name!r} does not take {', '.join(unknown)} (it takes: {choices})")
