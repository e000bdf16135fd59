"""The cost model of sparse all-gather against dense reduction, against numbers worked by hand."""

import pytest

from dtrain.comm import DGCState, costmodel
from dtrain.comm.costmodel import (
    allgather_bytes,
    allreduce_bytes,
    choose_exchange,
    crossover_world_size,
    dense_payload_bytes,
    exchange_bytes,
    model_bytes,
    model_payload_bytes,
    sparse_payload_bytes,
)
from dtrain.config import CommConfig
from dtrain.errors import UserError


def test_sparse_payload_counts_indices_flag_and_value_words():
    # k = 1000 of 1e6 at density 0.001: 1000 int32 indices + 1 flag word + 1000 fp32 values.
    assert sparse_payload_bytes([1000], value_bytes=4) == 4 * (1000 + 1 + 1000) == 8004
    # fp16 values: 1000 * 2 bytes = 500 words.
    assert sparse_payload_bytes([1000], value_bytes=2) == 4 * (1000 + 1 + 500) == 6004
    # k = 3 fp16 values are 6 bytes, padded to 2 words; several parameters share one payload.
    assert sparse_payload_bytes([3], value_bytes=2) == 4 * (3 + 1 + 2) == 24
    assert sparse_payload_bytes([1, 2], value_bytes=2) == 24


def test_ring_collectives():
    assert allgather_bytes(8004, world_size=2) == 8004
    assert allgather_bytes(8004, world_size=4) == 3 * 8004 == 24012
    assert allgather_bytes(8004, world_size=1) == 0
    assert allreduce_bytes(1_000_000, elem_bytes=4, world_size=2) == 2 * (1 / 2) * 4e6 == 4e6
    assert allreduce_bytes(1_000_000, elem_bytes=4, world_size=8) == 2 * (7 / 8) * 4e6 == 7e6
    assert dense_payload_bytes(1_000_000, value_bytes=4) == (1_000_000 + 1) * 4 == 4_000_004


def test_exchange_bytes_by_hand():
    # numel 1e6, density 0.001 (k = 1000), fp32, N = 2: sparse sends 1 * 8004 bytes, dense
    # 2 * (1/2) * (1e6 + 1 flag) * 4 = 4000004.
    assert exchange_bytes([(1_000_000, 1000)], world_size=2, value_bytes=4) == (8004, 4_000_004)
    # N = 4: 3 * 8004 = 24012 against 2 * (3/4) * 4000004 = 6000006.
    assert exchange_bytes([(1_000_000, 1000)], world_size=4, value_bytes=4) == (24012, 6_000_006)
    # Two parameters: one payload (one flag), one dense buffer (one flag element).
    sparse, dense = exchange_bytes([(600, 6), (400, 4)], world_size=2, value_bytes=4)
    assert (sparse, dense) == (4 * (10 + 1 + 10), 1001 * 4)


def test_choose_exchange_both_ways_and_ties():
    assert choose_exchange([(1_000_000, 1000)], world_size=2, value_bytes=4) == "sparse"
    assert choose_exchange([(1_000_000, 1000)], world_size=1000, value_bytes=4) == "dense"
    # numel 1000, k 500, fp32: payload 4 * (500 + 1 + 500) = 4004; dense buffer 1001 * 4 = 4004.
    # N = 2: 1 * 4004 against 2 * (1/2) * 4004: a tie, which goes to the all-gather.
    assert choose_exchange([(1000, 500)], world_size=2, value_bytes=4) == "sparse"
    # N = 3: 2 * 4004 = 8008 against 2 * (2/3) * 4004 = 5338.7.
    assert choose_exchange([(1000, 500)], world_size=3, value_bytes=4) == "dense"
    # Density 1: the all-gather sends indices too, so dense wins from N = 2.
    assert choose_exchange([(1000, 1000)], world_size=2, value_bytes=4) == "dense"
    assert choose_exchange([(1000, 1000)], world_size=1, value_bytes=4) == "sparse"  # 0 vs 0


@pytest.mark.parametrize(
    ("numel", "density", "value_bytes", "want"),
    [
        # k = 1000, P = 8004, 2D = 8000008: floor(8000008 / 8004) = 999 -> 1000
        (1_000_000, 0.001, 4, 1000),
        # fp16: P = 6004, 2D = 4000004: floor(4000004 / 6004) = 666 -> 667
        (1_000_000, 0.001, 2, 667),
        # k = 10000, P = 80004, 2D = 8000008: floor = 99 -> 100
        (1_000_000, 0.01, 4, 100),
        # fp16: P = 4 * (10000 + 1 + 5000) = 60004, 2D = 4000004: floor = 66 -> 67
        (1_000_000, 0.01, 2, 67),
        # k = 500, P = 4004, 2D = 8008: floor = 2 -> 3 (N = 2 is the tie above)
        (1000, 0.5, 4, 3),
        # k = 1000, P = 8004, 2D = 8008: floor = 1 -> 2
        (1000, 1.0, 4, 2),
    ],
)
def test_crossover_world_size_by_hand(numel, density, value_bytes, want):
    assert crossover_world_size(numel, density, value_bytes) == want
    k = max(1, round(density * numel))
    layout = [(numel, k)]
    assert choose_exchange(layout, world_size=want, value_bytes=value_bytes) == "dense"
    if want > 2:
        assert choose_exchange(layout, world_size=want - 1, value_bytes=value_bytes) == "sparse"


def test_model_bytes_by_hand():
    # One compressed weight (1e6, k = 1000) and 1100 dense entries (a bias, a small weight).
    shapes = [(1000, 1000), (1000,), (10, 10)]
    kw = {"world_size": 2, "density": 0.001, "value_bytes": 4}
    dense_params = 2 * (1 / 2) * 1100 * 4  # 4400
    assert model_bytes(shapes, exchange="sparse", **kw) == 8004 + dense_params == 12404
    assert model_bytes(shapes, exchange="dense", **kw) == 4_000_004 + dense_params == 4_004_404
    assert model_bytes(shapes, exchange="auto", **kw) == 12404
    # With the weight below min_compress_numel everything is allreduced densely.
    everything = 2 * (1 / 2) * 1_001_100 * 4
    assert model_bytes(shapes, exchange="sparse", min_compress_numel=10**7, **kw) == everything
    with pytest.raises(ValueError, match="exchange must be one of auto, sparse, dense"):
        model_bytes(shapes, exchange="both", **kw)
    # N = 4: the all-gather sends 3 payloads, the allreduces 2 * 3/4 of their buffers.
    kw4 = {**kw, "world_size": 4}
    assert model_bytes(shapes, exchange="sparse", **kw4) == 3 * 8004 + 1.5 * 1100 * 4 == 30612
    assert model_bytes(shapes, exchange="dense", **kw4) == 1.5 * 1_001_101 * 4 == 6_006_606


def test_model_payload_bytes_is_what_stats_counts():
    shapes = [(1000, 1000), (1000,), (10, 10)]
    kw = {"world_size": 4, "density": 0.001, "value_bytes": 4}
    # Sparse: the 8004-byte payload plus the 1100 dense entries' buffer.
    assert model_payload_bytes(shapes, exchange="sparse", **kw) == 8004 + 4400 == 12404
    # Dense: one buffer of 1e6 + 1100 entries + 1 flag element.
    assert model_payload_bytes(shapes, exchange="dense", **kw) == 1_001_101 * 4 == 4_004_404
    assert model_payload_bytes(shapes, exchange="auto", **kw) == 12404
    # Nothing compressed: the dense buffer alone, values in value_bytes.
    assert model_payload_bytes([(1000,)], exchange="dense", **{**kw, "value_bytes": 2}) == 2000
    # At N = 2 a ring collective sends exactly its payload.
    for exchange in ("sparse", "dense"):
        two = {**kw, "world_size": 2}
        assert model_payload_bytes(shapes, exchange=exchange, **two) == model_bytes(
            shapes, exchange=exchange, **two
        )


def test_exchange_is_validated_in_the_state_and_the_config():
    with pytest.raises(ValueError, match="exchange must be one of 'auto', 'sparse', 'dense'"):
        DGCState(exchange="allgather")
    assert DGCState(exchange="dense").exchange == "dense"
    assert DGCState().exchange == "auto" and CommConfig().exchange == "auto"
    with pytest.raises(UserError, match=r"comm\.exchange must be one of auto, sparse, dense"):
        CommConfig(exchange="allgather")
    assert costmodel.EXCHANGES == ("auto", "sparse", "dense")
