"""Hierarchical DGC on 4 gloo ranks as 2 nodes x 2: dense inside, sparse across nodes."""

import itertools
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook, register_dgc
from dtrain.comm.hierarchical import HierarchicalDGCState, assign_owners, hierarchical_dgc_hook
from tests.distributed.harness import run_ranks
from tests.distributed.models import batch, mlp

WIDTHS = (32, 256, 128, 10)  # 8192 + 32768 + 1280 weights: compressible; biases dense
# Four equal weight matrices: with one bucket, two shares of equal size (the reduce-scatter path)
BALANCED = (32, 128, 64, 128, 64)
WIDTHS_FOR_CAP = {0.05: WIDTHS, 25: BALANCED}


@pytest.mark.parametrize(
    "numels,parts,expected",
    [
        ([10, 10, 10, 10], 2, [0, 1, 0, 1]),
        ([100, 1, 1, 1], 2, [0, 1, 1, 1]),
        ([5, 5], 4, [0, 1]),
        ([7], 1, [0]),
    ],
)
def test_assign_owners_goes_to_the_least_loaded_rank(numels, parts, expected):
    assert assign_owners(numels, parts) == expected


def test_assign_owners_balances_every_run_of_consecutive_parameters():
    g = torch.Generator().manual_seed(0)
    numels = torch.randint(1, 5000, (200,), generator=g).tolist()
    owners = assign_owners(numels, 4)
    for i, j in itertools.combinations(range(0, 201, 10), 2):  # stretches, like DDP's buckets
        totals = [sum(n for n, o in zip(numels[i:j], owners[i:j], strict=True) if o == r)
                  for r in range(4)]  # fmt: skip
        assert max(totals) - min(totals) <= 2 * max(numels)
    loads = [0, 0]  # carried on: later calls continue the balance
    assert assign_owners([10], 2, loads) == [0] and assign_owners([3, 3], 2, loads) == [1, 1]
    assert loads == [10, 6]


def _run(rank, world, *, local_size, density, momentum, steps, bad_step=None, cap=0.05):
    # cap 0.05 MB: several small, unbalanced buckets (two allreduces in the node); 25 MB: one
    # bucket whose shares balance (reduce-scatter + all-gather)
    widths = WIDTHS_FOR_CAP[cap]
    model = DDP(mlp(widths=widths), bucket_cap_mb=cap)
    kwargs = dict(density=density, momentum=momentum, min_compress_numel=1, exact_topk=True)
    if local_size is None:
        state, hook = DGCState(**kwargs), dgc_hook
    else:
        # cap 25: the reduce-scatter path, forced (on gloo "auto" takes the allreduces)
        intra = "scatter" if cap == 25 else "auto"
        state = HierarchicalDGCState(local_size=local_size, intra=intra, **kwargs)
        hook = hierarchical_dgc_hook
    state.attach(model.module.named_parameters())
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots, nonfinite, unchanged = [], [], []
    for step in range(steps):
        if step == bad_step:
            x, y = batch(rank, step, dim=WIDTHS[0])
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if rank == 3:
                loss = loss * float("inf")
            loss.backward()
            nonfinite.append(not all(torch.isfinite(p.grad).all() for p in model.parameters()))
            inner = state.dgc if local_size is not None else state
            after_bad = {k: t.clone() for k, t in _residuals(inner).items()}
            before = snapshots[-1]
            unchanged.append(
                after_bad.keys() == before.keys()
                and all(torch.equal(after_bad[k], before[k]) for k in before)
            )
            continue  # the step is skipped, as GradScaler would
        x, y = batch(rank, step, dim=WIDTHS[0])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        inner = state.dgc if local_size is not None else state
        snapshots.append({k: t.clone() for k, t in _residuals(inner).items()})
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "stats": state.stats(),
        "nonfinite": nonfinite,
        "snapshots": snapshots,
        "unchanged": unchanged,
    }


def _residuals(state):
    state._finish_step()
    return {
        f"{i}{k}": t
        for i, st in enumerate(state._params.values())
        for k, t in (("u", st.u), ("v", st.v))
        if t is not None
    }


def _allreduce(rank, world, steps, cap=0.05, momentum=0.0):
    model = DDP(mlp(widths=WIDTHS_FOR_CAP[cap]), bucket_cap_mb=cap)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for step in range(steps):
        x, y = batch(rank, step, dim=WIDTHS[0])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


# local_size 4 (one node of 4): buckets of fewer parameters than ranks leave some ranks an
# empty share, which must still take part in every collective of the node.
@pytest.mark.parametrize("cap,local_size", [(0.05, 2), (25, 2), (0.05, 4)])
def test_density_one_without_momentum_is_allreduce(cap, local_size):
    ref = run_ranks(_allreduce, 4, 8, cap=cap)
    hier = run_ranks(_run, 4, local_size=local_size, density=1.0, momentum=0.0, steps=8, cap=cap)
    node_bytes, dense = hier[0]["stats"]["node_bytes_sent"], hier[0]["stats"]["dense_bytes"]
    if cap == 25:  # one balanced bucket, reduce-scatter forced: it moves fewer bytes
        assert node_bytes < 1.8 * dense
    else:  # "auto" on gloo: two allreduces of every bucket (gloo's reduce-scatter is slow)
        assert node_bytes == 2 * dense
    for r in range(4):
        for a, b in zip(ref[r], hier[r]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_one_node_has_nothing_to_compress_and_runs_dense_momentum():
    ref = run_ranks(_allreduce, 4, 6, momentum=0.9)
    hier = run_ranks(_run, 4, local_size=4, density=0.01, momentum=0.9, steps=6)
    for r in range(4):
        for a, b in zip(ref[r], hier[r]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # not sparsified
    # each rank's share goes dense (to a group of one): the shares add up to the model
    assert sum(r["stats"]["bytes_sent"] for r in hier) == hier[0]["stats"]["dense_bytes"]


def test_one_rank_per_node_is_flat_dgc_exactly():
    flat = run_ranks(_run, 2, local_size=None, density=0.02, momentum=0.9, steps=6)
    hier = run_ranks(_run, 2, local_size=1, density=0.02, momentum=0.9, steps=6)
    for r in range(2):
        assert all(
            torch.equal(a, b) for a, b in zip(flat[r]["params"], hier[r]["params"], strict=False)
        )


def test_each_rank_sends_only_its_share_across_nodes():
    flat = run_ranks(_run, 4, local_size=None, density=0.01, momentum=0.9, steps=4)
    hier = run_ranks(_run, 4, local_size=2, density=0.01, momentum=0.9, steps=4)
    flat_sent = sum(r["stats"]["bytes_sent"] for r in flat)
    hier_sent = sum(r["stats"]["bytes_sent"] for r in hier)
    # Every rank of a node shares one cross-node exchange: half the sparse bytes in all.
    assert math.isclose(hier_sent, flat_sent / 2, rel_tol=0.05), (hier_sent, flat_sent)
    for r in hier:
        assert r["stats"]["dense_bytes"] == flat[0]["stats"]["dense_bytes"]  # whole model
        # inside the node: reduce-scatter + all-gather of padded shares, or two allreduces
        # where padding would cost more: never more than the two allreduces
        assert 0 < r["stats"]["node_bytes_sent"] <= 2 * r["stats"]["dense_bytes"]
    # All ranks of the job end with the same weights.
    for r in hier[1:]:
        assert all(torch.equal(a, b) for a, b in zip(hier[0]["params"], r["params"], strict=False))


@pytest.mark.parametrize("cap,local_size", [(0.05, 2), (25, 2), (0.05, 4)])
def test_nonfinite_gradient_on_one_rank_skips_everywhere_and_keeps_residuals(cap, local_size):
    out = run_ranks(
        _run, 4, local_size=local_size, density=0.01, momentum=0.9, steps=5, bad_step=3, cap=cap
    )
    for r in out:
        assert r["nonfinite"] == [True]  # every rank got a non-finite bucket
        assert r["unchanged"] == [True]  # and no rank's momentum or residual moved
        assert r["stats"]["skipped_steps"] == 1
        assert len(r["snapshots"]) == 4  # training went on after the skipped step


# The case: an 8.7k-parameter MLP in 25 KB buckets, so that DDP's first step (one bucket)
# and the rebuilt buckets after it split the parameters differently.
RESUME_WIDTHS = (32, 128, 32, 10)


def _hier_build(intra):
    model = DDP(mlp(widths=RESUME_WIDTHS), bucket_cap_mb=0.025)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    state = register_dgc(model, opt, density=0.05, hierarchical_local_size=2, intra=intra)
    return model, opt, state


def _hier_steps(model, opt, rank, steps):
    for step in steps:
        x, y = batch(rank, step, dim=RESUME_WIDTHS[0])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _hier_resume(rank: int, world: int, ckpt: str, intra: str) -> dict:
    model, opt, state = _hier_build(intra)
    _hier_steps(model, opt, rank, range(6))
    full = [p.detach().clone() for p in model.parameters()]
    held = {state.dgc._names[p] for p in state.dgc._params}

    model, opt, state = _hier_build(intra)
    _hier_steps(model, opt, rank, range(4))
    at_save = [p.detach().clone() for p in model.parameters()]
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(),
                "hook": state.state_dict()}, f"{ckpt}/{rank}.pt")  # fmt: skip
    model, opt, state = _hier_build(intra)  # a new DDP: its first step is one bucket again
    saved = torch.load(f"{ckpt}/{rank}.pt", weights_only=True)
    model.module.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    state.load_state_dict(saved["hook"])
    _hier_steps(model, opt, rank, range(4, 6))
    resumed = [p.detach().clone() for p in model.parameters()]
    owned = set(state.owned_names())
    other = dict(saved["hook"], owned=sorted(set(saved["hook"]["owned"]) ^ {"0.weight"}))
    try:  # a state saved for another assignment of parameters to local ranks
        state.load_state_dict(other)
        refused = ""
    except ValueError as e:
        refused = str(e)
    numel = {n: p.numel() for n, p in model.module.named_parameters()}
    return {
        "diff": max((a - b).abs().max().item() for a, b in zip(full, resumed, strict=True)),
        "moved": max((a - b).abs().max().item() for a, b in zip(full, at_save, strict=True)),
        "held": held,
        "owned": owned,
        "held_numel": sum(numel[n] for n in held),
        "total_numel": sum(numel.values()),
        "max_numel": max(numel.values()),
        "refused": refused,
    }


@pytest.mark.parametrize("intra", ["auto", "scatter"])  # auto: two allreduces on gloo
def test_state_stays_with_its_owner_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path, intra):
    out = run_ranks(_hier_resume, 4, str(tmp_path), intra)
    for r in out:
        assert r["moved"] > 1e-3  # the last two steps did move the weights
        assert r["diff"] == 0.0, r["diff"]  # resumed = uninterrupted, bit for bit
        # state only for the parameters this rank owns, however DDP rebuilt its buckets
        assert r["held"] == r["owned"]
        assert r["held_numel"] <= r["total_numel"] / 2 + r["max_numel"]
        assert r["refused"].startswith("the hierarchical state was saved for another assignment")
    for node in ((0, 1), (2, 3)):  # the node's ranks own every parameter once between them
        a, b = (out[i]["owned"] for i in node)
        assert not a & b and len(a | b) == 6
    assert out[0]["owned"] == out[2]["owned"]  # the same local rank owns the same on every node


def test_intra_must_be_one_of_the_ways():
    with pytest.raises(ValueError, match="intra must be one of 'auto', 'scatter', 'allreduce'"):
        HierarchicalDGCState(local_size=2, intra="ring")
