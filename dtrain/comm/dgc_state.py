"""The state of the DGC hook: hyper-parameters, per-parameter momentum and residuals, statistics.

:class:`DGCState` is what :func:`dtrain.comm.dgc.dgc_hook` reads and updates each step; it is
checkpointed per rank (``state_dict()`` holds tensors and plain numbers only, keyed by parameter
name) and validates its arguments. Semantics: ``shared/DGC.md``.
"""

import logging
import math
import threading
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from dtrain.comm import costmodel, sparsify
from dtrain.comm.buffers import (
    _BucketResidual,
    _load_into,
    _Mask,
    _ParamState,
    _Pending,
    flat_view,
)

__all__ = ["MODES", "DGCState"]

logger = logging.getLogger("dtrain.comm.dgc")

_VALUE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# "paper": shared/DGC.md as written; "lr_weighted": no masking, residuals accumulate
# learning-rate-weighted momentum (docs/modes.md)
MODES = ("paper", "lr_weighted")
SELECTIONS = ("tensor", "bucket")


class DGCState:
    """State of :func:`dgc_hook`: hyper-parameters, per-parameter momentum and residuals, stats.

    Args:
        process_group: the group to communicate in (default: the default group).
        density: fraction of each compressed parameter's entries sent per step, in (0, 1].
        momentum: momentum ``m`` applied in the hook (the optimizer's own must be 0), in [0, 1).
        nesterov: Nesterov momentum correction.
        mode: ``"paper"`` (``shared/DGC.md`` exactly) or ``"lr_weighted"`` (default): momentum
            correction without masking, and the residual accumulates each step's momentum
            weighted by that step's learning rate relative to a reference, ``v <- v + r_t*u``
            with ``r_t = lr_t / lr_ref``, sent entries divided by ``r_t`` again; so an entry
            that waits in the residual is applied at the rate it was earned at, and at density
            1 the hook is exactly SGD with momentum. It needs the optimizer
            (:meth:`set_lr_source`; :func:`~dtrain.comm.register_dgc` calls it) and can apply
            what is left in the residuals once at the end (:meth:`flush`).
        momentum_masking: zero ``u`` where entries were sent (momentum factor masking); None:
            the mode's (paper: True, lr_weighted: False).
        selection: ``"tensor"`` (default: k = ceil(d * numel) entries of each compressed
            parameter, the paper's) or ``"bucket"`` (the sum of those k over a bucket's
            compressed parameters, taken from all of them at once: a parameter whose residual
            holds more sends more, at the same bytes; the result then depends on DDP's bucket
            layout, which DDP rebuilds after its first step, so a resumed run is not bit-exact).
        lr_density_gain: ``lr_weighted`` only: after the warm-up the density follows the
            learning rate, each compressed parameter's ``d_t = density * q(clamp(gain * r_t,
            0.1, 1/density))`` (:func:`~dtrain.comm.sparsify.lr_density`, quarter-octave steps);
            :func:`~dtrain.comm.sparsify.lr_density_gain` gives the gain that keeps the run's
            mean density at ``density`` for a schedule (about 2.24 for a cosine to 0; the job
            computes it). None (default): the density stays ``density``.
        clip_norm: local gradient clipping norm C (scaled by N^-1/2), > 0, or None for none.
        start_iter: steps before this one are dense (plain allreduce with hook momentum), >= 0.
        warmup_steps: length of the exponential density warm-up after ``start_iter``, >= 0.
        warmup_stages: number of equal warm-up stages, >= 1.
        exact_topk: select with ``torch.topk`` instead of a sampled threshold.
        sample_ratio: minimum fraction of entries sampled to estimate the threshold, in (0, 1].
        min_compress_numel: parameters with fewer entries (and all 1-D ones) are sent dense, >= 1.
        value_dtype: wire dtype of values: torch.float32, torch.float16 or torch.bfloat16.
        exchange: how a bucket's compressed parameters are exchanged: ``"sparse"`` (all-gather
            of every rank's (index, value) pairs), ``"dense"`` (each rank scatters its pairs into
            a zero buffer that is allreduced) or ``"auto"`` (per bucket, whichever sends fewer
            bytes by :mod:`dtrain.comm.costmodel`; the all-gather loses past N ~ 1/density).

    Weight decay (:meth:`set_weight_decay`, which :func:`~dtrain.comm.register_dgc` calls) is
    applied locally, never communicated, through a decay-only momentum buffer per parameter:
    ``d <- m*d + wd*w`` and the output gains ``d`` (Nesterov: ``wd*w + m*d``), so that momentum
    and decay together are exactly SGD's ``buf <- m*buf + g + wd*w``.

    In a group of one rank there is nothing to save: every parameter then takes the dense path
    (plain momentum, no sparsification and no residual), and the state says so once in the log.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        density: float = 0.001,
        momentum: float = 0.9,
        nesterov: bool = False,
        mode: str = "lr_weighted",
        momentum_masking: bool | None = None,
        selection: str = "tensor",
        lr_density_gain: float | None = None,
        clip_norm: float | None = None,
        start_iter: int = 0,
        warmup_steps: int = 0,
        warmup_stages: int = 4,
        exact_topk: bool = False,
        sample_ratio: float = 0.01,
        min_compress_numel: int = 1024,
        value_dtype: torch.dtype = torch.float32,
        exchange: str = "auto",
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
        if exchange not in costmodel.EXCHANGES:
            raise ValueError(
                f"exchange must be one of {', '.join(map(repr, costmodel.EXCHANGES))}, "
                f"got {exchange!r}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")

        # ---- tuned hyper-parameters ----
        self.process_group = process_group
        self.density = float(density)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.mode = mode
        if momentum_masking is None:
            momentum_masking = mode == "paper"
        self.momentum_masking = bool(momentum_masking)
        if selection not in SELECTIONS:
            raise ValueError(
                f"selection must be one of {', '.join(map(repr, SELECTIONS))}, got {selection!r}"
            )
        if selection == "bucket" and self.momentum_masking:
            raise ValueError(
                "momentum_masking=True needs selection='tensor' (it zeroes momentum per "
                "parameter where entries were sent)"
            )
        self.selection = selection
        if lr_density_gain is not None:
            _check_range("lr_density_gain", lr_density_gain, 0.0, math.inf, "> 0", low_open=True)
            if mode != "lr_weighted":
                raise ValueError(
                    "lr_density_gain needs mode='lr_weighted' (the density follows its r_t)"
                )
            lr_density_gain = float(lr_density_gain)
        self.lr_density_gain = lr_density_gain
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.start_iter = start_iter
        self.warmup_steps = warmup_steps
        self.warmup_stages = warmup_stages
        self.exact_topk = bool(exact_topk)
        self.sample_ratio = float(sample_ratio)
        self.min_compress_numel = min_compress_numel
        self.value_dtype = value_dtype
        self.exchange = exchange
        self.grad_scaler: Any = None  # a torch.amp.GradScaler, set by register_dgc
        # What the engine around the hook sends per step besides DGC (DeepSpeed's ZeRO-1: the
        # all-gather of the updated weights), counted in stats() so the totals tell the truth.
        self.engine_bytes_per_step = 0

        # ---- internal state ----
        self.iter = 0  # synchronised steps seen (t of DGC.md)
        self._params: dict[torch.Tensor, _ParamState] = {}
        self._decay: dict[torch.Tensor, float] = {}  # weight decay per parameter (local)
        self._optimizer: Any = None  # lr_weighted: where the learning rates are read
        self._groups: dict[torch.Tensor, int] = {}  # parameter -> its param group's number
        self._solo_logged = False  # "a group of one: dense" said once
        self._names: dict[torch.Tensor, str] = {}  # set by attach()
        self._order: dict[torch.Tensor, int] = {}  # stable per-parameter number (sampling seed)
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}  # from load_state_dict, by name
        self._pending: list[_Pending | _BucketResidual] = []
        self._step_bad = False
        self._step_open = False
        self._scale: float | None = None  # loss scale u and v are expressed in
        self._lock = threading.Lock()  # gloo runs Future callbacks on its own threads
        # "sparse" or "dense" per ((sorted (numel, k) of the compressed parameters), world size)
        self._exchanges: dict[tuple[tuple[tuple[int, int], ...], int], str] = {}
        self._masks: dict[torch.Tensor, _Mask] = {}  # pruning masks (set_masks)

        # ---- statistics ----
        self._cur = _StepStats()
        self._last = _StepStats()
        self._total = _StepStats()
        self.skipped_steps = 0

        logger.info(
            "DGC: mode=%s selection=%s density=%g lr_density_gain=%s momentum=%g nesterov=%s "
            "masking=%s clip_norm=%s start_iter=%d "
            "warmup_steps=%d/%d stages exact_topk=%s sample_ratio=%g min_compress_numel=%d "
            "values=%s exchange=%s",
            mode,
            selection,
            self.density,
            lr_density_gain,
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
            exchange,
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

    def set_weight_decay(self, decays: dict[torch.Tensor, float]) -> None:
        """Apply these weight decays (per parameter) in the hook, through decay momentum.

        The decay is local (identical on every rank, never sent) and replaces the optimizer's
        own: set the optimizer's weight decay of these parameters to 0.
        """
        for wd in decays.values():
            _check_range("weight_decay", wd, 0.0, math.inf, ">= 0")
        self._decay = {p: float(wd) for p, wd in decays.items() if wd}

    def set_masks(self, masks: dict[torch.Tensor, torch.Tensor]) -> None:
        """Pruning masks ``{parameter: bool mask}`` (True: kept), the same on every rank; they
        replace any given before. A pruned coordinate is never selected or sent, its momentum,
        residual and decay momentum stay zero (zeroed here), and k is taken over the kept
        coordinates: a layer at 90% sparsity sends 10x fewer pairs; a masked dense parameter
        sends only its kept entries. Keep the pruned weights at zero (``MaskSet.apply_`` after
        each optimizer step)."""
        if masks and self.selection == "bucket":
            raise ValueError("DGC: pruning masks need selection='tensor' (k per tensor)")
        self._finish_step()  # the last step's updates, before they are masked
        self._masks = {}
        for p, m in masks.items():
            if m.shape != p.shape:
                raise ValueError(f"DGC: a mask of shape {list(m.shape)} for {list(p.shape)}")
            keep = torch.empty_like(p.detach(), dtype=torch.bool).copy_(m)  # p's memory order
            mask = self._masks[p] = _Mask(flat_view(keep), p.dtype)
            st = self._params.get(p)
            for t in (st.u, st.v, st.d) if st is not None else ():
                if t is not None:
                    t.mul_(mask.keep)
        self._exchanges.clear()  # the bytes of every layout change

    def reset(self) -> None:
        """Zero every momentum, residual and decay momentum buffer (after the weights were
        rewound: what they hold belongs to weights that are gone); the step count, the masks
        and the learning-rate references stay. Call it on every rank between steps."""
        self._finish_step()
        for st in self._params.values():
            for t in (st.u, st.v, st.d):
                if t is not None:
                    t.zero_()

    def set_lr_source(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        param_groups: list[list[torch.Tensor]] | None = None,
    ) -> None:
        """Read each parameter's learning rate from ``optimizer`` (``lr_weighted`` mode).

        The rate is read from its param group (a Python float: no device sync) once per step in
        the hook, so it is the rate the following ``optimizer.step()`` applies; the reference
        ``lr_ref`` of a parameter is its group's ``initial_lr`` (set by torch LR schedulers),
        else its rate at the first compressed step; it is saved in :meth:`state_dict`. Groups are
        looked up by number each step: ``optimizer.load_state_dict`` replaces the group dicts.
        ``param_groups``: the model parameters of each group, where the optimizer holds other
        tensors (DeepSpeed's ZeRO: flat partitions); default: the groups' ``params``.
        """
        groups = param_groups or [g["params"] for g in optimizer.param_groups]
        self._optimizer = optimizer
        self._groups = {p: i for i, ps in enumerate(groups) for p in ps}

    def _rate(self, p: torch.Tensor, st: _ParamState) -> float:
        """``r_t = lr_t / lr_ref`` of a compressed parameter (1 in the paper's mode)."""
        if self.mode == "paper":
            return 1.0
        i = self._groups.get(p)
        if i is None:
            return 1.0  # no optimizer given: v in units of the current rate
        g = self._optimizer.param_groups[i]
        lr = float(g["lr"])
        if st.lr_ref is None:
            ref = float(g.get("initial_lr", lr)) or lr
            if ref <= 0.0:
                return 0.0  # nothing to weigh against yet: nothing enters v
            st.lr_ref = ref
        return lr / st.lr_ref

    @torch.no_grad()
    def flush(self) -> int:
        """Apply what every rank's residuals still hold to the weights, once (``lr_weighted``).

        Collective (every rank calls it, after the last step, before evaluating or saving): one
        dense allreduce of the residuals of all compressible parameters, ``w <- w - mean_k
        lr_ref * v_k``, then ``v <- 0``. Momentum is kept. Returns the bytes this rank sent
        (counted in :meth:`stats`).
        """
        world = dist.get_world_size(self.process_group)
        return self._flush(self.process_group, holders=world)

    def _flush(self, group: dist.ProcessGroup | None, *, holders: int) -> int:
        """:meth:`flush` over ``group``, where ``holders`` ranks keep a residual for each
        parameter (the others contribute zeros)."""
        if self.mode == "paper":
            raise RuntimeError(
                "flush() belongs to mode='lr_weighted': the paper's residuals carry no "
                "learning rate to apply them at"
            )
        if not self._groups:
            raise RuntimeError(
                "flush() needs the learning rates: call state.set_lr_source(optimizer) "
                "(register_dgc does)"
            )
        self._finish_step()
        if holders == 1 and dist.get_world_size(self.process_group) == 1:
            return 0  # a group of one ran dense: no residuals anywhere
        # the compressible parameters, in model order: the same list on every rank
        params = [
            p
            for p in self._names
            if p.requires_grad and p.dim() > 1 and p.numel() >= self.min_compress_numel
        ]
        if not params:
            return 0
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                           device=params[0].device)  # fmt: skip
        scale = self._scale or 1.0  # v is in loss-scaled units
        off = 0
        for p in params:
            n = p.numel()
            st = self._params.get(p)
            if st is not None and st.v is not None and st.lr_ref is not None:
                flat[off : off + n].add_(st.v, alpha=st.lr_ref / scale)
                st.v.zero_()
            off += n
        dist.all_reduce(flat, group=group)
        flat.div_(holders)
        off = 0
        for p in params:
            n = p.numel()
            flat_view(p).sub_(flat[off : off + n])
            off += n
        sent = flat.numel() * flat.element_size()
        self._total.sent += sent  # in the totals; the last step's figures stay the step's
        logger.info("DGC: residuals flushed into the weights (%d B sent)", sent)
        return sent

    def density_at(self, step: int) -> float:
        """d(t): the density used at synchronised step ``step`` (warm-up included)."""
        return sparsify.warmup_density(
            step,
            density=self.density,
            start_iter=self.start_iter,
            warmup_steps=self.warmup_steps,
            warmup_stages=self.warmup_stages,
        )

    def _density_for(self, step: int, rate: float) -> float:
        """The density of a compressed parameter at ``step`` whose r_t is ``rate``: d(t), or
        after the warm-up with ``lr_density_gain``, :func:`~dtrain.comm.sparsify.lr_density`."""
        gain = self.lr_density_gain
        if gain is None or step < self.start_iter + self.warmup_steps:
            return self._cur.density
        if not self._groups:  # every rank alike, at the same step: the job stops, no deadlock
            raise RuntimeError(
                "lr_density_gain needs the learning rates: call state.set_lr_source(optimizer) "
                "(register_dgc does for SGD)"
            )
        return sparsify.lr_density(self.density, rate, gain)

    def _exchange_for(
        self, layout: tuple[tuple[int, int], ...], world: int, rank: int, index: int
    ) -> str:
        """``"sparse"`` or ``"dense"`` for a bucket whose compressed parameters have these
        ``(numel, k)``; decided (and logged) once per layout and world size.

        The decision depends only on numbers every rank shares, so all ranks take the same path
        and run the same collective.
        """
        how = self._exchanges.get((layout, world))
        if how is not None:
            return how
        vb = self.value_dtype.itemsize
        sparse, dense = costmodel.exchange_bytes(layout, world_size=world, value_bytes=vb)
        how = self.exchange
        if how == "auto":
            how = costmodel.choose_exchange(layout, world_size=world, value_bytes=vb)
        self._exchanges[(layout, world)] = how
        if rank == 0:
            numel, total_k = sum(n for n, _ in layout), sum(k for _, k in layout)
            logger.info(
                "DGC: bucket %d: %d of %d entries (density %.4g) from each of N=%d ranks: "
                "sparse all-gather %d B, dense allreduce %d B per rank per step -> %s%s",
                index,
                total_k,
                numel,
                total_k / numel,
                world,
                sparse,
                dense,
                how,
                "" if self.exchange == "auto" else " (forced)",
            )
        return how

    def _group_size_rank(self) -> tuple[int, int]:
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _solo(self, world: int) -> bool:
        """Whether the group is one rank (nothing to send: dense momentum); logged once."""
        if world == 1 and not self._solo_logged:
            self._solo_logged = True
            logger.info(
                "DGC: this process group has one rank, so nothing crosses the network: "
                "dense momentum without sparsification or residuals"
            )
        return world == 1

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
        # u and v hold gradients in the units of the loss scale (none: 1) they were computed at;
        # follow a change, also one across a resume with another precision (fp16 <-> fp32).
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else None
        if scale != self._scale:
            ratio = (scale or 1.0) / (self._scale or 1.0)
            if ratio != 1.0:
                for st in self._params.values():
                    for t in (st.u, st.v, st.d):
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
                if isinstance(job, _BucketResidual):
                    job.commit()
                    continue
                st = job.state
                if job.swap_u:
                    st.u, st.u_next = st.u_next, st.u
                if job.swap_v:
                    st.v, st.v_next = st.v_next, st.v
                if job.swap_d:
                    st.d, st.d_next = st.d_next, st.d
                if job.sent is not None:
                    assert st.v is not None  # a compressed parameter has a residual
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
        would send (the gradient buckets). ``ratio`` is dense bytes / bytes sent. Bytes sent
        include :attr:`engine_bytes_per_step` for every step taken.
        """
        last, total = self._last, self._total
        extra = self.engine_bytes_per_step if self.iter else 0
        sent, sent_total = last.sent + extra, total.sent + extra * self.iter
        return {
            "step": self.iter,
            "density": last.density,
            "bytes_sent": sent,
            "dense_bytes": last.dense,
            "ratio": last.dense / sent if sent else 0.0,
            "bytes_sent_total": sent_total,
            "dense_bytes_total": total.dense,
            "ratio_total": total.dense / sent_total if sent_total else 0.0,
            # pairs this rank selected, and how many the same density gives without masks
            "pairs_sent": last.pairs,
            "pairs_unmasked": last.pairs_unmasked,
            "select_seconds": last.select_s,
            "select_seconds_total": total.select_s,
            # a step found non-finite counts at once, not only when the next step commits
            "skipped_steps": self.skipped_steps + int(self._step_bad),
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
            # a residual may be a view of its bucket's buffer (selection "bucket"): save it alone
            entry = {
                k: t if t._base is None else t.clone()
                for k, t in (("u", st.u), ("v", st.v), ("d", st.d))
                if t is not None
            }
            if st.lr_ref is not None:
                entry["lr_ref"] = torch.tensor(st.lr_ref, dtype=torch.float64)
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
            if k not in ("process_group", "_lock", "grad_scaler", "_optimizer", "_groups")
        }
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group = None
        self.grad_scaler = None
        self._optimizer, self._groups = None, {}  # call set_lr_source again
        self._lock = threading.Lock()


class _StepStats:
    __slots__ = ("dense", "density", "pairs", "pairs_unmasked", "select_s", "sent")

    def __init__(self, sent: int = 0, dense: int = 0) -> None:
        self.sent, self.dense, self.select_s, self.density = sent, dense, 0.0, 1.0
        self.pairs = self.pairs_unmasked = 0

    def add(self, o: "_StepStats") -> None:
        self.sent += o.sent
        self.dense += o.dense
        self.select_s += o.select_s
        self.pairs += o.pairs
        self.pairs_unmasked += o.pairs_unmasked


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
