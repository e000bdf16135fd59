"""Step time of DDP with each communication hook: 2 gloo ranks on loopback, side by side.

Command (defaults shown)::

    .venv/bin/python bench/bench_overhead.py --widths 8192,1792,10 --batch 32 --warmup 5 \\
        --steps 20 --density 0.001 --threads 1 \\
        --hooks compute,ddp,allreduce,fp16,powersgd,dgc32,dgc16,dgcpaper [--profile] \\
        [--json out.json]

What is measured: 2 ranks (spawned processes, gloo, ``torch.set_num_threads(1)`` each) train the
MLP Linear(8192, 1792) -> ReLU -> Linear(1792, 10) (14.7M parameters) on random data (batch 32
per rank). Every hook gets its own freshly built DDP model (same seed) and SGD optimizer (lr
0.01 with a cosine schedule over the run; momentum ``--sgd-momentum``, 0.9 by default, for the
baselines; 0 for DGC, whose momentum 0.9 lives in the hook, as ``register_dgc`` arranges, and
which reads the rate from the optimizer, as ``register_dgc`` arranges too). All models live in
the same process pair and the steps are interleaved: step i runs every hook once, in an order
that rotates with i, so all hooks see the same machine conditions. ``--warmup`` interleaved
steps are untimed.

A step is ``zero_grad``, forward, cross-entropy, backward (with the hook's communication) and
``optimizer.step()``, timed with ``time.perf_counter`` between a barrier before it and the end of
the optimizer step; the step's time is the maximum over the ranks. The table gives the median
over ``--steps`` steps, the ratio to the ``allreduce`` hook's median, and, for DGC, the whole-model
compression ratio ``state.stats()["ratio"]`` (bytes: values, int32 indices, flags and dense
parameters included) and the median selection time ``select_seconds`` (rank 0).

Hooks: ``compute`` (a no-op hook returning the bucket unchanged: forward/backward/optimizer cost
with no communication), ``ddp`` (DDP without a hook: its built-in C++ allreduce), ``allreduce``,
``fp16``, ``powersgd`` (rank ``--powersgd-rank``, start_powerSGD_iter 2; on gloo ``make_hook``
returns ``powersgd_waiting_hook``, which waits for each bucket, so no overlap with backward),
``dgc32`` / ``dgc16`` (DGC's default mode with fp32 / fp16 values), ``dgcpaper`` (the paper's
mode, fp32: ``shared/DGC.md``).

``--profile`` additionally runs a few DGC (fp32) steps under ``torch.profiler`` on rank 0 after
the timing, and prints the ops that took the most CPU time inside the step.
"""

import argparse
import math
import time

import torch
import torch.distributed as dist
from common import (
    HOOK_NOTES,
    build_model,
    machine_line,
    make_batches,
    md_table,
    median,
    num_classes,
    parse_hooks,
    parse_widths,
    register,
    run_ranks,
    write_json,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def _step(ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()


def worker(rank: int, world: int, cfg: dict) -> dict:
    widths = cfg["widths"]
    hooks = cfg["hooks"]
    model_name = "mlp"
    models = {}
    for label in hooks:
        model, in_shape = build_model(model_name, widths, seed=cfg["seed"])
        ddp = DDP(model)
        state = register(
            label,
            ddp,
            density=cfg["density"],
            powersgd_rank=cfg["powersgd_rank"],
            powersgd_min_rate=cfg["powersgd_min_rate"],
        )
        momentum = 0.0 if label.startswith("dgc") else cfg["sgd_momentum"]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=momentum)
        # a cosine over the run: lr_weighted then divides by a new r_t every step, as in training
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / (cfg["warmup"] + cfg["steps"])))
        )
        if label.startswith("dgc"):
            state.set_lr_source(opt)
        models[label] = (ddp, opt, state, sched)
    batches = make_batches(rank, 4, cfg["batch"], in_shape, num_classes(model_name, widths))

    times: dict[str, list[float]] = {h: [] for h in hooks}
    select: dict[str, list[float]] = {h: [] for h in hooks}
    ratio: dict[str, float] = {}
    total = cfg["warmup"] + cfg["steps"]
    for i in range(total):
        x, y = batches[i % len(batches)]
        order = hooks[i % len(hooks) :] + hooks[: i % len(hooks)]
        for label in order:
            ddp, opt, state, sched = models[label]
            dist.barrier()
            t0 = time.perf_counter()
            _step(ddp, opt, x, y)
            dt = time.perf_counter() - t0
            sched.step()
            if i >= cfg["warmup"]:
                times[label].append(dt)
                if label.startswith("dgc"):
                    s = state.stats()
                    select[label].append(s["select_seconds"])
                    ratio[label] = s["ratio"]

    prof_table = None
    if cfg["profile"] and "dgc32" in models:
        prof_table = _profile(rank, models["dgc32"], batches, cfg)
    return {
        "times": times,
        "select": select,
        "ratio": ratio,
        "params": sum(p.numel() for p in models[hooks[0]][0].parameters()),
        "profile": prof_table,
    }


def _profile(rank: int, entry: tuple, batches: list, cfg: dict) -> str | None:
    """Top CPU ops of a few DGC steps (rank 0's table; both ranks run the same steps)."""
    from torch.profiler import ProfilerActivity, profile

    ddp, opt, *_ = entry
    steps = cfg["profile_steps"]
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            _step(ddp, opt, x, y)
    dist.barrier()
    if rank != 0:
        return None
    return (
        f"torch.profiler, {steps} DGC fp32 steps on rank 0 (times are totals over the steps):\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="8192,1792,10", help="MLP layer widths")
    ap.add_argument("--batch", type=int, default=32, help="batch size per rank")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--hooks", default=",".join(HOOK_NOTES), help="comma-separated subset")
    ap.add_argument("--sgd-momentum", type=float, default=0.9, help="baselines' SGD momentum")
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--powersgd-min-rate", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile DGC fp32 steps afterwards")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--json", help="write raw results (every step time of every rank) here")
    args = ap.parse_args()

    cfg = {
        "widths": parse_widths(args.widths),
        "hooks": parse_hooks(args.hooks),
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "density": args.density,
        "sgd_momentum": args.sgd_momentum,
        "powersgd_rank": args.powersgd_rank,
        "powersgd_min_rate": args.powersgd_min_rate,
        "seed": args.seed,
        "profile": args.profile,
        "profile_steps": args.profile_steps,
    }
    load_before = machine_line(args.threads)
    res = run_ranks(worker, 2, cfg, threads=args.threads, timeout=1800.0)
    hooks = cfg["hooks"]
    # A step takes as long as its slowest rank.
    step_s = {h: [max(ts) for ts in zip(*(r["times"][h] for r in res), strict=True)] for h in hooks}
    med = {h: 1e3 * median(step_s[h]) for h in hooks}
    base = med.get("allreduce")
    rows = []
    for h in hooks:
        sel = res[0]["select"][h]
        rows.append(
            [
                h,
                f"{med[h]:.1f}",
                f"{min(step_s[h]) * 1e3:.1f} / {max(step_s[h]) * 1e3:.1f}",
                f"{med[h] / base:.2f}" if base else "-",
                f"{res[0]['ratio'][h]:.1f}" if h in res[0]["ratio"] else "-",
                f"{1e3 * median(sel):.1f}" if sel else "-",
                HOOK_NOTES[h].format(rank=args.powersgd_rank, density=args.density),
            ]
        )
    print(
        f"DDP step time, 2 gloo ranks on loopback, MLP {args.widths} "
        f"({res[0]['params']:,} parameters), batch {args.batch}/rank, "
        f"{args.steps} timed steps after {args.warmup} warm-up, hooks interleaved per step; "
        f"step time = max over ranks; baselines SGD momentum {args.sgd_momentum}, "
        f"DGC momentum 0.9 in the hook; powersgd min_compression_rate {args.powersgd_min_rate}. "
        f"{load_before}\n"
    )
    print(
        md_table(
            [
                "hook",
                "median step ms",
                "min / max ms",
                "vs allreduce",
                "DGC ratio (bytes)",
                "DGC select ms",
                "what",
            ],
            rows,
        )
    )
    if res[0]["profile"]:
        print("\n```\n" + res[0]["profile"] + "\n```")
    write_json(
        args.json,
        {
            "config": {**cfg, "widths": list(cfg["widths"])},
            "median_ms": med,
            "step_seconds_max_over_ranks": step_s,
            "per_rank": [{k: r[k] for k in ("times", "select", "ratio")} for r in res],
        },
    )


if __name__ == "__main__":
    main()
