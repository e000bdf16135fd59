"""Byte accounting for the baseline hooks, with the same ``stats()`` as :class:`DGCState`.

PyTorch's allreduce, fp16 and PowerSGD hooks do not say how many bytes they put on the wire.
:func:`counted` wraps one so that a job can log bytes sent and the compression ratio for every
hook alike. Bytes are counted the way DGC counts them: the payload a rank hands to its
collectives per step (not multiplied by the ring algorithm's 2(N-1)/N factor, which is the same
for every dense hook); dense bytes are the fp32 gradient buckets DDP's allreduce would send.

Note: no ``from __future__ import annotations`` here — DDP inspects the hook's annotations.
"""

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

__all__ = ["CountingState", "counted", "counting_hook"]

logger = logging.getLogger(__name__)


class CountingState:
    """A baseline hook's own state plus bytes per step (last, cumulative) and a step count."""

    def __init__(self, name: str, inner: Any, hook: Callable | None) -> None:
        # ---- the wrapped hook ----
        self.name = name
        self.inner = inner
        self.hook = hook
        # ---- statistics ----
        self.iter = 0
        self._cur = [0, 0]  # bytes sent, dense bytes of the step in progress
        self._last = [0, 0]
        self._total = [0, 0]

    def stats(self) -> dict[str, float]:
        """Bytes of the last step and of all steps so far; ``ratio`` is dense / sent."""
        (ls, ld), (ts, td) = self._last, self._total
        return {
            "step": self.iter,
            "density": 1.0,
            "bytes_sent": ls,
            "dense_bytes": ld,
            "ratio": ld / ls if ls else 0.0,
            "bytes_sent_total": ts,
            "dense_bytes_total": td,
            "ratio_total": td / ts if ts else 0.0,
        }

    def add(self, sent: int, dense: int, *, end_step: bool) -> None:
        """Count ``sent`` and ``dense`` bytes for the step in progress; ``end_step``: it is
        complete (its bytes become the last step's and join the totals)."""
        self._cur[0] += sent
        self._cur[1] += dense
        if end_step:
            self._last = self._cur
            self._total = [a + b for a, b in zip(self._total, self._cur, strict=True)]
            self._cur = [0, 0]
            self.iter += 1

    def state_dict(self) -> dict[str, Any]:
        """Step count and byte totals. PowerSGD's error feedback and low-rank factors are keyed
        by DDP's bucket index, which a rebuilt DDP model assigns anew after its first step, so
        they restart on resume: two allreduce steps, then compression with fresh memories."""
        out: dict[str, Any] = {"iter": self.iter, "sent": self._total[0], "dense": self._total[1]}
        if self.name == "powersgd":
            out["powersgd_iter"] = self.inner.iter
        return out

    def reset(self) -> None:
        """Forget what the gradients of weights now gone left behind (the weights were
        rewound): PowerSGD's error feedback restarts at zero; the step count and totals stay."""
        if self.name == "powersgd":
            self.inner.error_dict.clear()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iter = int(state["iter"])
        self._total = [int(state["sent"]), int(state["dense"])]
        if self.name == "powersgd":
            inner = self.inner
            inner.iter = int(state["powersgd_iter"])
            if inner.iter >= inner.start_powerSGD_iter:
                # Like a fresh start: allreduce until DDP has rebuilt its buckets.
                inner.start_powerSGD_iter = inner.iter + 2
                logger.info(
                    "PowerSGD resumed at step %d: error feedback restarts, compression from "
                    "step %d (allreduce while DDP rebuilds its buckets)",
                    inner.iter,
                    inner.start_powerSGD_iter,
                )


def counting_hook(
    state: CountingState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Run the wrapped hook on ``bucket`` and count its bytes."""
    buf = bucket.buffer()
    dense = buf.numel() * buf.element_size()
    inner = state.inner
    compressing = state.name == "powersgd" and inner.iter >= inner.start_powerSGD_iter
    before = inner.total_numel_after_compression if compressing else 0
    is_last = bucket.is_last()
    assert state.hook is not None  # None: a state that counts an engine's own reduction
    fut = state.hook(inner, bucket)
    if compressing:  # PowerSGD's own count of what it allreduces: P, Q, uncompressed tensors
        sent = (inner.total_numel_after_compression - before) * buf.element_size()
    elif state.name == "fp16":
        sent = buf.numel() * 2
    else:
        sent = dense
    state.add(sent, dense, end_step=is_last)
    return fut


def counted(name: str, inner: Any, hook: Callable) -> tuple[CountingState, Callable]:
    """``(state, hook)`` that runs ``hook(inner, bucket)`` and counts bytes per step."""
    if name == "powersgd" and not isinstance(inner, powerSGD_hook.PowerSGDState):
        raise TypeError("counted('powersgd', ...) needs a PowerSGDState")
    return CountingState(name, inner, hook), counting_hook
