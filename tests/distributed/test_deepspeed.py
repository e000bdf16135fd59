"""DGC inside DeepSpeed's engine (dtrain.integrations.deepspeed) on 2 gloo ranks: the same
parameters, bit for bit, as DDP with the DGC hook, at ZeRO stages 0 and 1; a checkpoint of the
engine and the per-rank DGC state resumes exactly; ZeRO-2 and overlap_comm refused."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.distributed.harness import outcome, run_ranks
from tests.distributed.models import batch, mlp

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a small C++ op the first time it starts (about a minute): keep it with the
# checkout's virtual environment, not in a HOME that may be read-only.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".venv/torch_extensions")
)

DGC = {"density": 0.05, "min_compress_numel": 1}
STEPS = 6


def _schedule(t: int) -> float:
    return 1.0 / (1.0 + 0.5 * t)  # a changing rate: lr_weighted mode reads it every step


def _engine(model: nn.Module, opt: torch.optim.Optimizer, stage: int, **zero):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _run(rank: int, how: str, stage: int, *, start: int = 0, ckpt: Path | None = None,
         save_at: int | None = None) -> dict:  # fmt: skip
    from dtrain.comm import register_dgc
    from dtrain.integrations import deepspeed as ds
    from dtrain.integrations.accelerate import load_dgc_state, save_dgc_state

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    if how == "ddp":
        net: nn.Module = DDP(model)
        state = register_dgc(net, opt, **DGC)
    else:
        net = engine = _engine(model, opt, stage)
        state = ds.register_dgc(engine, **DGC)
    if start:
        assert ckpt is not None
        _, client = engine.load_checkpoint(str(ckpt), tag="t")
        sched.load_state_dict(client["scheduler"])
        load_dgc_state(state, ckpt)
    for step in range(start, STEPS):
        x, y = batch(rank, step)
        loss = nn.functional.cross_entropy(net(x), y)
        if how == "ddp":
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            engine.backward(loss)
            engine.step()
        sched.step()
        if save_at == step + 1:
            assert ckpt is not None
            engine.save_checkpoint(
                str(ckpt), tag="t", client_state={"scheduler": sched.state_dict()}
            )
            save_dgc_state(state, ckpt)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "ratio": state.stats()["ratio_total"],
        "sent": state.stats()["bytes_sent_total"],
        "iter": state.iter,
    }


def _compare(rank: int, world: int, tmp: str) -> dict:
    # what a launcher sets and DeepSpeed asserts (the harness joined the gloo group by file)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {"ddp": _run(rank, "ddp", 0)}
    for stage in (0, 1):
        out[f"zero{stage}"] = _run(rank, "ds", stage)
    ckpt = Path(tmp) / "ckpt"
    _run(rank, "ds", 1, ckpt=ckpt, save_at=3)  # writes the checkpoint after step 3 of 6
    out["resumed"] = _run(rank, "ds", 1, start=3, ckpt=ckpt)

    from dtrain.integrations import deepspeed as ds

    def refused(stage: int, **zero) -> str:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return outcome(lambda: ds.register_dgc(_engine(model, opt, stage, **zero), **DGC))

    out["zero2"] = refused(2)
    out["overlap"] = refused(1, overlap_comm=True)
    return out


def test_dgc_inside_deepspeed_equals_dgc_on_ddp_and_resumes_exactly(tmp_path):
    results = run_ranks(_compare, 2, str(tmp_path), timeout=600)
    for r in results:
        ref = r["ddp"]
        assert ref["ratio"] > 3 and ref["iter"] == STEPS  # DGC compressed
        for name in ("zero0", "zero1", "resumed"):
            got = r[name]
            assert got["iter"] == STEPS, name
            for a, b in zip(ref["params"], got["params"], strict=True):
                assert torch.equal(a, b), name  # bit for bit: the same hook, the same math
        assert r["zero0"]["sent"] == ref["sent"]  # DGC's bytes, the same
        grads = sum(p.numel() * 4 for p in ref["params"])  # ZeRO-1 all-gathers the weights too
        assert r["zero1"]["sent"] == ref["sent"] + STEPS * (grads // 2)
        assert "set zero_optimization.stage to 1" in r["zero2"]
        assert "overlap_comm = false" in r["overlap"]
    for a, b in zip(results[0]["zero1"]["params"], results[1]["zero1"]["params"], strict=True):
        assert torch.equal(a, b)  # the ranks agree


def _bf16(rank: int, world: int) -> dict:
    """bf16 engines: at density 1 (nothing held back) DGC's reduction equals DeepSpeed's own,
    for ZeRO-0 (bf16 gradients) and ZeRO-1 with fp32 gradient accumulation (BF16_Optimizer)."""
    import deepspeed

    from dtrain.integrations import deepspeed as ds

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {}
    for name, stage, extra in [
        ("zero0", 0, {}),
        ("zero1_fp32_accum", 1, {"data_types": {"grad_accum_dtype": "fp32"}}),
    ]:
        params: dict = {}
        for how in ("deepspeed", "dgc", "dgc_sparse"):
            model = mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            config = {
                "train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0,
                "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": True}, "communication_data_type": "fp32", **extra,
            }  # fmt: skip
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            state = None
            if how != "deepspeed":
                density = 1.0 if how == "dgc" else 0.05
                state = ds.register_dgc(engine, density=density, min_compress_numel=1)
            for step in range(3):
                x, y = batch(rank, step)
                engine.backward(nn.functional.cross_entropy(engine(x.bfloat16()).float(), y))
                engine.step()
            params[how] = [p.detach().float().clone() for p in engine.module.parameters()]
            if state is not None:
                params[f"{how}_iter"] = state.iter
        out[name] = params
    return out


def test_dgc_inside_bf16_engines_reduces_as_deepspeed_does_at_density_one():
    for r in run_ranks(_bf16, 2, timeout=600):
        for name, got in r.items():
            assert got["dgc_iter"] == got["dgc_sparse_iter"] == 3, name  # the hook ran
            for a, b in zip(got["deepspeed"], got["dgc"], strict=True):
                assert torch.equal(a, b), name
            assert not all(  # and at density 0.05 it held most of the gradient back
                torch.equal(a, b) for a, b in zip(got["deepspeed"], got["dgc_sparse"], strict=True)
            ), name


def _flushed(rank: int, world: int) -> dict:
    """ZeRO-1 keeps an fp32 master copy of the weights: flush() must reach it, or the next step
    (here at learning rate 0) puts the weights back."""
    from dtrain.integrations import deepspeed as ds

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {}
    for how in ("state.flush", "ds.flush"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = _engine(model, opt, 1)
        state = ds.register_dgc(engine, **DGC)
        for step in range(3):
            x, y = batch(rank, step)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()
        before = [p.detach().clone() for p in model.parameters()]
        (state.flush() if how == "state.flush" else ds.flush(engine, state))
        flushed = [p.detach().clone() for p in model.parameters()]
        for g in opt.param_groups:
            g["lr"] = 0.0
        x, y = batch(rank, 9)
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()
        after = [p.detach().clone() for p in model.parameters()]
        same = all(torch.equal(a, b) for a, b in zip(flushed, after, strict=True))
        moved = not all(torch.equal(a, b) for a, b in zip(before, flushed, strict=True))
        out[how] = (moved, same)
    return out


def test_flush_under_zero1_reaches_the_master_weights():
    for r in run_ranks(_flushed, 2, timeout=600):
        assert r["ds.flush"] == (True, True)  # flushed, and kept
        assert r["state.flush"] == (True, False)  # what it guards against: undone
