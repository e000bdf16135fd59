"""Deep Gradient Compression inside DeepSpeed's engine (ZeRO stages 0 and 1).

::

    import deepspeed
    from dtrain.integrations.deepspeed import register_dgc

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    dgc = register_dgc(engine, density=0.001)
    ...  # engine(x), engine.backward(loss), engine.step() as usual

DeepSpeed reduces gradients inside its engine, so a DDP communication hook never sees them.
:func:`register_dgc` replaces that reduction, on this engine only, with DGC's hook run over
buckets of the model's gradients (:class:`FlatBucket`), with the same semantics as the DDP hook
(``shared/DGC.md``), bit for bit: at stage 0 the engine's ``buffered_allreduce_fallback``; at
stage 1 the ZeRO optimizer's ``reduce_gradients`` computes DGC's average first and its bucket
collective (``average_tensor``) becomes a no-op, so ZeRO's own bookkeeping (the partition's
gradients, its norm, clipping and step) runs unchanged. Both run once per optimizer step, at
DeepSpeed's gradient-accumulation boundary, as the DDP hook does with ``no_sync``.

ZeRO-2 and ZeRO-3 are refused: ZeRO-2 reduces every micro-batch's gradients from autograd hooks
during backward and frees the gradients a rank does not own (DGC would run per micro-batch, and
its per-rank residuals are full size, the memory ZeRO-2 saves); ZeRO-3 partitions the parameters
themselves. DGC's error feedback needs the whole gradient of every rank; ZeRO-1 (optimizer state
partitioned) keeps it.
"""

import logging
from typing import Any

import torch

from dtrain.comm.buffers import FlatBucket
from dtrain.comm.counting import CountingState
from dtrain.comm.dgc_state import DGCState
from dtrain.comm.register import prepare_dgc

__all__ = ["count_reduction", "dgc_reduce", "flush", "register_dgc"]

logger = logging.getLogger(__name__)

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def _buckets(params: list[torch.Tensor], cap: int) -> list[list[int]]:
    """Consecutive groups of ``params`` (indices) of at most ``cap`` bytes (one if larger)."""
    out: list[list[int]] = []
    size = cap
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if size + nbytes > cap and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return [b for b in out if b]


@torch.no_grad()
def dgc_reduce(
    state: Any, params: list[torch.Tensor], grads: list[torch.Tensor], *, cap: int = BUCKET_BYTES
) -> None:
    """Replace ``grads`` (one per parameter, in the same order on every rank) by their DGC
    average over the ranks, in place: the hook runs on buckets of about ``cap`` bytes, in
    reverse parameter order (as DDP's), one DGC step in all."""
    from dtrain.comm.dgc import dgc_hook

    order = list(range(len(params)))[::-1]
    rparams = [params[i] for i in order]
    buckets = _buckets(rparams, cap)
    for b, idx in enumerate(buckets):
        ps = [rparams[i] for i in idx]
        gs = [grads[order[i]] for i in idx]
        flat = torch.cat([g.reshape(-1) for g in gs])
        bucket = FlatBucket(flat, ps, index=b, last=b == len(buckets) - 1)
        out = dgc_hook(state, bucket).wait()  # type: ignore[arg-type]
        at = 0
        for g in gs:
            g.copy_(out[at : at + g.numel()].view_as(g))
            at += g.numel()


def _base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), or ``opt`` itself."""
    while type(opt).__module__.startswith("deepspeed") or not isinstance(
        opt, torch.optim.Optimizer
    ):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            raise ValueError(
                f"DGC under DeepSpeed needs a torch optimizer given to deepspeed.initialize "
                f"(optimizer=...), not one from the DeepSpeed config ({type(opt).__name__})"
            )
        opt = inner
    return opt


def _model_groups(opt: Any) -> list[list[torch.Tensor]] | None:
    """The model parameters of each param group, where DeepSpeed's optimizer holds others."""
    for name in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(opt, name, None)
        if groups is not None:
            return [list(g) for g in groups]
    return None


def register_dgc(engine: Any, **kwargs: Any) -> DGCState:
    """Replace a DeepSpeed engine's gradient reduction with DGC.

    Args:
        engine: what ``deepspeed.initialize`` returned first, built with a torch optimizer
            (SGD: its momentum moves into the hook, as with :func:`dtrain.comm.register_dgc`).
            ZeRO stage 0 or 1; at stage 1 ``overlap_comm`` false and ``contiguous_gradients``
            true (DeepSpeed's defaults); fp32 or bf16.
        **kwargs: :func:`dtrain.comm.register_dgc`'s (``density``, ``warmup_steps``, ...).

    Returns:
        The :class:`DGCState`: ``stats()``, and ``state_dict()`` per rank beside
        ``engine.save_checkpoint`` (:func:`dtrain.integrations.accelerate.save_dgc_state`).

    Raises:
        ValueError: a configuration DGC cannot run in, naming the setting to change.
    """
    stage = int(engine.zero_optimization_stage())
    if stage >= 2:
        raise ValueError(
            f"DGC under DeepSpeed needs ZeRO stage 0 or 1, this engine has {stage}: ZeRO-"
            f"{stage} reduces and frees each micro-batch's gradients during backward"
            + (" and partitions the parameters" if stage == 3 else "")
            + ", while DGC's error feedback needs every rank's whole gradient once per step: "
            "set zero_optimization.stage to 1 (optimizer state partitioned)"
        )
    if engine.fp16_enabled():
        raise ValueError(
            "DGC under DeepSpeed does not follow DeepSpeed's fp16 loss scale yet: use bf16 or "
            "fp32, or dtrain's DDP engine with fp16 and a GradScaler"
        )
    if getattr(engine, "has_moe_layers", False):
        raise ValueError("DGC under DeepSpeed does not handle mixture-of-experts layers")
    opt = engine.optimizer
    base = _base_optimizer(opt)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    state, hook, commit = prepare_dgc(base, named, param_groups=_model_groups(opt), **kwargs)
    del hook  # dgc_reduce runs dgc_hook itself

    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # What is replaced are methods of DeepSpeed 0.19 (the extra pins it): another version must
    # still have them, or the engine would silently reduce on its own.
    zero1 = isinstance(opt, DeepSpeedZeroOptimizer)
    needed = (
        [(opt, "reduce_gradients"), (opt, "average_tensor"), (opt, "get_gradient_for_reduction"),
         (opt, "_add_full_reduction_to_compact_grad_partition")]
        if zero1
        else [(engine, "buffered_allreduce_fallback")]
    )  # fmt: skip
    missing = [name for obj, name in needed if not callable(getattr(obj, name, None))]
    if missing:
        raise ValueError(
            f"DGC under DeepSpeed replaces {', '.join(missing)}, which DeepSpeed "
            f"{deepspeed.__version__} does not have: install deepspeed 0.19 (dtrain[deepspeed])"
        )
    if zero1:
        if opt.overlap_comm:
            raise ValueError(
                "DGC under ZeRO-1 needs zero_optimization.overlap_comm = false: with it, "
                "DeepSpeed reduces buckets during backward, before every gradient exists"
            )
        if not opt.contiguous_gradients:
            raise ValueError("DGC under ZeRO-1 needs zero_optimization.contiguous_gradients = true")
        reduce_gradients = opt.reduce_gradients

        def reduce_then_bookkeep(pipeline_parallel: bool = False) -> Any:
            grads = []
            for p in params:
                g = opt.get_gradient_for_reduction(p)  # p.grad, or p.grad_accum
                if g is None:  # no gradient this step: zeros, the same size on every rank
                    g = torch.zeros_like(p, dtype=opt._gradient_reduction_buffer_dtype())
                    if opt.use_grad_accum_attribute:
                        p.grad_accum = g
                    else:
                        p.grad = g
                grads.append(g.data)
            dgc_reduce(state, params, grads)
            return reduce_gradients(pipeline_parallel=pipeline_parallel)

        def averaged_already(tensor: torch.Tensor, communication_data_type: Any) -> None:
            # ZeRO's bucket collective: the bucket holds DGC's average already. What remains
            # is the add into a compact fp32 partition buffer (bf16 + fp32 accumulation).
            opt._add_full_reduction_to_compact_grad_partition(tensor, communication_data_type)

        opt.reduce_gradients = reduce_then_bookkeep
        opt.average_tensor = averaged_already
    else:
        # Stage 0 (the torch optimizer, or DeepSpeed's bf16 wrappers; BF16_Optimizer at stage 1
        # too): the engine's dense reduction of all gradients at the boundary.
        fp32_grads = getattr(opt, "fp32_groups_gradients", None)  # BF16_Optimizer's
        groups = _model_groups(opt)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if fp32_grads is not None and groups is not None:
            pairs = [(p, fp32_grads[i][j]) for i, g in enumerate(groups) for j, p in enumerate(g)]
            order = {id(p): k for k, p in enumerate(params)}
            pairs.sort(key=lambda pg: order[id(pg[0])])

        def buffered_allreduce_fallback(grads: Any = None, elements_per_buffer: int = 0) -> None:
            if pairs is not None:
                dgc_reduce(state, [p for p, _ in pairs], [g for _, g in pairs])
                return
            for p in params:
                if p.grad is None:  # as DeepSpeed's own: the same size on every rank
                    p.grad = torch.zeros_like(p)
            dgc_reduce(state, params, [p.grad.data for p in params if p.grad is not None])

        engine.buffered_allreduce_fallback = buffered_allreduce_fallback
    if stage == 1:  # ZeRO-1 still all-gathers the updated weights: each rank sends its part
        state.engine_bytes_per_step = _grad_bytes(engine) // int(engine.dp_world_size)
    commit()
    logger.info(
        "DGC: replaces DeepSpeed's gradient reduction (ZeRO stage %d, %s)%s",
        stage,
        type(opt).__name__,
        "; the all-gather of the updated weights stays (counted)" if stage == 1 else "",
    )
    return state


def _grad_bytes(engine: Any) -> int:
    """The model's gradient bytes (under ZeRO-3 a parameter's ``ds_numel``: its full size)."""
    return sum(
        getattr(p, "ds_numel", p.numel()) * p.element_size()
        for p in engine.module.parameters()
        if p.requires_grad
    )


def flush(engine: Any, state: DGCState) -> int:
    """:meth:`DGCState.flush` for a DeepSpeed engine: the residuals into the weights, and, under
    ZeRO-1, into the optimizer's fp32 master copy too (else its next step undoes them)."""
    n = state.flush()
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    return n


# DeepSpeed's collectives (methods of its communication backend, ``deepspeed.comm.comm.cdb``,
# a TorchBackend) and the argument holding what this rank hands to each, by name and position
# (DeepSpeed's decorators hide the signatures): the payload counted.
_PAYLOADS = {
    "all_reduce": ("tensor", 0), "inference_all_reduce": ("tensor", 0),
    "all_reduce_coalesced": ("tensors", 0), "reduce": ("tensor", 0),
    "reduce_scatter": ("input_list", 1), "reduce_scatter_tensor": ("input_tensor", 1),
    "all_gather": ("tensor", 1), "all_gather_into_tensor": ("input_tensor", 1),
    "all_gather_base": ("input_tensor", 1), "all_gather_coalesced": ("input_tensors", 1),
    "all_to_all_single": ("input", 1), "all_to_all": ("input_tensor_list", 1),
    "broadcast": ("tensor", 0),
}  # fmt: skip


class _Meter:
    """Bytes handed to DeepSpeed's collectives while a training step is open (metadata only:
    sizes, no host read of a device tensor)."""

    def __init__(self) -> None:
        self.open = False
        self.sent = 0

    def take(self) -> int:
        sent, self.sent, self.open = self.sent, 0, False
        return sent


_METER = _Meter()


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _meter_backend() -> None:
    """Wrap DeepSpeed's communication backend's collectives, once per process, to add their
    payload to :data:`_METER` while it is open (a broadcast counts on its source rank only)."""
    from deepspeed.comm import comm

    cdb = comm.cdb
    if cdb is None or getattr(cdb, "_dtrain_metered", False):
        return
    rank = torch.distributed.get_rank()
    for name, (arg, at) in _PAYLOADS.items():
        method = getattr(cdb, name, None)
        if not callable(method):
            continue

        def metered(*args: Any, _m: Any = method, _arg: str = arg, _at: int = at,
                    _bcast: bool = name == "broadcast", **kwargs: Any) -> Any:  # fmt: skip
            if _METER.open:
                src = kwargs.get("src", args[1] if len(args) > 1 else None) if _bcast else rank
                payload = kwargs.get(_arg, args[_at] if len(args) > _at else None)
                if src == rank:
                    _METER.sent += _nbytes(payload)
            return _m(*args, **kwargs)

        setattr(cdb, name, metered)
    cdb._dtrain_metered = True


def count_reduction(engine: Any) -> CountingState:
    """Count the bytes DeepSpeed's engine sends, as :mod:`dtrain.comm.counting` counts DDP's:
    the payload this rank hands to DeepSpeed's collectives from the start of a step's first
    forward to the end of its optimizer step, measured at DeepSpeed's communication backend:
    ZeRO 0 and 1 reduce the whole gradient once per step (at the accumulation boundary), ZeRO 2
    and 3 every micro-batch; from stage 1 on every rank all-gathers its part of the updated
    weights, ZeRO-3 also the parameters it does not hold before the layers that use them.
    Evaluation and checkpoints (outside a step) are not counted. Dense bytes are DDP's: the
    fp32 gradients once per step.

    Returns:
        A :class:`CountingState` whose ``stats()`` the job logs like any hook's.
    """
    state = CountingState("allreduce", None, None)
    grads = _grad_bytes(engine)
    _meter_backend()
    forward, step = engine.forward, engine.step

    def counted_forward(*args: Any, **kwargs: Any) -> Any:
        if engine.module.training:
            _METER.open = True
        return forward(*args, **kwargs)

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        boundary = bool(engine.is_gradient_accumulation_boundary())
        out = step(*args, **kwargs)
        if boundary:
            state.add(_METER.take(), grads, end_step=True)
        return out

    engine.forward, engine.step = counted_forward, counted_step
    return state
