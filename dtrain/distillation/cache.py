"""A cache of the teacher's outputs on a fixed training set, one shard per rank.

With unaugmented data the teacher's logits for sample ``i`` never change, so they are computed
once: rank ``r`` runs the teacher on its strided shard ``x[r::world]`` and saves it as
``rank{r}-of-{world}.pt`` with the cache's key (the teacher's weights, the data, the precision,
the shard); an all-gather then gives every rank the whole table, which the training steps index
by sample (later epochs run no teacher forward, on any rank, whatever the shuffle). A later start
(a resume, another student of the same teacher) reads its shard back instead of recomputing it
when the key matches.

:func:`fingerprint` and :func:`shard_rows` are pure; :func:`check_shard` reads one file;
:func:`build_table` is collective (every rank calls it alike).
"""

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dtrain.checkpoint import atomic_torch_save

__all__ = ["build_table", "cache_key", "check_shard", "fingerprint", "shard_file", "shard_rows"]

FORMAT = 1


def fingerprint(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors' names, dtypes, shapes and bytes (a state dict's items, a data
    set's arrays): equal exactly when they are bitwise equal."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(
    *, teacher: Mapping[str, Tensor], x: Tensor, precision: str, rank: int, world_size: int
) -> dict[str, Any]:
    """What a shard's logits depend on: the teacher's weights, the inputs, the precision the
    teacher runs in and which rows the shard holds."""
    return {
        "format": FORMAT,
        "teacher": fingerprint(sorted(teacher.items())),
        "data": fingerprint([("x", x)]),
        "samples": len(x),
        "precision": precision,
        "rank": rank,
        "world_size": world_size,
    }


def shard_file(directory: Path, rank: int, world_size: int) -> Path:
    return Path(directory) / f"rank{rank:05d}-of-{world_size:05d}.pt"


def shard_rows(n: int, rank: int, world_size: int) -> range:
    """The samples rank ``rank`` computes: ``rank, rank + world_size, ...`` below ``n``."""
    return range(rank, n, world_size)


_WHAT = {
    "teacher": "teacher (other weights)",
    "data": "training data",
    "samples": "number of training samples",
    "precision": "run.precision",
    "format": "cache format",
}


def check_shard(path: Path, key: Mapping[str, Any]) -> str | None:
    """Why the shard at ``path`` does not fit ``key`` (``"missing"``, ``"unreadable"``, or what
    differs), or None when it can be used."""
    if not path.is_file():
        return "missing"
    try:
        # memory-mapped: the key is read, the logits are not (build_table reads them once)
        saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        saved_key = saved["key"]
        saved["logits"]
    except Exception:
        return "unreadable"
    diff = [_WHAT.get(k, k) for k in key if saved_key.get(k) != key[k]]
    return f"built for another {', '.join(diff)}" if diff else None


def build_table(
    teacher: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    key: Mapping[str, Any],
    directory: Path,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device,
    reuse: bool,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda r: r,
) -> Tensor:
    """The teacher's outputs for every row of ``x``, on ``device``, on every rank (collective).

    Args:
        teacher: the frozen teacher's forward (under ``no_grad`` and the job's autocast).
        x: the training inputs (CPU), in the loader's index order.
        key: :func:`cache_key` of this rank's shard.
        directory: where the shard files are (created if missing).
        reuse: read this rank's shard from its file (``check_shard`` found it usable) instead
            of computing and writing it.
        progress: wraps the range of batch starts (a tqdm bar on rank 0).
    """
    rows = shard_rows(len(x), rank, world_size)
    path = shard_file(directory, rank, world_size)
    if reuse:
        mine = torch.load(path, weights_only=True, map_location="cpu")["logits"]
    else:
        idx = torch.tensor(rows, dtype=torch.long)
        outs = [
            teacher(x[idx[i : i + batch_size]].to(device)).float().cpu()
            for i in progress(range(0, len(idx), batch_size))
        ]
        mine = torch.cat(outs) if outs else torch.empty(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, {"key": dict(key), "logits": mine})
    # Every shard padded to the longest, gathered, and dealt back to its rows.
    longest = len(shard_rows(len(x), 0, world_size))
    out_shape = _out_shape(mine, teacher, x, device)
    padded = torch.zeros(longest, *out_shape, dtype=torch.float32, device=device)
    padded[: len(mine)] = mine.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    table = torch.empty(len(x), *out_shape, dtype=torch.float32, device=device)
    for r, part in enumerate(parts):
        n = len(shard_rows(len(x), r, world_size))
        table[r::world_size] = part[:n]
    return table


def _out_shape(
    mine: Tensor, teacher: Callable[[Tensor], Tensor], x: Tensor, device: torch.device
) -> tuple:
    if len(mine):
        return tuple(mine.shape[1:])
    return tuple(teacher(x[:1].to(device)).shape[1:])  # a rank with no rows (n < world_size)
