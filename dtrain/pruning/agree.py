"""Every rank prunes the same: digests of masks or channel indices compared with one all-reduce,
and data-dependent scores summed over ranks before anything is selected from them.

DDP does not check this: it broadcasts rank 0's weights into models pruned differently on each
rank and trains on, and scores computed from each rank's own batches (Taylor, activation counts)
pick different channels. :func:`all_reduce_scores` makes the scores the same everywhere;
:func:`verify_identical` proves the selection is, before any weight changes.
"""

import hashlib

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Disagreement", "all_reduce_scores", "digest", "verify_identical"]


class Disagreement(RuntimeError):
    """The ranks chose different masks or channels; raised on every rank alike.

    Attributes:
        name: the first tensor (layer) whose digest differs.
    """

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def digest(t: Tensor) -> int:
    """A 63-bit digest of a tensor's shape, dtype and values (SHA-256; read to the host)."""
    a = t.detach().cpu().contiguous()
    if a.dtype == torch.bool:
        a = a.to(torch.uint8)
    h = hashlib.sha256(f"{tuple(a.shape)}|{a.dtype}|".encode())
    h.update(np.ascontiguousarray(a.numpy()).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _world(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def verify_identical(
    named: dict[str, Tensor],
    *,
    what: str = "mask",
    device: torch.device | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Raise :class:`Disagreement` on every rank unless every rank holds the same tensors.

    One all-reduce (MAX of each digest and of its negation) of two int64 per tensor.

    Args:
        named: ``{name: tensor}``, the same names in the same order on every rank.
        what: what the tensors are, for the message (``"mask"``, ``"kept channels"``).
        device: where the collective runs (a CUDA device under NCCL); default CPU.
        group: the process group (default: the world).
    """
    if _world(group) == 1 or not named:
        return
    d = torch.tensor([digest(t) for t in named.values()], dtype=torch.int64, device=device)
    both = torch.cat([d, -d])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: d.numel()], -both[d.numel() :]
    differ = (hi != lo).tolist()
    for name, bad in zip(named, differ, strict=True):
        if bad:
            raise Disagreement(
                f"ranks disagree on the {what} of {name} (digests differ): scores computed from "
                f"each rank's own data must be all-reduced before selecting",
                name,
            )


def all_reduce_scores(
    scores: dict[str, Tensor], *, group: dist.ProcessGroup | None = None
) -> dict[str, Tensor]:
    """Sum each score tensor over ranks, in place, with one all-reduce; returns ``scores``."""
    if _world(group) == 1 or not scores:
        return scores
    flat = torch.cat([s.detach().flatten().to(torch.float64) for s in scores.values()])
    dist.all_reduce(flat, group=group)
    pos = 0
    for s in scores.values():
        s.copy_(flat[pos : pos + s.numel()].view_as(s))
        pos += s.numel()
    return scores
