"""Accuracy of DGC against dense allreduce: same config, same seeds, same steps, side by side.

Command (defaults shown)::

    .venv/bin/python bench/bench_accuracy.py --config configs/digits.toml --seeds 0,1,2,3,4 \\
        --nproc 2 --hooks allreduce,dgc [--out runs/bench_accuracy] [--json out.json] \\
        [--variant 'NAME=HOOK --section.key=value ...' ...] [-- --section.key=value ...]

For each seed and hook it runs the real job, ``torchrun --nproc_per_node=NPROC -m dtrain.train
--config CONFIG --run.seed=S --comm.hook=H``, with any overrides after ``--`` (for example
``--data.path=/data/cifar-10-batches-py`` for CIFAR-10), and reads the run's summary line from
``metrics.jsonl``: final test accuracy (or perplexity), bytes sent and the compression ratio (per
rank, all steps). The allreduce runs keep SGD momentum in the optimizer; the DGC runs move it into
the hook (``register_dgc``), as a user's job would. The table gives every seed, the mean and
standard deviation per hook, and each seed's DGC − allreduce difference. ``--variant`` names
columns of their own (a hook and overrides only it gets), to compare DGC's modes side by side::

    .venv/bin/python bench/bench_accuracy.py --seeds 0,1,2 --variant 'allreduce=allreduce' \\
        --variant 'paper=dgc --comm.mode=paper' --variant 'lr_weighted=dgc'

ResNet-20 on CIFAR-10 (needs the local data set)::

    .venv/bin/python bench/bench_accuracy.py --config configs/resnet20_cifar10.toml --nproc 4 \\
        --seeds 0,1,2 -- --data.path=/data/cifar-10-batches-py
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import machine_line, md_table, run_job, write_json


def run_one(args: argparse.Namespace, variant: str, hook: str, seed: int, extra: list[str]) -> dict:
    name = f"{Path(args.config).stem}-{variant}-seed{seed}"
    argv = [
        "--config", args.config, f"--run.seed={seed}", f"--comm.hook={hook}",
        f"--run.out_dir={args.out}", f"--run.name={name}", "--logging.progress=false",
        "--checkpoint.resume=", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    summary = run_job("dtrain.train", args.nproc, argv, Path(args.out) / name)[-1]
    summary["job_seconds"] = time.perf_counter() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.toml")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hooks", default="allreduce,dgc")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME=HOOK [--section.key=value ...]'",
        help="a named column: a hook with its own overrides (repeatable; replaces --hooks), "
        "e.g. --variant 'paper=dgc --comm.mode=paper'",
    )
    ap.add_argument("--out", default="runs/bench_accuracy")
    ap.add_argument("--json", help="write every run's summary here")
    ap.add_argument("extra", nargs="*", help="overrides for every run, after --")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # column name -> (hook, its own overrides)
    variants = {h.strip(): (h.strip(), []) for h in args.hooks.split(",") if h.strip()}
    if args.variant:
        variants = {}
        for text in args.variant:
            name, sep, rest = text.partition("=")
            words = rest.split()
            if not sep or not name.strip() or not words:
                ap.error(f"--variant needs 'NAME=HOOK [overrides]', got {text!r}")
            variants[name.strip()] = (words[0], words[1:])
    hooks = list(variants)
    load = machine_line(1)

    results: dict[str, dict[int, dict]] = {h: {} for h in hooks}
    for seed in seeds:
        for hook in hooks:
            kind, own = variants[hook]
            results[hook][seed] = run_one(args, hook, kind, seed, [*args.extra, *own])
            s = results[hook][seed]
            print(f"seed {seed} {hook}: {json.dumps(s)}", file=sys.stderr, flush=True)

    metric = (
        "test_accuracy" if "test_accuracy" in results[hooks[0]][seeds[0]] else "test_perplexity"
    )
    base = hooks[0]
    rows = []
    for seed in seeds:
        row = [seed]
        for h in hooks:
            s = results[h][seed]
            row += [
                f"{s[metric]:.2f}",
                f"{s['bytes_sent_total'] / 1e6:.2f}",
                f"{s['ratio_total']:.1f}x",
            ]
        for h in hooks[1:]:
            row.append(f"{results[h][seed][metric] - results[base][seed][metric]:+.2f}")
        rows.append(row)
    summary_row: list = ["mean ± sd"]
    for h in hooks:
        vals = [results[h][s][metric] for s in seeds]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        mb = statistics.mean(results[h][s]["bytes_sent_total"] for s in seeds) / 1e6
        ratio = statistics.mean(results[h][s]["ratio_total"] for s in seeds)
        summary_row += [f"{statistics.mean(vals):.2f} ± {sd:.2f}", f"{mb:.2f}", f"{ratio:.1f}x"]
    for h in hooks[1:]:
        diffs = [results[h][s][metric] - results[base][s][metric] for s in seeds]
        summary_row.append(f"{statistics.mean(diffs):+.2f}")
    rows.append(summary_row)

    headers = ["seed"]
    for h in hooks:
        headers += [f"{h} {metric}", f"{h} MB sent/rank", f"{h} ratio"]
    headers += [f"{h} − {base}" for h in hooks[1:]]
    steps = results[hooks[0]][seeds[0]]["steps"]
    print(
        f"{args.config}, {args.nproc} processes, {steps} steps per run, overrides {args.extra}; "
        f"{load}\n"
    )
    print(md_table(headers, rows))
    write_json(
        args.json,
        {"config": args.config, "extra": args.extra, "variants": variants, "results": results},
    )


if __name__ == "__main__":
    main()
