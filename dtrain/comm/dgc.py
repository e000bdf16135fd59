"""Deep Gradient Compression as a DDP communication hook.

The exact semantics are those of ``shared/DGC.md``; the per-parameter math lives in
:mod:`dtrain.comm.sparsify`. This module owns the state that persists across steps
(:class:`DGCState`) and the hook that packs, exchanges and unpacks one bucket (:func:`dgc_hook`).

Note: no ``from __future__ import annotations`` here — DDP inspects the hook's annotations and
rejects string annotations.
"""

import logging
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from dtrain.comm import sparsify

__all__ = ["DGCState", "dgc_hook"]

logger = logging.getLogger(__name__)

_VALUE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_INDEX_BYTES = 4  # int32 indices
_FLAG_WORDS = 1  # one int32 word per rank: "I saw a non-finite gradient in this bucket"


class _ParamState:
    """Momentum ``u`` and residual ``v`` of one parameter, flat, in the gradient's memory order.

    Each has a second buffer (``*_next``): a step writes its update there and the update is
    committed (buffers swapped) only once the whole step is known to be finite on every rank.
    """

    __slots__ = ("u", "u_next", "v", "v_next")

    def __init__(self) -> None:
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.u_next: torch.Tensor | None = None
        self.v_next: torch.Tensor | None = None

    def ensure(self, like: torch.Tensor, *, momentum: bool, residual: bool) -> None:
        if momentum and self.u is None:
            self.u = torch.zeros_like(like)
        if momentum and self.u_next is None:
            self.u_next = torch.empty_like(like)
        if residual and self.v is None:
            self.v = torch.zeros_like(like)
        if residual and self.v_next is None:
            self.v_next = torch.empty_like(like)


class _Pending:
    """A state update computed during a step, applied by :meth:`DGCState._finish_step`."""

    __slots__ = ("sent", "state", "swap_u", "swap_v")

    def __init__(
        self, state: _ParamState, sent: torch.Tensor | None, swap_u: bool, swap_v: bool
    ) -> None:
        self.state, self.sent, self.swap_u, self.swap_v = state, sent, swap_u, swap_v


class DGCState:
    """State of :func:`dgc_hook`: hyper-parameters, per-parameter momentum and residuals, stats.

    Args:
        process_group: the group to communicate in (default: the default group).
        density: fraction of each compressed parameter's entries sent per step, in (0, 1].
        momentum: momentum ``m`` applied in the hook (the optimizer's own must be 0), in [0, 1).
        nesterov: Nesterov momentum correction.
        momentum_masking: zero ``u`` where entries were sent (momentum factor masking).
        clip_norm: local gradient clipping norm C (scaled by N^-1/2), > 0, or None for none.
        start_iter: steps before this one are dense (plain allreduce with hook momentum), >= 0.
        warmup_steps: length of the exponential density warm-up after ``start_iter``, >= 0.
        warmup_stages: number of equal warm-up stages, >= 1.
        exact_topk: select with ``torch.topk`` instead of a sampled threshold.
        sample_ratio: minimum fraction of entries sampled to estimate the threshold, in (0, 1].
        min_compress_numel: parameters with fewer entries (and all 1-D ones) are sent dense, >= 1.
        value_dtype: wire dtype of values: torch.float32, torch.float16 or torch.bfloat16.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        density: float = 0.001,
        momentum: float = 0.9,
        nesterov: bool = False,
        momentum_masking: bool = True,
        clip_norm: float | None = None,
        start_iter: int = 0,
        warmup_steps: int = 0,
        warmup_stages: int = 4,
        exact_topk: bool = False,
        sample_ratio: float = 0.01,
        min_compress_numel: int = 1024,
        value_dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_range("density", density, 0.0, 1.0, "(0, 1]", low_open=True)
        _check_range("momentum", momentum, 0.0, 1.0, "[0, 1)", high_open=True)
        _check_range("sample_ratio", sample_ratio, 0.0, 1.0, "(0, 1]", low_open=True)
        if clip_norm is not None:
            _check_range("clip_norm", clip_norm, 0.0, math.inf, "> 0 or None", low_open=True)
        _check_int("start_iter", start_iter, 0)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("warmup_stages", warmup_stages, 1)
        _check_int("min_compress_numel", min_compress_numel, 1)
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(
                f"value_dtype must be one of torch.float32, torch.float16, "
                f"torch.bfloat16, got {value_dtype!r}"
            )
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")

        # ---- tuned hyper-parameters ----
        self.process_group = process_group
        self.density = float(density)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.momentum_masking = bool(momentum_masking)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.start_iter = start_iter
        self.warmup_steps = warmup_steps
        self.warmup_stages = warmup_stages
        self.exact_topk = bool(exact_topk)
        self.sample_ratio = float(sample_ratio)
        self.min_compress_numel = min_compress_numel
        self.value_dtype = value_dtype
        self.grad_scaler: Any = None  # a torch.amp.GradScaler, set by register_dgc

        # ---- internal state ----
        self.iter = 0  # synchronised steps seen (t of DGC.md)
        self._params: dict[torch.Tensor, _ParamState] = {}
        self._names: dict[torch.Tensor, str] = {}  # set by attach()
        self._order: dict[torch.Tensor, int] = {}  # stable per-parameter number (sampling seed)
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}  # from load_state_dict, by name
        self._pending: list[_Pending] = []
        self._step_bad = False
        self._step_open = False
        self._scale: float | None = None  # loss scale u and v are expressed in
        self._lock = threading.Lock()  # gloo runs Future callbacks on its own threads

        # ---- statistics ----
        self._cur = _StepStats()
        self._last = _StepStats()
        self._total = _StepStats()
        self.skipped_steps = 0

        logger.info(
            "DGC: density=%g momentum=%g nesterov=%s masking=%s clip_norm=%s start_iter=%d "
            "warmup_steps=%d/%d stages exact_topk=%s sample_ratio=%g min_compress_numel=%d "
            "values=%s",
            self.density,
            self.momentum,
            self.nesterov,
            self.momentum_masking,
            self.clip_norm,
            start_iter,
            warmup_steps,
            warmup_stages,
            self.exact_topk,
            self.sample_ratio,
            min_compress_numel,
            _VALUE_DTYPES[value_dtype],
        )

    # ------------------------------------------------------------------ configuration helpers
    def attach(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tell the state the parameters' names (``module.named_parameters()``).

        Names key :meth:`state_dict`, so that a checkpoint survives rebuilding the DDP model.
        """
        for i, (name, p) in enumerate(named_parameters):
            self._names[p] = name
            self._order[p] = i
        self._apply_loaded()

    def density_at(self, step: int) -> float:
        """d(t): the density used at synchronised step ``step`` (warm-up included)."""
        return sparsify.warmup_density(
            step,
            density=self.density,
            start_iter=self.start_iter,
            warmup_steps=self.warmup_steps,
            warmup_stages=self.warmup_stages,
        )

    def _group_size_rank(self) -> tuple[int, int]:
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _param_state(self, p: torch.Tensor) -> _ParamState:
        st = self._params.get(p)
        if st is None:
            st = self._params[p] = _ParamState()
            self._order.setdefault(p, len(self._order))
            name = self._names.get(p)
            if name is not None and name in self._loaded:
                _load_into(st, self._loaded.pop(name), p.device)
        return st

    # ------------------------------------------------------------------ step boundaries
    def _begin_step(self) -> None:
        """First bucket of a step: apply the previous step's updates, follow the loss scale."""
        self._finish_step()
        self._step_open = True
        self._cur = _StepStats()
        self._cur.density = self.density_at(self.iter)
        if self.grad_scaler is not None:
            scale = float(self.grad_scaler.get_scale())
            if self._scale is not None and scale != self._scale:
                ratio = scale / self._scale
                for st in self._params.values():
                    for t in (st.u, st.v):
                        if t is not None:
                            t.mul_(ratio)
            self._scale = scale

    def _finish_step(self) -> None:
        """Commit (or, after a non-finite step, drop) the updates of the step that ended."""
        pending, self._pending = self._pending, []
        if self._step_bad:
            self.skipped_steps += 1
            logger.warning(
                "DGC: non-finite gradient at step %d on some rank; step skipped, "
                "momentum and residuals unchanged",
                self.iter - 1,
            )
        else:
            for job in pending:
                st = job.state
                if job.swap_u:
                    st.u, st.u_next = st.u_next, st.u
                if job.swap_v:
                    st.v, st.v_next = st.v_next, st.v
                if job.sent is not None:
                    st.v.index_fill_(0, job.sent, 0)
                    if self.momentum_masking and st.u is not None:
                        st.u.index_fill_(0, job.sent, 0)
        self._step_bad = False

    def _end_step(self) -> None:
        """Last bucket of a step (in the hook body): advance t and close the statistics."""
        self._last = self._cur
        self._total.add(self._cur)
        self.iter += 1
        self._step_open = False

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, float]:
        """Bytes and timing of the last step and of all steps so far.

        Bytes sent count everything this rank puts on the wire for DGC (values, indices,
        padding, the non-finite flag, dense parameters); dense bytes are what DDP's allreduce
        would send (the gradient buckets). ``ratio`` is dense bytes / bytes sent.
        """
        last, total = self._last, self._total
        return {
            "step": self.iter,
            "density": last.density,
            "bytes_sent": last.sent,
            "dense_bytes": last.dense,
            "ratio": last.dense / last.sent if last.sent else 0.0,
            "bytes_sent_total": total.sent,
            "dense_bytes_total": total.dense,
            "ratio_total": total.dense / total.sent if total.sent else 0.0,
            "select_seconds": last.select_s,
            "select_seconds_total": total.select_s,
            "skipped_steps": self.skipped_steps,
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only, keyed by parameter name; one file per rank.

        The tensors are the live buffers (as with optimizers): save them before the next step.
        """
        self._finish_step()
        if self._params and not self._names:
            raise RuntimeError(
                "DGCState.state_dict() needs parameter names: call "
                "state.attach(model.named_parameters()) (register_dgc does)"
            )
        params: dict[str, dict[str, torch.Tensor]] = {}
        for p, st in self._params.items():
            entry = {k: t for k, t in (("u", st.u), ("v", st.v)) if t is not None}
            if entry:
                params[self._names[p]] = entry
        params.update(self._loaded)  # loaded but not yet used: keep them
        world, rank = self._group_size_rank() if dist.is_initialized() else (1, 0)
        return {
            "iter": self.iter,
            "world_size": world,
            "rank": rank,
            "scale": self._scale if self._scale is not None else -1.0,
            "skipped_steps": self.skipped_steps,
            "bytes_sent_total": self._total.sent,
            "dense_bytes_total": self._total.dense,
            "params": params,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same world size)."""
        if dist.is_initialized():
            world, _ = self._group_size_rank()
            if state["world_size"] != world:
                raise ValueError(
                    f"DGC state was saved with world size {state['world_size']}, "
                    f"this job has {world}: residuals belong to ranks and cannot "
                    f"be redistributed"
                )
        self.iter = int(state["iter"])
        self._scale = None if state["scale"] < 0 else float(state["scale"])
        self.skipped_steps = int(state["skipped_steps"])
        self._total = _StepStats(
            sent=int(state["bytes_sent_total"]), dense=int(state["dense_bytes_total"])
        )
        self._pending, self._step_bad, self._step_open = [], False, False
        self._params.clear()
        self._loaded = {name: dict(entry) for name, entry in state["params"].items()}
        self._apply_loaded()

    def _apply_loaded(self) -> None:
        for p, name in self._names.items():
            if name in self._loaded:
                _load_into(
                    self._params.setdefault(p, _ParamState()), self._loaded.pop(name), p.device
                )

    def __getstate__(self) -> dict[str, Any]:
        # The process group and the lock cannot be pickled; the scaler belongs to the caller.
        d = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("process_group", "_lock", "grad_scaler")
        }
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group = None
        self.grad_scaler = None
        self._lock = threading.Lock()


class _StepStats:
    __slots__ = ("dense", "density", "select_s", "sent")

    def __init__(self, sent: int = 0, dense: int = 0) -> None:
        self.sent, self.dense, self.select_s, self.density = sent, dense, 0.0, 1.0

    def add(self, o: "_StepStats") -> None:
        self.sent += o.sent
        self.dense += o.dense
        self.select_s += o.select_s


def _load_into(st: _ParamState, entry: dict[str, torch.Tensor], device: torch.device) -> None:
    st.u = entry["u"].to(device) if "u" in entry else None
    st.v = entry["v"].to(device) if "v" in entry else None
    st.u_next = st.v_next = None


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    allowed: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def _check_int(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Exchange one bucket with Deep Gradient Compression.

    Lin et al., "Deep Gradient Compression", ICLR 2018, https://arxiv.org/abs/1712.01887;
    semantics fixed in ``shared/DGC.md``.

    1. Classify each parameter of the bucket: dense (1-D, fewer than ``min_compress_numel``
       entries, or before ``start_iter``) or compressed with ``k = ceil(d(t) * numel)``.
    2. Compressed: clip locally, apply momentum correction into ``v``, select k entries, pack
       k (value / N, int32 index) pairs per parameter into one fixed-size buffer per rank, with a
       flag saying whether this rank saw a non-finite gradient.
    3. Dense: divide by N and allreduce (in ``value_dtype``).
    4. Start both collectives asynchronously here, in the hook body (never in a callback: gloo
       runs callbacks on its own threads in varying order).
    5. When they complete: if any rank saw a non-finite value, return NaNs (GradScaler then
       skips the step everywhere) and drop the step's state updates; otherwise scatter-add every
       rank's pairs, apply dense momentum, and queue the state updates (committed when the next
       step starts, or by ``state_dict()``).

    Args:
        state: the :class:`DGCState`.
        bucket: the gradient bucket DDP hands over.

    Returns:
        A future of the averaged (momentum-corrected) bucket.

    Example::
        >>> state = DGCState(density=0.001, momentum=0.9)
        >>> state.attach(model.named_parameters())
        >>> ddp_model.register_comm_hook(state, dgc_hook)
    """
    if not state._step_open:
        state._begin_step()
    world, rank = state._group_size_rank()
    buf = bucket.buffer()
    params = bucket.parameters()
    step = state.iter
    density = state._cur.density
    dense_phase = step < state.start_iter
    m = state.momentum

    dense_items: list[tuple[torch.Tensor, int, int]] = []  # (param, offset, numel)
    comp_items: list[tuple[torch.Tensor, int, int, int]] = []  # (param, offset, numel, k)
    off = 0
    for p in params:
        n = p.numel()
        if dense_phase or p.dim() <= 1 or n < state.min_compress_numel:
            dense_items.append((p, off, n))
        else:
            comp_items.append((p, off, n, sparsify.num_selected(n, density)))
        off += n
    if off != buf.numel():
        raise RuntimeError(f"DGC: bucket holds {buf.numel()} elements, its parameters {off}")

    sent_bytes = 0
    gathered = None
    dense_buf = None
    futures = []
    commits: list[_Pending] = []

    if comp_items:
        ks = [k for *_, k in comp_items]
        total_k = sum(ks)
        vdt = state.value_dtype
        val_words = -(-total_k * torch.empty((), dtype=vdt).element_size() // 4)
        payload = torch.zeros(
            total_k + _FLAG_WORDS + val_words, dtype=torch.int32, device=buf.device
        )
        p_idx = payload[:total_k]
        p_val = payload[total_k + _FLAG_WORDS :].view(vdt)[:total_k]
        # Whole-bucket check (one read pass); the flag travels with the payload.
        payload[total_k] = (~torch.isfinite(buf.sum(dtype=torch.float32))).to(torch.int32)
        clip = state.clip_norm
        if clip is not None and state._scale is not None:
            clip = clip * state._scale  # gradients are in loss-scaled units
        t0 = time.perf_counter()
        pos = 0
        for p, o, n, k in comp_items:
            g = buf[o : o + n]
            st = state._param_state(p)
            st.ensure(g, momentum=m > 0, residual=True)
            if clip is not None:
                g.mul_(sparsify.clip_coefficient(g, clip, world))
            sparsify.momentum_correction(
                g, st.u, st.v, momentum=m, nesterov=state.nesterov, u_out=st.u_next, v_out=st.v_next
            )
            seed = step * 1_000_003 + state._order[p] * 7_919 + rank * 104_729
            idx = sparsify.select_topk(
                st.v_next, k, exact=state.exact_topk, sample_ratio=state.sample_ratio, start=seed
            )
            c = idx.numel()
            p_idx[pos : pos + c] = idx
            p_val[pos : pos + c] = st.v_next[idx].div_(world)
            if c < k:  # padding: value 0 (payload is zeroed) at a valid index
                p_idx[pos + c : pos + k] = idx[0] if c else 0
            commits.append(_Pending(st, idx, swap_u=m > 0, swap_v=True))
            pos += k
        state._cur.select_s += time.perf_counter() - t0
        gathered = torch.empty(world * payload.numel(), dtype=torch.int32, device=buf.device)
        futures.append(
            dist.all_gather_single(
                gathered, payload, group=state.process_group, async_op=True
            ).get_future()
        )
        sent_bytes += payload.numel() * 4

    if dense_items:
        if not comp_items and state.value_dtype == buf.dtype:
            dense_buf = buf.div_(world)  # the whole bucket: reduce in place, like allreduce_hook
        else:
            dense_buf = torch.cat([buf[o : o + n] for _, o, n in dense_items]).div_(world)
            dense_buf = dense_buf.to(state.value_dtype)
        futures.append(
            dist.all_reduce(dense_buf, group=state.process_group, async_op=True).get_future()
        )
        sent_bytes += dense_buf.numel() * dense_buf.element_size()
        if m > 0:
            for p, _, n in dense_items:
                state._param_state(p).ensure(buf[:n], momentum=True, residual=False)

    state._cur.sent += sent_bytes
    state._cur.dense += buf.numel() * buf.element_size()
    state._pending.extend(commits)
    if bucket.is_last():
        state._end_step()

    def finish(_: Any) -> torch.Tensor:
        bad = False
        if gathered is not None:
            rows = gathered.view(world, -1)
            bad = bool(rows[:, total_k].any())
        if dense_buf is not None and not bad:
            bad = not bool(torch.isfinite(dense_buf.sum(dtype=torch.float32)))
        if bad:
            with state._lock:
                state._step_bad = True
            return buf.fill_(float("nan"))
        if gathered is not None:
            idx = rows[:, :total_k].to(torch.long)
            vals = rows[:, total_k + _FLAG_WORDS :].view(vdt)[:, :total_k].to(buf.dtype)
            starts = torch.tensor([o for _, o, _, _ in comp_items], device=buf.device)
            idx += torch.repeat_interleave(starts, torch.tensor(ks, device=buf.device))
            for _, o, n, _ in comp_items:
                buf[o : o + n].zero_()
            buf.index_add_(0, idx.view(-1), vals.reshape(-1))
        if dense_buf is not None:
            pos = 0
            pend = []
            for p, o, n in dense_items:
                gbar = dense_buf[pos : pos + n].to(buf.dtype)
                pos += n
                if m == 0:
                    buf[o : o + n].copy_(gbar)
                    continue
                st = state._params[p]
                torch.add(gbar, st.u, alpha=m, out=st.u_next)
                if state.nesterov:
                    torch.add(gbar, st.u_next, alpha=m, out=buf[o : o + n])
                else:
                    buf[o : o + n].copy_(st.u_next)
                pend.append(_Pending(st, None, swap_u=True, swap_v=False))
            with state._lock:
                state._pending.extend(pend)
        return buf

    fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    return fut.then(finish)
