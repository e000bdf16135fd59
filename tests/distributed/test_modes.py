"""DGC's modes on gloo ranks: the lr_weighted flush against its definition, the paper mode
untouched by the learning rate, the two modes bit-identical where their definitions agree."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import register_dgc
from tests.distributed.harness import outcome, run_ranks
from tests.distributed.models import mlp, train_step

FACTORS = [1.0, 0.8, 0.5, 0.3, 0.2, 0.1]  # a falling schedule, as at the end of a cosine


def _trained(mode: str, *, source: bool = True, local_size: int | None = None, **kw):
    model = DDP(mlp(), bucket_cap_mb=0.005)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: FACTORS[min(t, len(FACTORS) - 1)])
    state = register_dgc(
        model, opt, mode=mode, density=0.05, min_compress_numel=500, exact_topk=True,
        hierarchical_local_size=local_size, **kw,
    )  # fmt: skip
    if not source:
        state._groups = {}  # as a DGCState built without set_lr_source
    rank = dist.get_rank()
    for step in range(len(FACTORS)):
        train_step(model, opt, rank, step)
        sched.step()
    return model, state


def _flush(rank: int, world: int, local_size: int | None) -> dict:
    model, state = _trained("lr_weighted", local_size=local_size)
    inner = state.dgc if local_size else state
    params = dict(model.module.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    sd = inner.state_dict()["params"]
    # each rank's displacement lr_ref * v (zeros where it keeps no residual)
    mine = {
        n: sd[n]["v"].view_as(p) * float(sd[n]["lr_ref"]) if "v" in sd.get(n, {}) else None
        for n, p in params.items()
    }
    sent_before = inner.stats()["bytes_sent_total"]
    sent = state.flush()
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    after = {n: p.detach().clone() for n, p in params.items()}
    return {
        "before": before,
        "after": after,
        "everyone": everyone,
        "sent": sent,
        "counted": inner.stats()["bytes_sent_total"] - sent_before,
        "v_left": max(float(st.v.abs().max()) for st in inner._params.values() if st.v is not None),
        "holders": dist.get_world_size(inner.process_group),
    }


@pytest.mark.parametrize("local_size", [None, 2], ids=["flat", "hierarchical"])
def test_flush_applies_every_ranks_residual_at_its_learning_rate(local_size):
    world = 4 if local_size else 2
    results = run_ranks(_flush, world, local_size)
    r0 = results[0]
    moved = 0
    for name, w0 in r0["before"].items():
        parts = [e[name] for e in r0["everyone"] if e[name] is not None]
        if not parts:  # a dense parameter: no residual, untouched
            assert torch.equal(r0["after"][name], w0), name
            continue
        expect = w0 - sum(parts) / r0["holders"]
        torch.testing.assert_close(r0["after"][name], expect, rtol=0, atol=1e-7, msg=name)
        moved += int(not torch.equal(r0["after"][name], w0))
    assert moved >= 2  # the residuals held something, and the weights took it
    for r in results:
        for name in r0["after"]:
            assert torch.equal(r["after"][name], r0["after"][name]), name  # every rank agrees
        assert r["v_left"] == 0.0
        assert r["sent"] > 0 and r["counted"] == r["sent"]


def _refusals(rank: int, world: int) -> dict:
    _, paper = _trained("paper")
    _, blind = _trained("lr_weighted", source=False)
    follow = outcome(lambda: _trained("lr_weighted", source=False, lr_density_gain=2.0))
    return {"paper": outcome(paper.flush), "blind": outcome(blind.flush), "follow": follow}


def test_flush_is_refused_where_the_residual_has_no_learning_rate():
    for r in run_ranks(_refusals, 2):
        assert "mode='lr_weighted'" in r["paper"], r
        assert "set_lr_source(optimizer)" in r["blind"], r
        # a density to follow the rate, without the rate: every rank stops at the same step
        assert "lr_density_gain needs the learning rates" in r["follow"], r


def _weights(rank: int, world: int, runs: list) -> dict:
    out = {}
    for name, mode, kw in runs:
        model, _ = _trained(mode, **kw)
        out[name] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return out


def test_paper_mode_ignores_the_learning_rate_and_modes_agree_where_defined_alike():
    """The paper mode under a schedule equals itself without an LR source, bit for bit; at a
    constant rate (r = 1) lr_weighted is the paper's no-masking variant."""
    runs = [
        ("paper", "paper", {}),
        ("paper_blind", "paper", {"source": False}),
        ("paper_nomask_blind", "paper", {"source": False, "momentum_masking": False}),
        ("lrw_blind", "lr_weighted", {"source": False}),
        ("lrw", "lr_weighted", {}),
    ]
    r = run_ranks(_weights, 2, runs)[0]
    for n in r["paper"]:
        assert torch.equal(r["paper"][n], r["paper_blind"][n]), n
        assert torch.equal(r["paper_nomask_blind"][n], r["lrw_blind"][n]), n
    assert any(not torch.equal(r["lrw"][n], r["lrw_blind"][n]) for n in r["lrw"])
    assert any(not torch.equal(r["paper"][n], r["lrw"][n]) for n in r["lrw"])


def _density_one(rank: int, world: int, nesterov: bool) -> dict:
    import math

    steps = 40

    def smooth_mlp():
        # tanh, not ReLU: a ReLU whose input sits at 0 turns a 1e-8 rounding difference into a
        # 1e-5 one (seen at step 22 of this run), whatever the algorithm
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48), torch.nn.Tanh(),
            torch.nn.Linear(48, 10),
        )  # fmt: skip

    def run(dgc_mode):
        model = DDP(smooth_mlp())
        opt = torch.optim.SGD(
            model.parameters(), lr=0.2, momentum=0.9, nesterov=nesterov, weight_decay=0.01
        )
        # a cosine to zero, with a 10x drop in the middle: rates and their ratios keep changing
        factor = lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)) * (0.1 if t >= 20 else 1)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        if dgc_mode:
            kw = {} if dgc_mode == "default" else {"mode": dgc_mode}
            register_dgc(model, opt, density=1.0, **kw)  # everything else as shipped
        for step in range(steps):
            train_step(model, opt, rank, step)
            sched.step()
        return [p.detach().clone() for p in model.parameters()]

    sgd = run(None)
    diff = lambda ws: max((a - b).abs().max().item() for a, b in zip(sgd, ws, strict=True))  # noqa: E731
    return {"default": diff(run("default")), "paper": diff(run("paper"))}


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_default_mode_at_density_one_is_ddp_sgd_with_momentum_and_decay(nesterov):
    out = run_ranks(_density_one, 2, nesterov)[0]
    assert out["default"] < 1e-6, out  # 40 steps, a cosine and a 10x drop, weight decay 0.01
    assert out["paper"] > 1e-3, out  # masking: the paper's DGC is SGD without momentum here
