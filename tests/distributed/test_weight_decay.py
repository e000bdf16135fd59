"""Weight decay and momentum around register_dgc: exactly SGD's decay, a second registration
that restores what the first moved, and a group of one rank that runs dense."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import register_dgc
from tests.distributed.harness import outcome, run_ranks
from tests.distributed.models import batch, mlp, train_step

WD = 0.05  # strong, so that a decay of the wrong strength shows within a few steps


def _sgd(model, *, nesterov=False):
    return torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=WD
    )


def _train(model, opt, rank, steps=12):
    # the learning rate drops 10x half-way: where a decay folded in as wd/(1-m) drifts from SGD's
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=steps // 2, gamma=0.1)
    for step in range(steps):
        train_step(model, opt, rank, step)
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _decay_modes(rank: int, world: int, nesterov: bool) -> dict:
    ref = DDP(mlp())
    out = {"sgd": _train(ref, _sgd(ref, nesterov=nesterov), rank)}
    for mode in ("momentum", "scaled"):
        model = DDP(mlp())
        opt = _sgd(model, nesterov=nesterov)
        # density 1, no masking, no clipping: DGC is then SGD with momentum, decay included
        register_dgc(model, opt, density=1.0, momentum_masking=False, weight_decay=mode)
        out[mode] = _train(model, opt, rank)
    return out


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("nesterov", [False, True])
def test_decay_in_the_hook_is_sgd_with_momentum_exactly(nesterov):
    out = run_ranks(_decay_modes, 2, nesterov)[0]
    exact, scaled = _max_diff(out["sgd"], out["momentum"]), _max_diff(out["sgd"], out["scaled"])
    assert exact < 1e-6, exact
    assert scaled > 100 * max(exact, 1e-8), (exact, scaled)  # the old 1/(1-m) form drifts


def _solo(rank: int, world: int) -> dict:
    ref = DDP(mlp())
    sgd = _train(ref, _sgd(ref), rank)
    model = DDP(mlp())
    opt = _sgd(model)
    state = register_dgc(model, opt, density=0.001, warmup_steps=0)
    dgc = _train(model, opt, rank)
    return {
        "diff": _max_diff(sgd, dgc),
        "residuals": sum(s.v is not None for s in state._params.values()),
    }


def test_one_rank_runs_dense_momentum():
    out = run_ranks(_solo, 1)[0]
    assert out["diff"] < 1e-6  # not sparsified: nothing would be saved
    assert out["residuals"] == 0


def _register_again(rank: int, world: int, ckpt: str) -> dict:
    out = {}
    first = DDP(mlp())
    opt = _sgd(first)
    register_dgc(first, opt, density=0.1)
    reference = _train(first, opt, rank, steps=4)
    torch.save(opt.state_dict(), f"{ckpt}/opt{rank}.pt")

    # 1. a re-wrapped model with the same (converted) optimizer
    module = mlp()
    again = DDP(module)
    opt = _sgd(again)
    register_dgc(DDP(module), opt, density=0.1)  # the first wrapping, then thrown away
    state = register_dgc(again, opt, density=0.1)
    out["again"] = (
        state.momentum,
        sorted(set(state._decay.values())),
        opt.param_groups[0]["weight_decay"],
    )
    out["again_diff"] = _max_diff(reference, _train(again, opt, rank, steps=4))

    # 2. a converted optimizer state loaded before register_dgc (a common resume order)
    model = DDP(mlp())
    opt = _sgd(model)
    opt.load_state_dict(torch.load(f"{ckpt}/opt{rank}.pt", weights_only=True))
    state = register_dgc(model, opt, density=0.1)
    out["loaded"] = (state.momentum, sorted(set(state._decay.values())))

    # 3. a converted optimizer whose momentum was set again by hand: ambiguous, refused
    opt.param_groups[0]["momentum"] = 0.5
    out["changed"] = outcome(lambda: register_dgc(DDP(mlp()), opt, density=0.1))
    return out


def test_a_second_registration_restores_momentum_and_decay(tmp_path):
    out = run_ranks(_register_again, 2, str(tmp_path))[0]
    assert out["again"] == (0.9, [WD], 0.0)  # not momentum 0, decay not moved twice
    assert out["again_diff"] == 0.0  # and it trains exactly as the first registration
    assert out["loaded"] == (0.9, [WD])
    assert out["changed"].startswith(
        "ValueError: this SGD optimizer was converted by an earlier register_dgc"
    )


def _scaled(rank: int, world: int, nesterov: bool) -> dict:
    """DDP + SGD and DGC (density 1, no masking), both under a GradScaler, with an inf injected
    in rank 1's loss at step 3: decay in loss-scaled units, and no decay committed that step."""

    def train(model, opt, scaler):
        for step in range(8):
            x, y = batch(rank, step)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step == 3 and rank == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    ref = DDP(mlp())
    sgd, sgd_scale = train(ref, _sgd(ref, nesterov=nesterov), torch.amp.GradScaler("cpu"))
    model = DDP(mlp())
    opt = _sgd(model, nesterov=nesterov)
    scaler = torch.amp.GradScaler("cpu")
    state = register_dgc(model, opt, grad_scaler=scaler, density=1.0, momentum_masking=False)
    dgc, dgc_scale = train(model, opt, scaler)
    return {"diff": _max_diff(sgd, dgc), "scales": (sgd_scale, dgc_scale),
            "skipped": state.stats()["skipped_steps"]}  # fmt: skip


@pytest.mark.parametrize("nesterov", [False, True])
def test_decay_follows_the_loss_scale_and_skips_a_non_finite_step(nesterov):
    for r in run_ranks(_scaled, 2, nesterov):
        assert r["skipped"] == 1
        assert r["scales"][0] == r["scales"][1] == 2.0**15  # backed off once, on both
        assert r["diff"] < 1e-6, r["diff"]
