"""Deep Gradient Compression as a DDP communication hook.

The exact semantics are those of ``shared/DGC.md``; the per-parameter math lives in
:mod:`dtrain.comm.sparsify`, the state that persists across steps in
:mod:`dtrain.comm.dgc_state` (:class:`DGCState`, re-exported here), the byte cost model in
:mod:`dtrain.comm.costmodel`. This module is the hook that packs, exchanges and unpacks one
bucket (:func:`dgc_hook`).

Note: no ``from __future__ import annotations`` here — DDP inspects the hook's annotations and
rejects string annotations.
"""

import time
from typing import Any

import torch
import torch.distributed as dist

from dtrain.comm import sparsify
from dtrain.comm.buffers import _BucketResidual, _Pending, flat_view
from dtrain.comm.dgc_state import DGCState

__all__ = ["DGCState", "dgc_hook"]

_FLAG_WORDS = 1  # one int32 word per rank: "I saw a non-finite gradient in this bucket"


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Exchange one bucket with Deep Gradient Compression.

    Lin et al., "Deep Gradient Compression", ICLR 2018, https://arxiv.org/abs/1712.01887;
    semantics fixed in ``shared/DGC.md``.

    1. Classify each parameter of the bucket: dense (1-D, fewer than ``min_compress_numel``
       entries, or before ``start_iter``) or compressed with ``k = ceil(d(t) * numel)``.
    2. Choose how the compressed parameters travel (``state.exchange``; with ``"auto"`` the
       cheaper in bytes by :mod:`dtrain.comm.costmodel`, decided once per bucket layout): a
       sparse all-gather of (value, index) pairs, or a dense reduction of them.
    3. Compressed: clip locally, apply momentum correction into ``v`` (``lr_weighted``: weighted
       by r_t, see ``docs/modes.md``), select k entries per parameter (``selection="tensor"``)
       or their sum over the bucket's concatenated residuals (``"bucket"``). Sparse: pack the
       (value / N, int32 index) pairs into one fixed-size buffer per rank,
       with a flag word saying whether this rank saw a non-finite gradient. Dense: write the
       values / N at their indices into a zero buffer (in ``value_dtype``) holding also the
       dense parameters / N and a last element carrying the flag as 1.0 / 0.0.
    4. Dense parameters (sparse path): divide by N and allreduce (in ``value_dtype``).
    5. Start the collectives (all-gather and allreduce, or the one allreduce) asynchronously
       here, in the hook body (never in a callback: gloo runs callbacks on its own threads in
       varying order).
    6. When they complete: if any rank saw a non-finite value (a flag, or a non-finite reduced
       value), return NaNs (GradScaler then skips the step everywhere) and drop the step's state
       updates; otherwise scatter-add every rank's pairs (sparse) or take the reduced buffer
       (dense: the same sums), apply dense momentum, and queue the state updates (committed when
       the next step starts, or by ``state_dict()``).

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
    dense_phase = step < state.start_iter or state._solo(world)
    m = state.momentum
    vdt = state.value_dtype

    dense_items: list[tuple[torch.Tensor, int, int]] = []  # (param, offset, numel)
    comp_items: list[tuple[torch.Tensor, int, int, int]] = []  # (param, offset, numel, k)
    rates: list[float] = []  # r_t of each compressed parameter (lr_weighted; paper: 1)
    masks = state._masks  # pruning masks: only kept coordinates are selected and sent
    sizes: dict[torch.Tensor, int] = {}  # the entries a parameter can send (kept or all)
    off = 0
    for p in params:
        n = p.numel()
        mask = masks.get(p)
        sizes[p] = mask.count if mask is not None else n
        if dense_phase or p.dim() <= 1 or n < state.min_compress_numel:
            dense_items.append((p, off, n))
        else:
            r = state._rate(p, state._param_state(p))
            d = state._density_for(step, r)
            k = sparsify.num_selected(sizes[p], d)
            comp_items.append((p, off, n, k))
            rates.append(r)
            state._cur.density = d  # the step's figure: the last compressed parameter's
            state._cur.pairs += k
            state._cur.pairs_unmasked += sparsify.num_selected(n, d) if mask is not None else k
        off += n
    if off != buf.numel():
        raise RuntimeError(f"DGC: bucket holds {buf.numel()} elements, its parameters {off}")
    dense_numel = sum(sizes[p] for p, _, _ in dense_items)

    sent_bytes = 0
    gathered: torch.Tensor | None = None  # sparse path: every rank's payload
    reduced: torch.Tensor | None = None  # dense path: the sum of every rank's dense buffer
    dense_buf: torch.Tensor | None = None  # the dense parameters' averaged gradients
    futures = []
    commits: list[_Pending | _BucketResidual] = []
    whole: torch.Tensor | None = None  # selection "bucket": every compressed v of the bucket

    if comp_items:
        ks = [k for *_, k in comp_items]
        total_k = sum(ks)
        comp_numel = sum(n for _, _, n, _ in comp_items)
        comp_sent = sum(sizes[p] for p, _, _, _ in comp_items)  # dense path: its entries
        layout = tuple(sorted((sizes[p], k) for p, _, _, k in comp_items))  # DDP may reorder
        sparse = state._exchange_for(layout, world, rank, bucket.index()) == "sparse"
        # Whole-bucket check (one read pass) before clipping; the flag travels with the data.
        nonfinite = ~torch.isfinite(buf.sum(dtype=torch.float32))
        if sparse:
            val_words = -(-total_k * vdt.itemsize // 4)
            payload = torch.zeros(
                total_k + _FLAG_WORDS + val_words, dtype=torch.int32, device=buf.device
            )
            p_idx = payload[:total_k]
            p_val = payload[total_k + _FLAG_WORDS :].view(vdt)[:total_k]
            payload[total_k] = nonfinite.to(torch.int32)
        else:
            reduced = torch.zeros(comp_sent + dense_numel + 1, dtype=vdt, device=buf.device)
            reduced[-1] = nonfinite.to(vdt)  # summed over ranks: > 0 iff some rank saw one
        clip = state.clip_norm
        if clip is not None and state._scale is not None:
            clip = clip * state._scale  # gradients are in loss-scaled units
        t0 = time.perf_counter()
        # selection "bucket": one top-k over the concatenated residuals (written there directly),
        # unless a parameter is at rate 0 this step (then per tensor: nothing of it may leave v)
        if state.selection == "bucket" and all(rates):
            whole = torch.empty(comp_numel, dtype=buf.dtype, device=buf.device)
        pos = 0  # sparse: position in the packed pairs; dense: in the dense buffer
        for (p, o, n, k), r in zip(comp_items, rates, strict=True):
            g = buf[o : o + n]
            st = state._param_state(p)
            st.ensure(g, momentum=m > 0, residual=True, residual_next=whole is None)
            v = st.v
            v_next = whole[pos : pos + n] if whole is not None else st.v_next
            assert v is not None and v_next is not None  # made by ensure(residual=True)
            mask = masks.get(p)
            if mask is not None:
                g.mul_(mask.keep)  # nothing enters u or v where the weight is pruned
            if clip is not None:
                g.mul_(sparsify.clip_coefficient(g, clip, world))
            sparsify.momentum_correction(
                g, st.u, v, momentum=m, nesterov=state.nesterov, u_out=st.u_next, v_out=v_next,
                rate=r,
            )  # fmt: skip
            if whole is not None:
                commits.append(_Pending(st, None, swap_u=m > 0))
                pos += n
                continue
            seed = step * 1_000_003 + state._order[p] * 7_919 + rank * 104_729
            cand = v_next if mask is None else v_next[mask.kept]  # masked: the kept only
            sel = sparsify.select_topk(
                cand, k, exact=state.exact_topk, sample_ratio=state.sample_ratio, start=seed
            )
            idx = sel if mask is None else mask.kept[sel]
            # sent in v's units, bounded by what v accumulated (a late r_t ~ 1e-7 of a cosine
            # would overflow fp16 in gradient units); every receiver divides by r_t
            vals = v_next[idx].div_(world)
            c = idx.numel()
            if sparse:
                p_idx[pos : pos + c] = idx
                p_val[pos : pos + c] = vals
                if c < k:  # padding: value 0 (payload is zeroed) at a valid index
                    p_idx[pos + c : pos + k] = idx[0] if c else 0
                pos += k
            else:
                assert reduced is not None  # the dense path's buffer (kept entries only)
                reduced[pos : pos + sizes[p]].index_put_((sel,), vals.to(vdt))
                pos += sizes[p]
            # at rate 0 the output is 0 (in finish): nothing was applied, nothing leaves v
            commits.append(_Pending(st, idx if r else None, swap_u=m > 0, swap_v=True))
        if whole is not None:
            seed = step * 1_000_003 + bucket.index() * 7_919 + rank * 104_729
            idx = sparsify.select_topk(
                whole, total_k, exact=state.exact_topk, sample_ratio=state.sample_ratio, start=seed
            )
            vals = whole[idx].div_(world)  # in v's units, as above
            c = idx.numel()
            if sparse:  # positions in the concatenation (int32: a bucket holds < 2^31)
                p_idx[:c] = idx
                p_val[:c] = vals
                if c < total_k:
                    p_idx[c:] = idx[0] if c else 0
            else:  # the dense buffer holds the compressed parameters in the same order
                assert reduced is not None  # the dense path's buffer
                reduced[:comp_numel].index_put_((idx,), vals.to(vdt))
            parts = [(state._params[p], n) for p, _, n, _ in comp_items]
            commits.append(_BucketResidual(whole, idx, parts))
        state._cur.select_s += time.perf_counter() - t0
        if sparse:
            gathered = torch.empty(world * payload.numel(), dtype=torch.int32, device=buf.device)
            futures.append(
                dist.all_gather_single(
                    gathered, payload, group=state.process_group, async_op=True
                ).get_future()
            )
            sent_bytes += payload.numel() * 4
        else:
            # The dense parameters ride in the same allreduce: one collective for the bucket.
            assert reduced is not None  # the dense path's buffer
            if dense_items:
                dense_buf = reduced[comp_sent:-1]
                pos = 0
                for p, o, n in dense_items:
                    dense_buf[pos : pos + sizes[p]].copy_(_sent(buf[o : o + n], masks.get(p)))
                    dense_buf[pos : pos + sizes[p]].div_(world)
                    pos += sizes[p]
            futures.append(
                dist.all_reduce(reduced, group=state.process_group, async_op=True).get_future()
            )
            sent_bytes += reduced.numel() * reduced.element_size()

    if dense_items and reduced is None:
        if not comp_items and vdt == buf.dtype and dense_numel == off:
            dense_buf = buf.div_(world)  # the whole bucket: reduce in place, like allreduce_hook
        else:
            sent = [_sent(buf[o : o + n], masks.get(p)) for p, o, n in dense_items]
            dense_buf = torch.cat(sent).div_(world)
            dense_buf = dense_buf.to(vdt)
        futures.append(
            dist.all_reduce(dense_buf, group=state.process_group, async_op=True).get_future()
        )
        sent_bytes += dense_buf.numel() * dense_buf.element_size()
    if dense_items and m > 0:
        for p, _, n in dense_items:
            state._param_state(p).ensure(buf[:n], momentum=True, residual=False)
    # (param, offset, numel) of the bucket's parameters with weight decay: buffers made here, on
    # the training thread, used in the callback
    decayed = [(p, o, n) for p, o, n, _ in comp_items if p in state._decay]
    decayed += [(p, o, n) for p, o, n in dense_items if p in state._decay]
    for p, _, n in decayed:
        state._param_state(p).ensure(buf[:n], momentum=False, residual=False, decay=True)

    state._cur.sent += sent_bytes
    state._cur.dense += buf.numel() * buf.element_size()
    state._pending.extend(commits)
    if bucket.is_last():
        state._end_step()

    if not futures:  # an empty bucket (a hierarchical share of none of its parameters)
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buf)
        return done

    def finish(_: Any) -> torch.Tensor:
        if gathered is not None:
            rows = gathered.view(world, -1)
            vals = rows[:, total_k + _FLAG_WORDS :].view(vdt)[:, :total_k]
            # A flag, or a value that overflowed value_dtype when packed (fp16): every rank
            # sees the same gathered rows, so every rank takes the same decision.
            bad = bool(rows[:, total_k].any()) or not bool(
                torch.isfinite(vals.sum(dtype=torch.float32))
            )
            if dense_buf is not None and not bad:
                bad = not bool(torch.isfinite(dense_buf.sum(dtype=torch.float32)))
        elif reduced is not None:
            # Also a sum that overflowed value_dtype: its state update must not be committed.
            bad = bool(reduced[-1] > 0) or not bool(
                torch.isfinite(reduced.sum(dtype=torch.float32))
            )
        else:
            assert dense_buf is not None  # neither path compressed: all dense
            bad = not bool(torch.isfinite(dense_buf.sum(dtype=torch.float32)))
        if bad:
            with state._lock:
                state._step_bad = True
            return buf.fill_(float("nan"))
        if gathered is not None:
            idx = rows[:, :total_k].to(torch.long)
            vals = vals.to(buf.dtype)
            which = None  # selection "bucket": each pair's parameter
            if whole is not None:
                which = _positions_to_offsets(idx, comp_items)
            else:
                starts = torch.tensor([o for _, o, _, _ in comp_items], device=buf.device)
                idx += torch.repeat_interleave(starts, torch.tensor(ks, device=buf.device))
            for _, o, n, _ in comp_items:
                buf[o : o + n].zero_()
            buf.index_add_(0, idx.view(-1), vals.reshape(-1))
            if any(r != 1.0 for r in rates):
                # lr_weighted: from v's units to the step's gradient, after the sum, as the
                # dense path does (the same bits whichever path a bucket takes)
                _divide_sent(buf, idx, rates, ks, which)
        elif reduced is not None:
            pos = 0
            for (p, o, n, _), r in zip(comp_items, rates, strict=True):
                got = reduced[pos : pos + sizes[p]]
                pos += sizes[p]
                mask = masks.get(p)
                out = buf[o : o + n]
                if mask is not None:  # the kept entries' sums, zero elsewhere
                    out.zero_().index_copy_(0, mask.kept, got.to(buf.dtype))
                    got = out
                if r != 1.0:  # from v's units to the step's gradient
                    torch.mul(got, 1.0 / r if r else 0.0, out=out)
                elif got is not out:
                    out.copy_(got)
        if dense_buf is not None:
            pos = 0
            pend = []
            for p, o, n in dense_items:
                gbar = dense_buf[pos : pos + sizes[p]].to(buf.dtype)
                pos += sizes[p]
                mask = masks.get(p)
                if mask is not None:  # the kept entries' averages, zero elsewhere
                    gbar = buf.new_zeros(n).index_copy_(0, mask.kept, gbar)
                if m == 0:
                    buf[o : o + n].copy_(gbar)
                    continue
                st = state._params[p]
                assert st.u is not None and st.u_next is not None  # ensure(momentum=True)
                torch.add(gbar, st.u, alpha=m, out=st.u_next)
                if state.nesterov:
                    torch.add(gbar, st.u_next, alpha=m, out=buf[o : o + n])
                else:
                    buf[o : o + n].copy_(st.u_next)
                pend.append(_Pending(st, None, swap_u=True))
            with state._lock:
                state._pending.extend(pend)
        if decayed:
            _add_decay(state, decayed, buf)
        return buf

    fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    return fut.then(finish)


def _sent(g: torch.Tensor, mask: Any) -> torch.Tensor:
    """What a dense parameter sends: its gradient, or only its kept entries under a mask."""
    return g if mask is None else g.index_select(0, mask.kept)


def _positions_to_offsets(
    idx: torch.Tensor, comp_items: list[tuple[torch.Tensor, int, int, int]]
) -> torch.Tensor:
    """Selection "bucket", in place: positions in the concatenated compressed parameters ->
    offsets in the bucket; returns each pair's parameter (its number in ``comp_items``)."""
    sizes = torch.tensor([n for _, _, n, _ in comp_items], device=idx.device)
    ends = sizes.cumsum(0)
    # per parameter: its offset in the bucket - its start in the concatenation
    shift = torch.tensor([o for _, o, _, _ in comp_items], device=idx.device) - (ends - sizes)
    which = torch.searchsorted(ends, idx, right=True)
    idx += shift[which]
    return which


def _divide_sent(
    buf: torch.Tensor,
    idx: torch.Tensor,
    rates: list[float],
    ks: list[int],
    which: torch.Tensor | None,
) -> None:
    """Divide the summed entries at ``idx`` (every rank's, bucket offsets) by their parameter's
    r_t (0 at rate 0); ``which``: each pair's parameter (selection "bucket"), else per-parameter
    runs of ``ks`` pairs. An index sent by several ranks is rewritten with the same value."""
    if which is None:
        pos = 0
        for k, r in zip(ks, rates, strict=True):
            if r != 1.0:  # a Python scalar: nothing to copy to the device
                at = idx[:, pos : pos + k].reshape(-1)
                buf.index_put_((at,), buf[at] * (1.0 / r if r else 0.0))
            pos += k
        return
    at = idx.view(-1)
    if len(set(rates)) == 1:
        buf.index_put_((at,), buf[at] * (1.0 / rates[0]))
    else:  # parameter groups at different rates (all > 0 here)
        inv = torch.tensor([1.0 / r for r in rates], dtype=buf.dtype, device=buf.device)
        buf.index_put_((at,), buf[at] * inv[which.view(-1)])


def _add_decay(
    state: DGCState, items: list[tuple[torch.Tensor, int, int]], buf: torch.Tensor
) -> None:
    """Add each parameter's decay momentum term to its output in ``buf`` (DGC.md leaves weight
    decay local: computed from the weights on every rank alike, never sent)."""
    scale = state._scale or 1.0  # outputs are in loss-scaled units, and so is d
    pend = []
    for p, o, n in items:
        st = state._params[p]
        w = flat_view(p)  # the bucket holds the gradient in this order (DDP's bucket views)
        assert st.d is not None and st.d_next is not None  # ensure(decay=True), in the hook
        term = sparsify.decay_momentum(
            w,
            st.d,
            momentum=state.momentum,
            weight_decay=state._decay[p] * scale,
            nesterov=state.nesterov,
            d_out=st.d_next,
        )
        mask = state._masks.get(p)
        if mask is not None:  # pruned weights are zero; keep d zero where they are not yet
            st.d_next.mul_(mask.keep)
            term.mul_(mask.keep)
        buf[o : o + n].add_(term)
        pend.append(_Pending(st, None, swap_d=True))
    with state._lock:
        state._pending.extend(pend)
