"""The per-parameter buffers of the DGC hook and the updates a step queues for them.

A step writes each parameter's new momentum / residual / decay momentum into second buffers and
queues a commit; :class:`~dtrain.comm.dgc_state.DGCState` applies the commits only once every
rank is known to have had finite gradients (``shared/DGC.md``), or drops them.
"""

import torch

__all__ = ["FlatBucket", "flat_view", "sliced_state"]


class _ParamState:
    """Momentum ``u``, residual ``v`` and decay momentum ``d`` of one parameter, flat, in the
    gradient's memory order.

    Each has a second buffer (``*_next``): a step writes its update there and the update is
    committed (buffers swapped) only once the whole step is known to be finite on every rank.
    """

    __slots__ = ("d", "d_next", "lr_ref", "u", "u_next", "v", "v_next")

    def __init__(self) -> None:
        self.lr_ref: float | None = None  # lr_weighted: the learning rate v is expressed at
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.d: torch.Tensor | None = None
        self.u_next: torch.Tensor | None = None
        self.v_next: torch.Tensor | None = None
        self.d_next: torch.Tensor | None = None

    def ensure(
        self,
        like: torch.Tensor,
        *,
        momentum: bool,
        residual: bool,
        decay: bool = False,
        residual_next: bool = True,
    ) -> None:
        if momentum and self.u is None:
            self.u = torch.zeros_like(like)
        if momentum and self.u_next is None:
            self.u_next = torch.empty_like(like)
        if residual and self.v is None:
            self.v = torch.zeros_like(like)
        if residual and residual_next and self.v_next is None:
            self.v_next = torch.empty_like(like)
        if decay and self.d is None:
            self.d = torch.zeros_like(like)
        if decay and self.d_next is None:
            self.d_next = torch.empty_like(like)


class _Pending:
    """A state update computed during a step, applied by :meth:`DGCState._finish_step`."""

    __slots__ = ("sent", "state", "swap_d", "swap_u", "swap_v")

    def __init__(
        self,
        state: _ParamState,
        sent: torch.Tensor | None,
        *,
        swap_u: bool = False,
        swap_v: bool = False,
        swap_d: bool = False,
    ) -> None:
        self.state, self.sent = state, sent
        self.swap_u, self.swap_v, self.swap_d = swap_u, swap_v, swap_d


class _BucketResidual:
    """Selection "bucket": the step's residuals of a bucket's compressed parameters, one buffer
    (``whole``, in bucket order) of which each parameter's ``v`` becomes a view on commit, once
    the selected entries ``sent`` are zeroed (one ``index_fill_``, no per-parameter split)."""

    __slots__ = ("parts", "sent", "whole")

    def __init__(
        self, whole: torch.Tensor, sent: torch.Tensor, parts: list[tuple[_ParamState, int]]
    ) -> None:
        self.whole, self.sent, self.parts = whole, sent, parts

    def commit(self) -> None:
        self.whole.index_fill_(0, self.sent, 0)
        pos = 0
        for st, n in self.parts:
            st.v = self.whole[pos : pos + n]
            pos += n


class _Mask:
    """A pruning mask of one parameter, flat in the gradient's memory order: ``keep`` (0/1 in
    the gradient's dtype, to multiply), ``kept`` (the kept positions, int64) and their count."""

    __slots__ = ("count", "keep", "kept")

    def __init__(self, keep: torch.Tensor, dtype: torch.dtype) -> None:
        self.kept = torch.nonzero(keep).view(-1)
        self.count = int(self.kept.numel())
        self.keep = keep.to(dtype)


def flat_view(p: torch.Tensor) -> torch.Tensor:
    """``p`` (its data) as one flat tensor in memory order, the order of its gradient in DDP's
    buckets (a view, so writing it writes ``p``)."""
    w = p.detach()
    return w.view(-1) if w.is_contiguous() else w.as_strided((p.numel(),), (1,))


def _load_into(st: _ParamState, entry: dict[str, torch.Tensor], device: torch.device) -> None:
    st.u = entry["u"].to(device) if "u" in entry else None
    st.v = entry["v"].to(device) if "v" in entry else None
    st.d = entry["d"].to(device) if "d" in entry else None
    st.lr_ref = float(entry["lr_ref"]) if "lr_ref" in entry else None
    st.u_next = st.v_next = st.d_next = None


def sliced_state(state: dict, kept: dict[str, torch.Tensor]) -> dict:
    """A :class:`~dtrain.comm.dgc_state.DGCState` ``state_dict()`` for a model some of whose
    parameters shrank: ``kept[name]`` holds the positions (flat, memory order) of the entries of
    parameter ``name`` that remain, and its momentum, residual and decay momentum keep just those
    entries (in that order), so that they carry over a structural change instead of restarting
    at zero."""
    out = dict(state)
    params = {}
    for name, entry in state["params"].items():
        at = kept.get(name)
        params[name] = {
            k: t[at.to(t.device)] if at is not None and k in ("u", "v", "d") else t
            for k, t in entry.items()
        }
    out["params"] = params
    return out


class FlatBucket:
    """What DGC's hook reads of a ``torch.distributed.GradBucket``: one flat buffer holding the
    gradients of ``params``, in order (a local rank's share of a bucket in hierarchical mode,
    DeepSpeed's gradients in :mod:`dtrain.integrations.deepspeed`)."""

    def __init__(
        self, buffer: torch.Tensor, params: list[torch.Tensor], *, index: int, last: bool
    ) -> None:
        self._buffer, self._params, self._index, self._last = buffer, params, index, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        out, at = [], 0
        for p in self._params:
            out.append(self._buffer[at : at + p.numel()].view_as(p))
            at += p.numel()
        return out

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer
