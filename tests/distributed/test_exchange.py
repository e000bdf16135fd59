"""Sparse all-gather against the dense (sparse-to-dense) reduction, and the automatic choice.

The two ways of exchanging a bucket must give the same training result (bit for bit with 2 ranks,
where each sum has two terms; up to summation order with 4), skip a non-finite step alike, and
``exchange="auto"`` must pick what :mod:`dtrain.comm.costmodel` predicts is cheaper, with
``stats()`` counting exactly the payload the model predicts for that path.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, costmodel, dgc_hook, register_dgc, sparsify
from tests.distributed.harness import run_ranks
from tests.distributed.models import batch, mlp, train_step

STEPS = 10
MIN_COMPRESS = 500  # the MLP's two large weights (2048, 3072) compressed, the rest dense
CONFIGS = {
    "d1": {"density": 1.0},
    "d0.01": {"density": 0.01},
    "warmup": {"density": 0.01, "warmup_steps": 6},  # k, hence the choice, changes over time
}


def _train(cfg: dict, exchange: str, bucket_cap_mb: float, rank: int) -> dict:
    model = DDP(mlp(), bucket_cap_mb=bucket_cap_mb)
    state = DGCState(
        momentum=0.9,
        exact_topk=True,
        min_compress_numel=MIN_COMPRESS,
        exchange=exchange,
        **cfg,
    )
    state.attach(model.module.named_parameters())
    model.register_comm_hook(state, dgc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sent = []
    for step in range(STEPS):
        train_step(model, opt, rank, step)
        sent.append(state.stats()["bytes_sent"])
    residuals = {n: dict(e) for n, e in state.state_dict()["params"].items()}
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "residuals": residuals,
        "choices": sorted(set(state._exchanges.values())),
        "sent": sent,
    }


def _equivalence(rank: int, world: int) -> dict:
    return {
        (name, exchange): _train(cfg, exchange, 0.005, rank)  # one bucket per large weight
        for name, cfg in CONFIGS.items()
        for exchange in ("auto", "sparse", "dense")
    }


@pytest.fixture(scope="module")
def two():
    return run_ranks(_equivalence, 2)


@pytest.fixture(scope="module")
def four():
    return run_ranks(_equivalence, 4)


def _same(a: dict, b: dict, exact: bool) -> None:
    check = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-6, atol=1e-6)
    assert all(check(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    for name, entry in a["residuals"].items():
        for key, t in entry.items():
            assert check(t, b["residuals"][name][key]), (name, key)


@pytest.mark.parametrize("config", CONFIGS)
def test_sparse_and_dense_exchange_train_alike_on_2_ranks(two, config):
    for r in two:
        assert r[(config, "sparse")]["choices"] == ["sparse"]
        assert r[(config, "dense")]["choices"] == ["dense"]
        _same(r[(config, "sparse")], r[(config, "dense")], exact=True)
        _same(r[(config, "auto")], r[(config, "sparse")], exact=True)
    # N = 2: dense wins only above density 1/2 (N P > 2 D); warm-up's 25% is below that.
    want = {"d1": ["dense"], "d0.01": ["sparse"], "warmup": ["sparse"]}[config]
    assert two[0][(config, "auto")]["choices"] == want
    # The paths really differ on the wire: dense sends the whole buffer.
    assert two[0][(config, "dense")]["sent"] != two[0][(config, "sparse")]["sent"]


@pytest.mark.parametrize("config", CONFIGS)
def test_sparse_and_dense_exchange_train_alike_on_4_ranks(four, config):
    for r in four:
        _same(r[(config, "sparse")], r[(config, "dense")], exact=False)
        _same(r[(config, "auto")], r[(config, "dense")], exact=False)
    # N = 4: dense wins above density ~1/4, so warm-up's first stage (25%, k rounded up) goes
    # dense and the later stages sparse.
    want = {"d1": ["dense"], "d0.01": ["sparse"], "warmup": ["dense", "sparse"]}[config]
    for r in four:
        assert r[(config, "auto")]["choices"] == want


def _nonfinite(rank: int, world: int, exchange: str) -> dict:
    model = DDP(mlp(widths=(32, 256, 128, 10)), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    state = register_dgc(
        model, opt, density=0.05, grad_scaler=scaler, min_compress_numel=500, exchange=exchange
    )
    log = []
    for step in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 3 and rank == world - 1:
            loss = loss * float("inf")  # one rank only
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sd = state.state_dict()["params"]
        log.append(
            {
                "moved": any(
                    not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                ),
                "residuals": {n: {k: t.clone() for k, t in e.items()} for n, e in sd.items()},
                "skipped": state.stats()["skipped_steps"],
            }
        )
    return {"log": log, "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("world", [2, 4])
def test_dense_exchange_skips_a_nonfinite_step_everywhere(world):
    dense = run_ranks(_nonfinite, world, "dense", timeout=120)
    sparse = run_ranks(_nonfinite, world, "sparse", timeout=120)
    for d, s in zip(dense, sparse, strict=True):
        log = d["log"]
        assert [e["moved"] for e in log] == [True] * 3 + [False] + [True] * 2
        assert [e["skipped"] for e in log] == [0, 0, 0, 1, 1, 1]
        for name, entry in log[2]["residuals"].items():  # no residual changed in that step
            for key, t in entry.items():
                assert torch.equal(t, log[3]["residuals"][name][key]), (name, key)
        close = torch.equal if world == 2 else lambda a, b: torch.allclose(a, b, atol=1e-6)
        assert all(close(a, b) for a, b in zip(d["params"], s["params"], strict=True))


def _auto(rank: int, world: int) -> dict:
    out = {}
    for density in (0.5, 0.001):
        model = DDP(mlp(widths=(32, 256, 128, 10)), bucket_cap_mb=100)  # one bucket
        state = DGCState(density=density, min_compress_numel=500, exchange="auto")
        model.register_comm_hook(state, dgc_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            train_step(model, opt, rank, step)
        out[density] = {
            "exchanges": dict(state._exchanges),
            "sent": state.stats()["bytes_sent"],
            "shapes": [tuple(p.shape) for p in model.module.parameters()],
        }
    return out


def test_auto_follows_the_cost_model_and_stats_count_its_payload():
    results = run_ranks(_auto, 4)
    for density, want in ((0.5, "dense"), (0.001, "sparse")):
        r = results[0][density]
        comp = [s for s in r["shapes"] if len(s) > 1 and math.prod(s) >= 500]
        dense_numel = sum(math.prod(s) for s in r["shapes"]) - sum(math.prod(s) for s in comp)
        layout = tuple((math.prod(s), sparsify.num_selected(math.prod(s), density)) for s in comp)
        # One bucket, one decision (the key is sorted: DDP reorders the bucket after a step).
        assert list(r["exchanges"]) == [(tuple(sorted(layout)), 4)]
        assert set(r["exchanges"].values()) == {want}
        assert costmodel.choose_exchange(layout, world_size=4, value_bytes=4) == want
        if want == "sparse":
            payload = costmodel.sparse_payload_bytes([k for _, k in layout], value_bytes=4)
            assert r["sent"] == payload + dense_numel * 4
        else:  # compressed and dense parameters share the dense buffer (+ one flag element)
            numel = sum(n for n, _ in layout) + dense_numel
            assert r["sent"] == costmodel.dense_payload_bytes(numel, value_bytes=4)
        assert r["sent"] == costmodel.model_payload_bytes(
            r["shapes"],
            world_size=4,
            density=density,
            value_bytes=4,
            exchange="auto",
            min_compress_numel=500,
        )
        assert all(x[density]["sent"] == r["sent"] for x in results)
