"""Bytes per step and step time: DDP (allreduce, DGC) against DeepSpeed (ZeRO 0-3, CPU offload,
and DGC inside ZeRO 0 and 1), the same model, data and ranks, one run.

Command (defaults shown)::

    .venv/bin/python bench/bench_engines.py --config configs/mlp_synthetic.toml --nproc 2 \\
        --steps 60 [--out runs/bench_engines] [--json out.json]

Each variant is a ``dtrain.train`` job under torchrun on this host (gloo on CPU, loopback):
``configs/mlp_synthetic.toml`` (an MLP of 2.1M parameters on synthetic 32x32 inputs, batch
128, DGC at density 0.001, warm-up 5 steps). Bytes are each rank's collective payload per
optimizer step, counted as the jobs count them (``comm/bytes_sent``; DDP's fp32 allreduce is
the dense reference; DeepSpeed's own reduction is measured at its communication backend, so
ZeRO-3's parameter all-gathers count; with DGC, ZeRO-1's share of the all-gather of the updated
weights is included). Step time is the median of the logged windows after the first
(start-up and DeepSpeed's set-up excluded); the first window also holds DGC's warm-up, so
``--steps`` must leave several.
"""

import argparse
import statistics
from pathlib import Path

from common import machine_line, md_table, run_job, write_json

VARIANTS = {  # name -> overrides
    "DDP, allreduce": ["--engine.name=ddp", "--comm.hook=allreduce"],
    "DDP, DGC": ["--engine.name=ddp", "--comm.hook=dgc"],
    **{
        f"DeepSpeed ZeRO-{z}, its allreduce": [
            "--engine.name=deepspeed", f"--engine.deepspeed_config=configs/deepspeed/zero{z}.json",
            "--comm.hook=allreduce",
        ]
        for z in (0, 1, 2, 3)
    },
    "DeepSpeed ZeRO-3 + CPU offload, its allreduce": [
        "--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero3_offload.json",
        "--comm.hook=allreduce",
    ],
    **{
        f"DeepSpeed ZeRO-{z}, DGC": [
            "--engine.name=deepspeed", f"--engine.deepspeed_config=configs/deepspeed/zero{z}.json",
            "--comm.hook=dgc",
        ]
        for z in (0, 1)
    },
    "DeepSpeed ZeRO-1 + CPU offload, DGC": [
        "--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero1_offload.json",
        "--comm.hook=dgc",
    ],
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mlp_synthetic.toml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/bench_engines")
    p.add_argument("--json")
    args = p.parse_args()
    out = Path(args.out)
    rows, results = [], {}
    for name, overrides in VARIANTS.items():
        run = out / name.replace(", ", "-").replace(" ", "_").lower()
        lines = run_job(
            "dtrain.train", args.nproc,
            ["--config", args.config, f"--run.max_steps={args.steps}", "--logging.every_steps=10",
             "--logging.progress=false", "--checkpoint.every_steps=0", "--comm.warmup_steps=5",
             f"--run.out_dir={out}", f"--run.name={run.name}", *overrides],
            run,
        )  # fmt: skip
        train = [m for m in lines if m["kind"] == "train"]
        step_s = statistics.median(m["step_time_s"] for m in train[1:])
        last = train[-1]
        results[name] = {
            "bytes_sent": last["bytes_sent"], "dense_bytes": last["dense_bytes"],
            "step_ms": 1000 * step_s,
        }  # fmt: skip
        print(name, results[name], flush=True)
    ref = results["DDP, allreduce"]
    for name, r in results.items():
        rows.append([
            name, f"{r['bytes_sent'] / 1e3:,.1f}", f"{ref['bytes_sent'] / r['bytes_sent']:.3g}x",
            f"{r['step_ms']:.1f}", f"{ref['step_ms'] / r['step_ms']:.2f}x",
        ])  # fmt: skip
    print()
    print(machine_line(0))
    print()
    print(md_table(["variant", "kB sent per step per rank", "fewer bytes than DDP allreduce",
                    "step (ms)", "faster than DDP allreduce"],
                   rows))  # fmt: skip
    write_json(args.json, results)


if __name__ == "__main__":
    main()
