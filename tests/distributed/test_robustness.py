"""Non-finite gradients on one rank, checkpoint/resume, and the register_dgc front door."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook, make_hook, register_dgc
from tests.distributed.harness import outcome, run_ranks
from tests.distributed.models import batch, mlp, train_step

WIDE = (32, 256, 128, 10)  # weights large enough for sampled (not exact) selection


def _snapshot(sd: dict) -> dict:
    return {n: {k: t.clone() for k, t in e.items()} for n, e in sd["params"].items()}


def _nonfinite(rank: int, world: int) -> dict:
    model = DDP(mlp(widths=WIDE), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    state = register_dgc(model, opt, density=0.05, grad_scaler=scaler, min_compress_numel=500)
    log = []
    for step in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 3 and rank == 1:
            loss = loss * float("inf")  # one rank only
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        residuals = _snapshot(state.state_dict())
        log.append(
            {
                "moved": any(
                    not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                ),
                "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                "residuals": residuals,
                "scale": scaler.get_scale(),
                "skipped": state.stats()["skipped_steps"],
            }
        )
    return {"log": log}


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere():
    for r in run_ranks(_nonfinite, 2, timeout=120):  # a rank-local decision would deadlock
        log = r["log"]
        assert [e["moved"] for e in log] == [True] * 3 + [False] + [True] * 4
        assert all(e["finite"] for e in log)
        assert [e["skipped"] for e in log] == [0, 0, 0, 1, 1, 1, 1, 1]
        assert log[3]["scale"] == log[2]["scale"] / 2  # GradScaler backed off everywhere
        for name, entry in log[2]["residuals"].items():  # no residual changed in that step
            for key, t in entry.items():
                assert torch.equal(t, log[3]["residuals"][name][key]), (name, key)
        changed = any(
            not torch.equal(t, log[4]["residuals"][n][k])
            for n, e in log[3]["residuals"].items()
            for k, t in e.items()
        )
        assert changed  # and training went on


def _build(seed_model: bool = True):
    model = DDP(mlp(widths=WIDE), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    state = register_dgc(model, opt, density=0.05, warmup_steps=4, min_compress_numel=500)
    return model, opt, state


def _resume(rank: int, world: int, ckpt: str) -> dict:
    model, opt, state = _build()
    for step in range(10):
        train_step(model, opt, rank, step)
    full = [p.detach().clone() for p in model.parameters()]

    model, opt, state = _build()
    for step in range(5):
        train_step(model, opt, rank, step)
    torch.save(
        {"model": model.module.state_dict(), "opt": opt.state_dict()},
        Path(ckpt) / f"model{rank}.pt",
    )
    torch.save(state.state_dict(), Path(ckpt) / f"dgc{rank}.pt")  # one file per rank
    del model, opt, state

    results = {}
    for load_dgc in (True, False):
        model, opt, state = _build()
        saved = torch.load(Path(ckpt) / f"model{rank}.pt", weights_only=True)
        model.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if load_dgc:
            state.load_state_dict(torch.load(Path(ckpt) / f"dgc{rank}.pt", weights_only=True))
        for step in range(5, 10):
            train_step(model, opt, rank, step)
        results[load_dgc] = all(
            torch.equal(a, b) for a, b in zip(full, model.parameters(), strict=True)
        )
    wrong = torch.load(Path(ckpt) / f"dgc{rank}.pt", weights_only=True)
    wrong["world_size"] = world + 1
    try:
        state.load_state_dict(wrong)
        refused = ""
    except ValueError as e:
        refused = str(e)
    return {
        "resumed_equal": results[True],
        "without_dgc_state_equal": results[False],
        "refused": refused,
    }


def test_resume_is_identical_to_uninterrupted_run(tmp_path):
    for r in run_ranks(_resume, 2, str(tmp_path)):
        assert r["resumed_equal"]
        assert not r["without_dgc_state_equal"]  # the residuals do matter
        assert "saved with world size 3, this job has 2" in r["refused"]


def _register(rank: int, world: int) -> dict:
    out = {}
    plain = mlp()
    sgd = lambda m, **kw: torch.optim.SGD(m.parameters(), lr=0.1, **kw)  # noqa: E731
    out["plain"] = outcome(lambda: register_dgc(plain, sgd(plain)))
    out["compiled_plain"] = outcome(lambda: register_dgc(torch.compile(plain), sgd(plain)))
    ddp = DDP(mlp())
    out["compiled_ddp"] = outcome(lambda: register_dgc(torch.compile(ddp), sgd(ddp, momentum=0.9)))
    out["twice"] = outcome(lambda: register_dgc(ddp, sgd(ddp, momentum=0.9)))
    builtin = DDP(mlp())
    builtin._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    out["builtin"] = outcome(lambda: register_dgc(builtin, sgd(builtin)))
    m = DDP(mlp())
    groups = [
        {"params": list(m.parameters())[:2], "momentum": 0.9},
        {"params": list(m.parameters())[2:], "momentum": 0.5},
    ]
    out["groups"] = outcome(lambda: register_dgc(m, torch.optim.SGD(groups, lr=0.1)))
    out["dampening"] = outcome(lambda: register_dgc(m, sgd(m, momentum=0.9, dampening=0.1)))
    out["momentum_kwarg"] = outcome(lambda: register_dgc(m, sgd(m), momentum=0.5))
    refused_opt = sgd(m, momentum=0.9, weight_decay=1e-3)
    out["bad_density"] = outcome(lambda: register_dgc(m, refused_opt, density=0))
    g = refused_opt.param_groups[0]
    out["refused_opt"] = (g["momentum"], g["weight_decay"])  # a refusal changes nothing
    out["twice_opt"] = outcome(lambda: register_dgc(ddp, refused_opt))
    out["twice_opt_unchanged"] = (g["momentum"], g["weight_decay"])

    m = DDP(mlp())
    opt = sgd(m, momentum=0.9, nesterov=True)
    state = register_dgc(m, opt, density=0.1)
    out["sgd"] = (
        state.momentum,
        state.nesterov,
        [g["momentum"] for g in opt.param_groups],
        opt.param_groups[0]["nesterov"],
        len(state._names),
    )
    wd = []
    for mode in ("momentum", "scaled", "optimizer"):
        m = DDP(mlp())
        groups = [{"params": [m.module[0].weight], "weight_decay": 1e-3}]
        groups.append({"params": [m.module[0].bias], "weight_decay": 0.0})
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.8)
        state = register_dgc(m, opt, weight_decay=mode)
        in_hook = [state._decay.get(p, 0.0) for p in (m.module[0].weight, m.module[0].bias)]
        wd.append(([g["weight_decay"] for g in opt.param_groups], in_hook))
    out["weight_decay"] = wd
    out["bad_mode"] = outcome(lambda: register_dgc(DDP(mlp()), sgd(m), weight_decay="x"))
    m = DDP(mlp())
    adam = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
    state = register_dgc(m, adam)
    out["adam"] = (
        state.momentum,
        adam.param_groups[0]["betas"],
        adam.param_groups[0]["weight_decay"],
    )
    return out


def test_register_dgc():
    out = run_ranks(_register, 1)[0]
    assert out["plain"].startswith(
        "TypeError: DGC needs a DistributedDataParallel model, got Sequential"
    )
    assert out["compiled_plain"].startswith("TypeError: DGC needs a DistributedDataParallel")
    assert out["compiled_ddp"] == "ok"
    assert out["twice"].startswith("RuntimeError: this DDP model already has a communication hook")
    assert out["builtin"].startswith("RuntimeError: this DDP model already has a communication")
    assert out["groups"].startswith("ValueError: DGC applies one momentum to every parameter")
    assert out["dampening"].startswith("ValueError: DGC's momentum correction has no dampening")
    assert out["momentum_kwarg"].startswith(
        "TypeError: register_dgc takes momentum from the optimizer"
    )
    assert out["bad_density"] == "ValueError: density must be in (0, 1], got 0"
    assert out["refused_opt"] == out["twice_opt_unchanged"] == (0.9, 1e-3)
    assert out["twice_opt"].startswith("RuntimeError: this DDP model already has")
    assert out["sgd"] == (0.9, True, [0.0], False, 6)  # moved, not applied twice
    # default: the decay moves into the hook (its own momentum buffer); "scaled": x 1/(1-m) in
    # the optimizer; "optimizer": as given
    assert out["weight_decay"][0] == ([0.0, 0.0], [1e-3, 0.0])
    assert out["weight_decay"][1][0] == pytest.approx([1e-3 / 0.2, 0.0])
    assert out["weight_decay"][1][1] == [0.0, 0.0]
    assert out["weight_decay"][2] == ([1e-3, 0.0], [0.0, 0.0])
    assert out["bad_mode"].startswith("ValueError: weight_decay must be one of 'momentum'")
    assert out["adam"] == (0.0, (0.9, 0.999), 0.01)  # error feedback only; Adam untouched


def _baselines(rank: int, world: int) -> dict:
    out = {}
    for name, kwargs in [
        ("allreduce", {}),
        ("fp16", {}),
        ("dgc", {"density": 0.01}),
        (
            "powersgd",
            {"matrix_approximation_rank": 2, "start_powerSGD_iter": 2, "min_compression_rate": 1},
        ),
    ]:
        model = DDP(mlp(widths=WIDE), bucket_cap_mb=0.05)  # several buckets
        state, hook = make_hook(name, **kwargs)
        model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = [train_step(model, opt, rank, step % 2) for step in range(12)]
        out[name] = {
            "losses": losses,
            "hook": hook.__name__,
            "params": [p.detach().clone() for p in model.parameters()],
        }
    return out


def test_every_baseline_trains_with_several_buckets_on_gloo():
    results = run_ranks(_baselines, 2)
    assert results[0]["powersgd"]["hook"] == "powersgd_waiting_hook"
    for name in ("allreduce", "fp16", "dgc", "powersgd"):
        losses = results[0][name]["losses"]
        assert losses[-1] < losses[0], name
        a, b = results[0][name]["params"], results[1][name]["params"]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name


class _Scaler:
    def __init__(self) -> None:
        self.scale = 1024.0

    def get_scale(self) -> float:
        return self.scale


def test_residuals_follow_loss_scale_changes():
    from dtrain.comm import DGCState

    state = DGCState()
    state.grad_scaler = _Scaler()
    p = torch.nn.Parameter(torch.zeros(8, 8))
    st = state._param_state(p)
    st.ensure(torch.zeros(64), momentum=True, residual=True)
    state._begin_step()
    st.u.fill_(3.0)
    st.v.fill_(4.0)
    state._step_open = False
    state.grad_scaler.scale = 512.0  # GradScaler backed off
    state._begin_step()
    assert torch.equal(st.u, torch.full((64,), 1.5)) and torch.equal(st.v, torch.full((64,), 2.0))

    # Resumed without a scaler (fp16 -> fp32): residuals return to unscaled units, clipping too.
    state.attach([("w", p)])
    saved = state.state_dict()
    plain = DGCState()
    plain.attach([("w", p)])
    plain.load_state_dict(saved)
    plain._begin_step()
    assert plain._scale is None
    assert torch.equal(plain._params[p].v, torch.full((64,), 2.0 / 512))
    # and back (fp32 -> fp16): into the new loss scale's units.
    scaled = DGCState()
    scaled.grad_scaler = _Scaler()
    scaled.attach([("w", p)])
    plain._step_open = False
    scaled.load_state_dict(plain.state_dict())
    scaled._begin_step()
    assert torch.equal(scaled._params[p].v, torch.full((64,), 2.0 / 512 * 1024))


def _fp16_overflow(rank: int, world: int) -> dict:
    model = DDP(mlp(), bucket_cap_mb=0.05)
    state = DGCState(density=0.05, momentum=0.9, value_dtype=torch.float16, exchange="sparse")
    state.attach(model.module.named_parameters())
    model.register_comm_hook(state, dgc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    blow_up = [False]
    # Only a compressed weight's gradient: finite in fp32, beyond fp16's 65504 once packed (the
    # dense biases stay small, so only the packed values can reveal it).
    model.module[0].weight.register_hook(lambda g: g * 1e9 if blow_up[0] else g)
    out = []
    for step in range(4):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        blow_up[0] = step == 2 and rank == 1
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        skipped_now = state.stats()["skipped_steps"]  # before the next step commits or drops
        state._finish_step()
        residuals = [st.v.clone() for st in state._params.values() if st.v is not None]
        out.append({"finite": bool(finite), "residuals": residuals, "skipped_now": skipped_now})
        if finite:
            opt.step()
    return {"log": out, "skipped": state.skipped_steps}


def test_fp16_overflow_when_packing_skips_the_step_everywhere():
    for r in run_ranks(_fp16_overflow, 2):
        assert [e["finite"] for e in r["log"]] == [True, True, False, True]
        assert [e["skipped_now"] for e in r["log"]] == [0, 0, 1, 1]
        assert r["skipped"] == 1
        before, during = r["log"][1]["residuals"], r["log"][2]["residuals"]
        assert all(torch.equal(a, b) for a, b in zip(before, during, strict=True))
