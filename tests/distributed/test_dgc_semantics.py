"""The hook on 2 gloo ranks against DGC.md: re-computation, conservation, fixed k, warm-up."""

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook, sparsify
from tests.distributed.harness import run_ranks
from tests.distributed.models import mlp, train_step
from tests.distributed.recording import Recorder, recording_hook, reference_dgc

PAPER = {"mode": "paper"}
VARIANTS = {
    "momentum": {**PAPER, "momentum": 0.9, "nesterov": False, "momentum_masking": True},
    "nesterov": {**PAPER, "momentum": 0.9, "nesterov": True, "momentum_masking": True},
    "no_masking": {**PAPER, "momentum": 0.9, "nesterov": False, "momentum_masking": False},
    "clipped": {
        **PAPER, "momentum": 0.5, "nesterov": False, "momentum_masking": True, "clip_norm": 0.05
    },
    # docs/modes.md: no masking, residuals weighted by lr_t / lr_0 (the schedule below); and
    # one top-k over each bucket's compressed parameters (both weight matrices share one here)
    "lr_weighted": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": False},
    "lr_weighted_nesterov": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": True},
    "lr_weighted_clipped": {"mode": "lr_weighted", "momentum": 0.5, "nesterov": False,
                            "clip_norm": 0.05},
    "lr_weighted_bucket": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": False,
                           "selection": "bucket"},
    "lr_weighted_bucket_nesterov": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": True,
                                    "selection": "bucket"},
    # after the warm-up the density follows r_t (gain 3: k of 35%, 140% and 15% of density's)
    "lr_density": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": False,
                   "lr_density_gain": 3.0},
    "lr_density_bucket": {"mode": "lr_weighted", "momentum": 0.9, "nesterov": False,
                          "selection": "bucket", "lr_density_gain": 3.0},
}  # fmt: skip
COMMON = {
    "density": 0.05,
    "start_iter": 2,
    "warmup_steps": 4,
    "min_compress_numel": 500,
    "exact_topk": True,
}
STEPS = 9
# the LR factor of each step (every variant trains under it; only lr_weighted reads it): a drop,
# a rise and a step at rate 0, where nothing may leave the residual
LR_FACTORS = [1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.25, 1.0, 0.1]


def _record(rank: int, world: int) -> dict:
    runs = {}
    for name, variant in VARIANTS.items():
        # paper: a bucket per weight matrix; lr_weighted: one bucket for all (23 kB)
        model = DDP(mlp(), bucket_cap_mb=0.005 if variant["mode"] == "paper" else 0.05)
        state = DGCState(**COMMON, **variant)
        names = {p: n for n, p in model.module.named_parameters()}
        state.attach(model.module.named_parameters())
        rec = Recorder(state, names)
        model.register_comm_hook(rec, recording_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: LR_FACTORS[min(t, STEPS - 1)])
        state.set_lr_source(opt)
        outs = []
        for step in range(STEPS):
            train_step(model, opt, rank, step)
            sched.step()
            outs.append({names[p]: p.grad.detach().reshape(-1).clone() for p in model.parameters()})
            rec.next_step()
        runs[name] = {"grads": rec.grads[:-1], "outs": outs, "buckets": rec.buckets[:-1]}
    shapes = {n: tuple(p.shape) for n, p in mlp().named_parameters()}
    return {"runs": runs, "shapes": shapes}


@pytest.fixture(scope="module")
def recorded():
    return run_ranks(_record, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_agrees_with_single_process_recomputation(recorded, variant):
    cfg = {**COMMON, **VARIANTS[variant]}
    grads = [r["runs"][variant]["grads"] for r in recorded]
    ref = reference_dgc(
        grads,
        density=cfg["density"],
        momentum=cfg["momentum"],
        nesterov=cfg["nesterov"],
        masking=cfg.get("momentum_masking", False),
        clip_norm=cfg.get("clip_norm"),
        start_iter=cfg["start_iter"],
        warmup_steps=cfg["warmup_steps"],
        min_compress_numel=cfg["min_compress_numel"],
        shapes=recorded[0]["shapes"],
        rates=LR_FACTORS if cfg["mode"] == "lr_weighted" else None,
        buckets=recorded[0]["runs"][variant]["buckets"]
        if cfg.get("selection") == "bucket"
        else None,
        lr_density_gain=cfg.get("lr_density_gain"),
    )
    for rank, r in enumerate(recorded):
        for step, out in enumerate(r["runs"][variant]["outs"]):
            for name, got in out.items():
                torch.testing.assert_close(
                    got.double(),
                    ref[rank][step][name],
                    atol=2e-6,
                    rtol=1e-5,
                    msg=f"rank {rank} step {step} {name}",
                )


def test_masking_changes_the_result(recorded):
    # The variants are not all the same computation (guards the comparison above).
    a = recorded[0]["runs"]["momentum"]["outs"][-1]["0.weight"]
    b = recorded[0]["runs"]["no_masking"]["outs"][-1]["0.weight"]
    c = recorded[0]["runs"]["nesterov"]["outs"][-1]["0.weight"]
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_lr_density_changes_k_only_after_the_warmup(recorded):
    # same gradients until the warm-up ends (step 6), then fewer or more entries sent
    plain = recorded[0]["runs"]["lr_weighted"]["outs"]
    follows = recorded[0]["runs"]["lr_density"]["outs"]
    for step in range(STEPS):
        same = torch.equal(plain[step]["0.weight"], follows[step]["0.weight"])
        assert same == (step < COMMON["start_iter"] + COMMON["warmup_steps"]), step
        if step >= 6:  # k of 35% / 140% / 15% of the constant density's
            n_plain = int((plain[step]["0.weight"] != 0).sum())
            n_follows = int((follows[step]["0.weight"] != 0).sum())
            assert (n_follows > n_plain) == (step == 7), (step, n_plain, n_follows)


def _conservation(rank: int, world: int) -> dict:
    model = DDP(mlp(), bucket_cap_mb=0.005)
    state = DGCState(density=0.02, momentum=0.0, min_compress_numel=500)
    names = {p: n for n, p in model.module.named_parameters()}
    state.attach(model.module.named_parameters())
    rec = Recorder(state, names)
    model.register_comm_hook(rec, recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compressed = [n for n, p in model.module.named_parameters() if p.dim() > 1 and p.numel() >= 500]
    residual = {n: torch.zeros(p.numel()) for n, p in model.module.named_parameters()}
    checks = []
    for step in range(12):
        train_step(model, opt, rank, step)
        sd = state.state_dict()["params"]  # commits the step
        for n in compressed:
            acc = residual[n] + rec.grads[-1][n]
            now = sd[n]["v"]
            sent = acc - now
            kept_or_sent = bool(((now == acc) | (now == 0)).all())
            count = int((sent != 0).sum())
            everyone = [torch.empty_like(sent) for _ in range(world)]
            dist.all_gather(everyone, sent)
            exchanged = sum(everyone) / world
            grad = dict(model.module.named_parameters())[n].grad.reshape(-1)
            checks.append(
                {
                    "kept_or_sent": kept_or_sent,
                    "count": count,
                    "k": sparsify.num_selected(sent.numel(), 0.02),
                    "exchange_error": (exchanged - grad).abs().max().item(),
                    "identity_error": (sent + now - acc).abs().max().item(),
                }
            )
            residual[n] = now.clone()
        rec.next_step()
    return {"checks": checks}


def test_error_feedback_conserves_every_rank_every_step():
    for r in run_ranks(_conservation, 2):
        for c in r["checks"]:
            assert c["kept_or_sent"], c  # each entry was either sent whole or kept whole
            assert 0.9 * c["k"] <= c["count"] <= c["k"], c
            assert c["identity_error"] == 0.0, c
            assert c["exchange_error"] <= 1e-6, c  # the output is what the ranks gave up


def _bytes(rank: int, world: int, value_dtype: torch.dtype) -> dict:
    model = DDP(mlp(widths=(32, 256, 128, 10)), bucket_cap_mb=100)  # one bucket: one flag
    cfg = {
        "density": 0.001,
        "start_iter": 1,
        "warmup_steps": 8,
        "min_compress_numel": 500,
        "value_dtype": value_dtype,
    }
    state = DGCState(momentum=0.9, **cfg)
    model.register_comm_hook(state, dgc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    for step in range(11):
        train_step(model, opt, rank, step)
        s = state.stats()
        seen.append((s["density"], s["bytes_sent"], s["dense_bytes"]))
    shapes = [tuple(p.shape) for p in model.module.parameters()]
    return {"seen": seen, "shapes": shapes, "cfg": cfg}


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_rank_sends_exactly_k_pairs_and_warmup_follows_dgc_md(value_dtype):
    results = run_ranks(_bytes, 2, value_dtype)
    vbytes = torch.empty((), dtype=value_dtype).element_size()
    for r in results:
        cfg = r["cfg"]
        dense_total = sum(math.prod(s) for s in r["shapes"]) * 4
        # DGC.md with start_iter 1, 8 warm-up steps in 4 stages: dense, then 2 steps each of
        # 25%, 6.25%, 1.5625%, 0.390625%, then the final density.
        stages = [1.0] + [d for d in (0.25, 0.0625, 0.015625, 0.00390625) for _ in range(2)]
        expected_density = stages + [cfg["density"]] * (len(r["seen"]) - len(stages))
        for step, (density, sent, dense) in enumerate(r["seen"]):
            want = expected_density[step]
            assert density == want
            if step < cfg["start_iter"]:
                expected = dense_total * vbytes // 4
            else:
                ks = [
                    sparsify.num_selected(math.prod(s), want)
                    for s in r["shapes"]
                    if len(s) > 1 and math.prod(s) >= cfg["min_compress_numel"]
                ]
                small = sum(
                    math.prod(s)
                    for s in r["shapes"]
                    if len(s) <= 1 or math.prod(s) < cfg["min_compress_numel"]
                )
                k = sum(ks)
                expected = 4 * k + 4 + 4 * math.ceil(k * vbytes / 4) + small * vbytes
            assert (sent, dense) == (expected, dense_total), (step, density)
