"""Bytes on the wire for DGC's two ways of exchanging a bucket, as small pure functions.

DGC's sparse exchange is an **all-gather** of every rank's packed (index, value) pairs: each rank
receives everyone's k pairs, so its traffic grows with the world size N. A **dense reduction**
(ring allreduce) costs about ``2 (N-1)/N`` times the buffer, whatever N. Past some N (or density)
the all-gather loses. :func:`choose_exchange` picks the cheaper per bucket; :mod:`dtrain.comm.dgc`
calls it once per bucket layout when ``DGCState(exchange="auto")``.

The model counts bytes only (no latency: the sparse path runs one all-gather per bucket, plus
an allreduce when the bucket holds dense parameters; the dense path one allreduce) for ring
algorithms (gloo's and NCCL's large-message defaults), in which every rank sends as many bytes as
it receives:

* **payload** (:func:`sparse_payload_bytes`, :func:`dense_payload_bytes`): the buffer one rank
  hands to the collective, exactly what :mod:`dtrain.comm.dgc` builds. This is what
  ``DGCState.stats()["bytes_sent"]`` counts (DGC.md's "bytes sent", against which the compression
  ratio is defined).
* **traffic** (:func:`allgather_bytes`, :func:`allreduce_bytes`): the bytes each rank sends (and
  receives) on the wire for one collective of that payload. Ring all-gather of a P-byte payload:
  ``(N-1) P``. Ring allreduce of B bytes: reduce-scatter plus all-gather, ``2 (N-1)/N B``. At
  N = 2 both equal the payload.

Sparse all-gather of a bucket whose compressed parameters select ``k_i`` entries each
(``K = sum k_i``), values of ``b`` bytes::

    P = 4 * (K + 1 + ceil(K * b / 4))        # K int32 indices, 1 flag word, values in 4-byte words
    sparse(N) = (N - 1) * P

Sparse-to-dense reduction of the same parameters (``M = sum numel_i``): each rank scatters its
pairs into a zero buffer of M values plus one flag element, and the buffer is ring-allreduced::

    D = (M + 1) * b
    dense(N) = 2 (N - 1) / N * D

Dense wins when ``dense(N) < sparse(N)``, i.e. (for N >= 2) ``N * P > 2 D``. With fp32 values
``P ~ 8K = 8dM`` and ``D ~ 4M``, so the crossover is ``N ~ 1/d``: 1000 ranks at density 0.001.
Parameters DGC never compresses (1-D, small) are allreduced in both cases and do not enter the
choice.
"""

import math
from collections.abc import Iterable, Sequence

from dtrain.comm import sparsify

__all__ = [
    "EXCHANGES",
    "allgather_bytes",
    "allreduce_bytes",
    "choose_exchange",
    "crossover_world_size",
    "dense_payload_bytes",
    "exchange_bytes",
    "layout_crossover",
    "model_bytes",
    "model_crossover",
    "model_payload_bytes",
    "sparse_payload_bytes",
]

EXCHANGES = ("auto", "sparse", "dense")
WORD_BYTES = 4  # the sparse payload is a buffer of int32 words
INDEX_BYTES = 4  # int32 indices
FLAG_WORDS = 1  # sparse payload: one word saying "this rank saw a non-finite gradient"
FLAG_ELEMENTS = 1  # dense buffer: one element carrying the same flag as 1.0 / 0.0


def sparse_payload_bytes(ks: Iterable[int], *, value_bytes: int) -> int:
    """Bytes of one rank's packed sparse payload for a bucket: ``4 (K + 1 + ceil(K b / 4))``.

    Args:
        ks: entries selected per compressed parameter (k of DGC.md; padding included: every rank
            sends exactly k).
        value_bytes: bytes per value on the wire (4 for fp32, 2 for fp16/bf16).
    """
    total_k = sum(ks)
    value_words = math.ceil(total_k * value_bytes / WORD_BYTES)
    index_words = total_k * INDEX_BYTES // WORD_BYTES
    return WORD_BYTES * (index_words + FLAG_WORDS + value_words)


def dense_payload_bytes(numel: int, *, value_bytes: int) -> int:
    """Bytes of the sparse-to-dense buffer: ``numel`` values plus the flag element."""
    return (numel + FLAG_ELEMENTS) * value_bytes


def allgather_bytes(payload_bytes: int, *, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-gather: ``(N - 1) * payload``."""
    return (world_size - 1) * payload_bytes


def allreduce_bytes(numel: int, *, elem_bytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring allreduce: ``2 (N-1)/N * numel * b``."""
    return 2 * (world_size - 1) / world_size * numel * elem_bytes


def exchange_bytes(
    numels_and_ks: Sequence[tuple[int, int]], *, world_size: int, value_bytes: int
) -> tuple[float, float]:
    """``(sparse, dense)``: bytes each rank sends per step for a bucket's compressed parameters.

    ``sparse`` is the ring all-gather of the packed pairs, ``dense`` the ring allreduce of the
    sparse-to-dense buffer (see the module docstring for the formulas).

    Args:
        numels_and_ks: ``(numel, k)`` of each compressed parameter of the bucket.
        world_size: N, the ranks taking part.
        value_bytes: bytes per value on the wire.
    """
    payload = sparse_payload_bytes((k for _, k in numels_and_ks), value_bytes=value_bytes)
    numel = sum(n for n, _ in numels_and_ks)
    sparse = allgather_bytes(payload, world_size=world_size)
    dense = allreduce_bytes(numel + FLAG_ELEMENTS, elem_bytes=value_bytes, world_size=world_size)
    return float(sparse), dense


def choose_exchange(
    numels_and_ks: Sequence[tuple[int, int]], *, world_size: int, value_bytes: int
) -> str:
    """``"dense"`` if the sparse-to-dense allreduce sends fewer bytes than the sparse all-gather,
    else ``"sparse"`` (ties, including N = 1, go to the sparse all-gather)."""
    sparse, dense = exchange_bytes(numels_and_ks, world_size=world_size, value_bytes=value_bytes)
    return "dense" if dense < sparse else "sparse"


def crossover_world_size(numel: int, density: float, value_bytes: int) -> int:
    """The smallest world size N at which the dense reduction sends fewer bytes than the
    all-gather, for one compressed tensor alone in its bucket.

    With ``k = max(1, ceil(d * numel))`` (:func:`dtrain.comm.sparsify.num_selected`),
    ``P = 4 (k + 1 + ceil(k b / 4))`` and ``D = (numel + 1) b``, dense wins when
    ``2 (N-1)/N D < (N-1) P``, i.e. ``N P > 2 D`` (N >= 2; at N = 1 nothing is sent), so::

        N* = floor(2 D / P) + 1

    With fp32 values this is about ``1 / d`` (``2/(3d)`` with fp16); at ``d = 1`` it is 2.
    """
    k = sparsify.num_selected(numel, density)
    return layout_crossover([(numel, k)], value_bytes=value_bytes)


def layout_crossover(numels_and_ks: Sequence[tuple[int, int]], *, value_bytes: int) -> int:
    """:func:`crossover_world_size` for a bucket of compressed parameters with these
    ``(numel, k)``: ``floor(2 D / P) + 1`` with P and D summed over them (one flag each)."""
    p = sparse_payload_bytes((k for _, k in numels_and_ks), value_bytes=value_bytes)
    d = dense_payload_bytes(sum(n for n, _ in numels_and_ks), value_bytes=value_bytes)
    return max(2, 2 * d // p + 1)


def model_crossover(
    shapes: Iterable[Sequence[int]],
    *,
    density: float,
    value_bytes: int,
    min_compress_numel: int = 1024,
) -> int | None:
    """:func:`layout_crossover` of a whole model as one bucket (arguments as in
    :func:`model_bytes`; the dense parameters cost the same both ways and do not enter), or
    None if nothing is compressed."""
    comp, _ = _split(shapes, density, min_compress_numel)
    return layout_crossover(comp, value_bytes=value_bytes) if comp else None


def _split(
    shapes: Iterable[Sequence[int]], density: float, min_compress_numel: int
) -> tuple[list[tuple[int, int]], int]:
    """``(numel, k)`` of the parameters DGC compresses, and the number of entries it sends dense
    (1-D parameters and those with fewer than ``min_compress_numel`` entries)."""
    comp: list[tuple[int, int]] = []
    dense_numel = 0
    for shape in shapes:
        n = math.prod(shape)
        if len(shape) <= 1 or n < min_compress_numel:
            dense_numel += n
        else:
            comp.append((n, sparsify.num_selected(n, density)))
    return comp, dense_numel


def _resolve(exchange: str, comp: list[tuple[int, int]], world_size: int, value_bytes: int) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    if exchange == "auto":
        return choose_exchange(comp, world_size=world_size, value_bytes=value_bytes)
    return exchange


def model_bytes(
    shapes: Iterable[Sequence[int]],
    *,
    world_size: int,
    density: float,
    value_bytes: int,
    exchange: str,
    min_compress_numel: int = 1024,
) -> float:
    """Bytes each rank sends (= receives) per step for a whole model, with DGC's rules.

    Parameters that are 1-D or have fewer than ``min_compress_numel`` entries are allreduced
    densely (values in ``value_bytes``, as the hook sends them); the others are compressed with
    ``k = num_selected(numel, density)`` and exchanged by ``exchange``: ``"sparse"``, ``"dense"``
    or ``"auto"`` (the cheaper). The model is treated as one bucket (one flag); DDP's split into
    buckets changes this by a few bytes per bucket (sum this over buckets to be exact).

    Args:
        shapes: the parameters' shapes, e.g. ``[p.shape for p in model.parameters()]``.
        world_size: N.
        density: d.
        value_bytes: bytes per value on the wire.
        exchange: ``"sparse"``, ``"dense"`` or ``"auto"``.
        min_compress_numel: as in :class:`dtrain.comm.dgc.DGCState`.
    """
    comp, dense_numel = _split(shapes, density, min_compress_numel)
    how = _resolve(exchange, comp, world_size, value_bytes)
    total = allreduce_bytes(dense_numel, elem_bytes=value_bytes, world_size=world_size)
    if comp:
        sparse, dense = exchange_bytes(comp, world_size=world_size, value_bytes=value_bytes)
        total += sparse if how == "sparse" else dense
    return total


def model_payload_bytes(
    shapes: Iterable[Sequence[int]],
    *,
    world_size: int,
    density: float,
    value_bytes: int,
    exchange: str,
    min_compress_numel: int = 1024,
) -> int:
    """What ``DGCState.stats()["bytes_sent"]`` reports for a step of a one-bucket model: the
    payloads this rank hands to the collectives (arguments as in :func:`model_bytes`).

    Sparse: the packed pairs plus the dense parameters' buffer. Dense: one buffer holding the
    compressed parameters, the dense ones and the flag element.
    """
    comp, dense_numel = _split(shapes, density, min_compress_numel)
    how = _resolve(exchange, comp, world_size, value_bytes)
    if not comp:
        return dense_numel * value_bytes
    if how == "sparse":
        ks = [k for _, k in comp]
        return sparse_payload_bytes(ks, value_bytes=value_bytes) + dense_numel * value_bytes
    return dense_payload_bytes(sum(n for n, _ in comp) + dense_numel, value_bytes=value_bytes)
