"""DDP features the hook must survive: no_sync, Join, bucket views, static graph, unused params."""

import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook
from tests.distributed.harness import run_ranks
from tests.distributed.models import batch, mlp, train_step


class Branchy(nn.Module):
    """A model with a parameter that gets no gradient (find_unused_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.unused, self.b = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _pair(make, ddp_kwargs: dict, dgc_kwargs: dict) -> tuple[DDP, DDP, DGCState]:
    ref = DDP(make(), bucket_cap_mb=0.005, **ddp_kwargs)
    hooked = DDP(make(), bucket_cap_mb=0.005, **ddp_kwargs)
    state = DGCState(min_compress_numel=1, **dgc_kwargs)
    hooked.register_comm_hook(state, dgc_hook)
    return ref, hooked, state


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def _features(rank: int, world: int) -> dict:
    out = {}
    exact = {"density": 1.0, "momentum": 0.0}
    for name, make, ddp_kwargs in [
        ("gradient_as_bucket_view", mlp, {"gradient_as_bucket_view": True}),
        ("static_graph", mlp, {"static_graph": True}),
        ("find_unused_parameters", Branchy, {"find_unused_parameters": True}),
    ]:
        ref, hooked, state = _pair(make, ddp_kwargs, exact)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, hooked)]
        for step in range(6):
            for m, o in zip((ref, hooked), opts, strict=True):
                train_step(m, o, rank, step)
        # The same flags at real compression: runs and keeps the ranks' replicas identical.
        _, sparse, sstate = _pair(make, ddp_kwargs, {"density": 0.01, "momentum": 0.9})
        opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
        for step in range(6):
            train_step(sparse, opt, rank, step)
        out[name] = {
            "equal": _same(ref, hooked),
            "iter": (state.iter, sstate.iter),
            "params": [p.detach().clone() for p in sparse.parameters()],
        }

    # no_sync: micro-batches accumulate locally, only the synchronised step reaches the hook.
    ref, hooked, state = _pair(mlp, {}, exact)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, hooked)]
    for step in range(4):
        for m, o in zip((ref, hooked), opts, strict=True):
            o.zero_grad()
            with m.no_sync():
                for micro in range(2):
                    x, y = batch(rank, 10 * step + micro)
                    nn.functional.cross_entropy(m(x), y).backward()
            x, y = batch(rank, 10 * step + 2)
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    out["no_sync"] = {"equal": _same(ref, hooked), "iter": (state.iter, 4)}

    # Join: rank 0 runs out of data first; its hook then sees all-zero buckets.
    model = DDP(mlp(), bucket_cap_mb=0.005)
    jstate = DGCState(density=0.01, momentum=0.9, min_compress_numel=1)
    model.register_comm_hook(jstate, dgc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Join([model]):
        for step in range(3 if rank == 0 else 6):
            train_step(model, opt, rank, step)
    out["join"] = {"iter": jstate.iter, "params": [p.detach().clone() for p in model.parameters()]}
    return out


def test_ddp_features():
    results = run_ranks(_features, 2)
    for name in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters", "no_sync"):
        for r in results:
            assert r[name]["equal"], name  # density 1, momentum 0: DDP's own allreduce
            assert r[name]["iter"][0] == r[name]["iter"][1] or name != "no_sync"
    for name in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters", "join"):
        a, b = results[0][name]["params"], results[1][name]["params"]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
    assert results[0]["no_sync"]["iter"] == (4, 4)
    assert [r["join"]["iter"] for r in results] == [6, 6]  # the joined rank kept pace


def _compiled(rank: int, world: int) -> dict:
    """register_dgc on torch.compile(DDP) (DDPOptimizer splits the graph at the buckets) trains
    as the eager DDP model with the same hook does."""
    from dtrain.comm import register_dgc

    out = {}
    for name in ("eager", "compiled"):
        ddp = DDP(mlp())  # DDPOptimizer wants the first bucket no larger than the others
        model = torch.compile(ddp, backend="aot_eager") if name == "compiled" else ddp
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        state = register_dgc(model, opt, density=0.05, min_compress_numel=1)
        for step in range(5):
            train_step(model, opt, rank, step)
        out[name] = ([p.detach().clone() for p in ddp.parameters()], state.stats()["ratio_total"])
    return out


def test_dgc_on_a_compiled_ddp_model_trains_as_on_the_eager_one():
    for r in run_ranks(_compiled, 2):
        (eager, ratio_e), (compiled, ratio_c) = r["eager"], r["compiled"]
        assert ratio_c == ratio_e > 1
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
