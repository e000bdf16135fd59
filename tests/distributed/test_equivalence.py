"""DGC at density 1.0 without momentum is DDP's allreduce."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook
from tests.distributed.harness import run_ranks
from tests.distributed.models import mlp, train_step


def _compare(rank: int, world: int, steps: int) -> dict:
    ref = DDP(mlp(), bucket_cap_mb=0.01)
    dgc = DDP(mlp(), bucket_cap_mb=0.01)
    state = DGCState(density=1.0, momentum=0.0, min_compress_numel=1)
    dgc.register_comm_hook(state, dgc_hook)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_dgc = torch.optim.SGD(dgc.parameters(), lr=0.1)
    for step in range(steps):
        train_step(ref, opt_ref, rank, step)
        train_step(dgc, opt_dgc, rank, step)
    diffs = [
        (a - b).abs().max().item() for a, b in zip(ref.parameters(), dgc.parameters(), strict=True)
    ]
    equal = all(torch.equal(a, b) for a, b in zip(ref.parameters(), dgc.parameters(), strict=True))
    return {
        "max_diff": max(diffs),
        "equal": equal,
        "buckets": state.iter,
        "ratio": state.stats()["ratio"],
    }


@pytest.mark.parametrize("world", [2, 4])
def test_density_one_equals_allreduce(world):
    results = run_ranks(_compare, world, 20)
    for r in results:
        assert r["buckets"] == 20
        if world == 2:
            assert r["equal"], r
        else:
            assert r["max_diff"] <= 1e-6, r
