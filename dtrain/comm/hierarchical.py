"""Hierarchical DGC: dense inside a node, Deep Gradient Compression only across nodes.

Real clusters have fast links inside a node (NVLink, PCIe, shared memory) and slow ones between
nodes. :func:`hierarchical_dgc_hook` spends compression only where bandwidth is scarce:

1. the bucket's parameters are split into ``L`` contiguous shares of about equal size, one per
   local rank, and a dense reduce-scatter in the node group gives each local rank the node's
   average of its own share (or, where padding the shares to one size would cost more, an
   allreduce of the whole bucket);
2. local rank ``l`` runs DGC (:func:`dtrain.comm.dgc.dgc_hook`, every rule of
   ``shared/DGC.md``) on its share with the ranks of local rank ``l`` on the other nodes, so each
   node sends each share once, sparsely, over the slow links;
3. the shares are put back together inside the node (one all-gather in the node group, or an
   allreduce in which each rank filled only its share).

With one node this is a dense allreduce plus DGC on a group of one; with one rank per node it is
flat DGC plus two no-op reductions. Momentum and residuals live with the rank that owns the share
(1/L of the model per rank). A non-finite gradient anywhere makes every share non-finite before
the sparse exchange, so every rank skips the step and no residual changes (DGC.md).

Note: no ``from __future__ import annotations`` here — DDP inspects the hook's annotations.
"""

import itertools
import logging
from typing import Any

import torch
import torch.distributed as dist

from dtrain.comm.dgc import DGCState, dgc_hook

__all__ = ["HierarchicalDGCState", "hierarchical_dgc_hook", "node_groups"]

logger = logging.getLogger(__name__)


def node_groups(local_size: int) -> tuple[Any, Any, int, int]:
    """``(node_group, cross_group, node, local_rank)`` for this rank; every rank must call it.

    Ranks ``[n*L, (n+1)*L)`` form node ``n``; the cross group of local rank ``l`` holds rank
    ``n*L + l`` of every node.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if local_size < 1 or world % local_size:
        raise ValueError(
            f"local_size must divide the world size {world}, got {local_size}: "
            f"start the same number of processes on every node"
        )
    nodes = world // local_size
    node_group = cross_group = None
    for n in range(nodes):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(n * local_size, (n + 1) * local_size)))
        if rank // local_size == n:
            node_group = g
    for lr in range(local_size):
        g = dist.new_group([n * local_size + lr for n in range(nodes)])
        if rank % local_size == lr:
            cross_group = g
    return node_group, cross_group, rank // local_size, rank % local_size


class _Share:
    """The part of a bucket one local rank compresses, shaped like a ``dist.GradBucket``."""

    def __init__(self, bucket: dist.GradBucket, start: int, stop: int, params: list) -> None:
        self._buffer = bucket.buffer()[start:stop]
        self._params = params
        self._last = bucket.is_last()
        self._index = bucket.index()

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return self._last

    def index(self) -> int:
        return self._index


def split_shares(numels: list[int], parts: int) -> list[tuple[int, int]]:
    """Split parameters (by their sizes, in order) into ``parts`` contiguous ranges of about
    equal total size; returns ``[(first, stop), ...]`` parameter index ranges (some may be
    empty when there are fewer parameters than parts)."""
    total = sum(numels)
    bounds, acc, i = [0], 0, 0
    for part in range(1, parts):
        target = total * part / parts
        while i < len(numels) and acc + numels[i] / 2 <= target:
            acc += numels[i]
            i += 1
        bounds.append(max(i, bounds[-1]))
    bounds.append(len(numels))
    return list(itertools.pairwise(bounds))


class HierarchicalDGCState:
    """State of :func:`hierarchical_dgc_hook`: the groups and the DGC state of this rank's shares.

    Args:
        local_size: ranks per node (torchrun's ``LOCAL_WORLD_SIZE``); the world size must be a
            multiple of it and ranks must be numbered node by node (torchrun and srun do).
        **dgc_kwargs: :class:`DGCState` arguments (density, momentum, ...) for the cross-node
            exchange; its process group is this rank's cross-node group.
    """

    def __init__(self, *, local_size: int, **dgc_kwargs: Any) -> None:
        # ---- groups ----
        self.node_group, cross_group, self.node, self.local_rank = node_groups(local_size)
        self.local_size = local_size
        # ---- the DGC state of this rank's shares ----
        self.dgc = DGCState(cross_group, **dgc_kwargs)
        # ---- statistics ----
        self._node_bytes = [0, 0, 0]  # this step, last step, total: bytes sent inside the node
        self._dense = [0, 0, 0]  # what flat allreduce would send: whole buckets
        # bucket layout (parameter sizes) -> every share's parameter and element ranges
        self._shares: dict[tuple[int, ...], tuple[list, list]] = {}
        logger.info(
            "hierarchical DGC: node %d, local rank %d of %d; sparse exchange across %d nodes",
            self.node,
            self.local_rank,
            local_size,
            dist.get_world_size() // local_size,
        )

    # The job-facing API of DGCState, so trainers and checkpoints treat both alike.
    def attach(self, named_parameters: Any) -> None:
        self.dgc.attach(named_parameters)

    @property
    def grad_scaler(self) -> Any:
        return self.dgc.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        self.dgc.grad_scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return {"dgc": self.dgc.state_dict(), "node_bytes_total": self._node_bytes[2],
                "dense_bytes_total": self._dense[2]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dgc.load_state_dict(state["dgc"])
        self._node_bytes[2] = int(state["node_bytes_total"])
        self._dense[2] = int(state["dense_bytes_total"])

    def stats(self) -> dict[str, float]:
        """DGC's statistics with whole-model dense bytes; ``bytes_sent`` is what crosses nodes.

        ``node_bytes_sent`` counts the dense payload handed to the collectives inside the node
        (the padded reduce-scatter input and the all-gather input, per bucket).
        """
        s = dict(self.dgc.stats())
        s["dense_bytes"], s["dense_bytes_total"] = self._dense[1], self._dense[2]
        s["ratio"] = s["dense_bytes"] / s["bytes_sent"] if s["bytes_sent"] else 0.0
        total = s["bytes_sent_total"]
        s["ratio_total"] = s["dense_bytes_total"] / total if total else 0.0
        s["node_bytes_sent"], s["node_bytes_sent_total"] = self._node_bytes[1], self._node_bytes[2]
        return s

    def _layout(
        self, bucket: dist.GradBucket
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Every local rank's share of this bucket: parameter ranges and element ranges."""
        key = tuple(p.numel() for p in bucket.parameters())
        if key not in self._shares:
            params = split_shares(list(key), self.local_size)
            offsets = [0]
            for n in key:
                offsets.append(offsets[-1] + n)
            self._shares[key] = (params, [(offsets[a], offsets[b]) for a, b in params])
        return self._shares[key]


def hierarchical_dgc_hook(
    state: HierarchicalDGCState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` densely inside the node, compress only the exchange across nodes.

    1. Reduce-scatter in the node group (dense; the fast link): this rank receives the node's
       sum of its share (÷ L), plus the number of the node's ranks that saw a non-finite value.
    2. If any did, poison every share, so that every cross-node DGC exchange flags the step and
       every rank skips it.
    3. DGC on this rank's share with the same local rank of every other node (sparse; the slow
       link), waited for here: the next collective needs its result, and collectives are only
       ever started in the hook body (gloo runs callbacks on its own threads, in varying order).
    4. All-gather of the shares in the node group: each rank receives every share.

    Args:
        state: the :class:`HierarchicalDGCState`.
        bucket: the gradient bucket DDP hands over.

    Returns:
        A future of the averaged, momentum-corrected bucket.

    Example::
        >>> state = HierarchicalDGCState(local_size=8, density=0.001)
        >>> state.attach(model.named_parameters())
        >>> ddp_model.register_comm_hook(state, hierarchical_dgc_hook)
    """
    buf = bucket.buffer()
    nbytes = buf.numel() * buf.element_size()
    L = state.local_size
    params, elems = state._layout(bucket)
    first, stop = params[state.local_rank]
    start, end = elems[state.local_rank]
    share = _Share(bucket, start, end, bucket.parameters()[first:stop])
    m = max(e - s for s, e in elems) + 1  # a padded share, plus one flag element
    # Reduce-scatter + all-gather of padded shares moves (L+1)·m elements per rank; two
    # allreduces of the bucket 2·numel. Unbalanced shares (a bucket of one large and a few small
    # parameters) pad badly: then the allreduces are cheaper.
    scatter = L > 1 and (L + 1) * m < 2 * buf.numel()
    mine = None
    if scatter:
        # Each local rank receives the node's sum of its own share only; the extra element of
        # every padded share carries "this rank saw a non-finite gradient" to the whole node.
        send = buf.new_zeros(L * m)
        flag = 0.0 if bool(torch.isfinite(buf.sum())) else 1.0
        for lr, (s, e) in enumerate(elems):
            send[lr * m : lr * m + e - s] = buf[s:e]
            send[lr * m + m - 1] = flag
        mine = buf.new_empty(m)
        dist.reduce_scatter_single(mine, send, group=state.node_group)
        share.buffer().copy_(mine[: end - start]).div_(L)
        nonfinite = bool(mine[-1] > 0)
        node_sent = (send.numel() + m) * buf.element_size()
    else:
        if L > 1:  # every rank then holds the node's bucket: a non-finite value shows everywhere
            dist.all_reduce(buf.div_(L), group=state.node_group)
        nonfinite = not bool(torch.isfinite(buf.sum()))
        node_sent = 2 * nbytes if L > 1 else 0
    empty = share.buffer().numel() == 0  # a bucket of fewer (or lopsided) parameters than L
    if nonfinite and not empty:
        share.buffer()[0] = float("nan")  # every share's DGC exchange flags the step
    dgc_hook(state.dgc, share).wait()  # writes the share's result in place
    if nonfinite and empty:  # no exchange to flag: drop this rank's updates of the step directly
        with state.dgc._lock:
            state.dgc._step_bad = True
    fut = None
    if scatter:
        mine[: end - start].copy_(share.buffer())
        gathered = buf.new_empty(L * m)
        fut = dist.all_gather_single(
            gathered, mine, group=state.node_group, async_op=True
        ).get_future()
    elif L > 1:  # every rank contributes its share, zeros elsewhere
        buf[:start].zero_()
        buf[end:].zero_()
        fut = dist.all_reduce(buf, group=state.node_group, async_op=True).get_future()
    st = state
    st._node_bytes[0] += node_sent
    st._dense[0] += nbytes
    if bucket.is_last():
        st._node_bytes[1], st._dense[1] = st._node_bytes[0], st._dense[0]
        st._node_bytes[2] += st._node_bytes[0]
        st._dense[2] += st._dense[0]
        st._node_bytes[0] = st._dense[0] = 0
    if fut is None:
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut
    if not scatter:
        return fut.then(lambda _: buf)

    def finish(_: Any) -> torch.Tensor:
        # gloo's future yields chunk views: read the tensor we allocated.
        for lr, (s, e) in enumerate(elems):
            buf[s:e].copy_(gathered[lr * m : lr * m + e - s])
        return buf

    return fut.then(finish)
