"""Time to accuracy on a simulated slow network: the real job, dense allreduce against DGC.

Command (as root, from the repository root; defaults shown)::

    .venv/bin/python bench/bench_time_to_accuracy.py --config configs/digits.toml \\
        --rate 100mbit --nodes 2 --hooks allreduce,dgc [--md out.md] [--json out.json] \\
        [--hook-args dgc=--run.epochs=50] [-- --section.key=value ...]

For each hook it runs ``python -m dtrain.train --config CONFIG --comm.hook=H`` (plus the
overrides after ``--``) on ``--nodes`` network namespaces of ``bench/netsim.py`` with each node's
link shaped to ``--rate`` (one rank per node, gloo over the shaped veths, 1 torch thread), with
an evaluation every ``--eval-every`` steps. From each run's ``metrics.jsonl`` it reads the final
test metric, the bytes sent and the eval lines' wall-clock times (seconds since the job's start,
evaluation included). The target is the first hook's (the dense run's) final metric; the time to
target is the first evaluation at which a run reaches it (accuracy >= target, perplexity <=
target). The table gives both runs and the ratio of the dense run's time to target to DGC's.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import md_table, write_json

REPO = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, hook: str) -> list[dict]:
    name = f"tta-{Path(args.config).stem}-{hook}-{args.rate}"
    out = Path(args.out)
    cmd = [
        sys.executable, "bench/netsim.py", "run", f"--nodes={args.nodes}", f"--rate={args.rate}",
        "--threads=1", f"--timeout={args.timeout}", "--", "-m", "dtrain.train",
        "--config", args.config, f"--comm.hook={hook}", f"--run.out_dir={out.resolve()}",
        f"--run.name={name}", "--logging.progress=false", f"--run.eval_every={args.eval_every}",
        "--checkpoint.resume=", "--checkpoint.every_steps=0", *args.extra,
        *args.hook_extra.get(hook, []),
    ]  # fmt: skip
    run_dir = out / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def time_to(lines: list[dict], metric: str, target: float) -> float | None:
    better = (lambda v: v >= target) if metric == "test_accuracy" else (lambda v: v <= target)
    for x in lines:
        if x["kind"] == "eval" and better(x[metric]):
            return x["time"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.toml")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--hooks", default="allreduce,dgc")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=3000)
    ap.add_argument("--out", default="runs/bench_tta")
    ap.add_argument("--md")
    ap.add_argument("--json")
    ap.add_argument(
        "--hook-args",
        action="append",
        default=[],
        metavar="HOOK=OVERRIDES",
        help="overrides for one hook's run only, e.g. 'dgc=--run.epochs=50' (a hook whose steps "
        "are cheaper may take more of them: time to accuracy is what counts); repeatable",
    )
    ap.add_argument("extra", nargs="*", help="overrides for every run, after --")
    args = ap.parse_args()
    args.hook_extra = {}
    for item in args.hook_args:
        hook, _, overrides = item.partition("=")
        args.hook_extra.setdefault(hook, []).extend(overrides.split())
    hooks = [h for h in args.hooks.split(",") if h]
    runs = {h: run(args, h) for h in hooks}
    summaries = {h: runs[h][-1] for h in hooks}
    metric = "test_accuracy" if "test_accuracy" in summaries[hooks[0]] else "test_perplexity"
    target = summaries[hooks[0]][metric]
    tt = {h: time_to(runs[h], metric, target) for h in hooks}
    rows = []
    for h in hooks:
        s = summaries[h]
        t = tt[h]
        rows.append([
            h, f"{s[metric]:.2f}", s["steps"], f"{s['time']:.1f}",
            f"{s['bytes_sent_total'] / 1e6:.1f}", f"{s['ratio_total']:.1f}x",
            f"{t:.1f}" if t is not None else "never",
            f"{tt[hooks[0]] / t:.1f}x" if t and tt[hooks[0]] else "-",
        ])  # fmt: skip
    per_hook = "".join(f"; {h} also {' '.join(x)}" for h, x in args.hook_extra.items())
    text = (
        f"{args.config} {' '.join(args.extra)}{per_hook}; {args.nodes} nodes x 1 rank at "
        f"{args.rate}; "
        f"target = {hooks[0]}'s final {metric} {target:.2f}; eval every {args.eval_every} steps\n\n"
        + md_table(
            [
                "hook",
                f"final {metric}",
                "steps",
                "wall s",
                "MB sent/rank",
                "ratio",
                "time to target s",
                f"{hooks[0]} time ÷ this",
            ],
            rows,
        )
    )
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    write_json(args.json, {"config": args.config, "extra": args.extra, "runs": runs})


if __name__ == "__main__":
    main()
