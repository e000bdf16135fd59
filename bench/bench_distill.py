"""Distillation with the real jobs: teacher, student alone and distilled, allreduce and DGC.

Command (defaults shown)::

    .venv/bin/python bench/bench_distill.py --tasks digits,lm --parts accuracy,throughput \\
        --seeds 0,1,2 --nproc 2 [--out runs/bench_distill] [--json out.json] \\
        [--plot docs/img/distill.png]

``digits``: per seed a teacher (``configs/digits.toml`` at width 32, ~280k parameters, 30
epochs, allreduce), then ``dtrain.distill`` with ``configs/distill/digits_kd.toml`` (the width-4
student, ~5k parameters) on the first ``--train-samples`` training images (default 300: the
full set saturates, the student alone within ~1.2 points of the teacher) for as many steps as
30 epochs of all 1500 (``0``: all of them, 30 epochs): alone (``distill.alpha = 0``, at the
learning rate of the config, 0.02, and at the student's own best, 0.1), logit KD (α = 0.9,
T = 4), feature KD (``conv2:conv2`` through a 1x1 convolution, α = 0) and both, each with
allreduce and with DGC.

``lm``: the same on a character LM over Python's own ``email`` package (~370k characters):
teacher ``configs/transformer_text.toml`` (width 128, 2 blocks, 10 epochs, sequences of 64,
allreduce), student ``configs/distill/transformer_text_kd.toml`` (width 64, 1 block): alone,
logit (α = 0.9, T = 1), feature (``ln:ln``, a linear adapter) and both.

``throughput`` (seed 0's teachers; DGC): steps/s of the student alone, distilled with a teacher
forward per step and distilled from the logit cache (``distill.cache``), 3 rounds alternating,
the median over the logged windows after the first (which holds the cache's build).
Prints Markdown tables; ``--plot`` draws the accuracy (perplexity) of every variant.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

from common import machine_line, md_table, run_job, write_json

HOOKS = ("allreduce", "dgc")


def corpus() -> str:
    import email

    return os.path.dirname(email.__file__)


def task_setup(task: str, train_samples: int = 0) -> dict:
    if task == "digits":
        # the student on the first train_samples images for as many steps as 30 epochs of all
        few = [f"--data.train_samples={train_samples}", f"--run.epochs={45000 // train_samples}"]
        return {
            "teacher": ["--config", "configs/digits.toml", "--model.width=32"],
            "student": ["--config", "configs/distill/digits_kd.toml", *(few * bool(train_samples))],
            "tag": f"-n{train_samples}" if train_samples else "",
            "features": "conv2:conv2",
            "metric": "test_accuracy",
            "variants": {
                "alone (lr 0.02)": ["--distill.alpha=0"],
                "alone (lr 0.1)": ["--distill.alpha=0", "--optim.lr=0.1"],
                "logit": [],
                "feature": ["--distill.alpha=0", "--distill.features=conv2:conv2"],
                "logit + feature": ["--distill.features=conv2:conv2"],
            },
        }
    text = [f"--data.path={corpus()}", "--data.seq_len=64"]
    return {
        "tag": "",
        "teacher": ["--config", "configs/transformer_text.toml", *text],
        "student": ["--config", "configs/distill/transformer_text_kd.toml", *text],
        "metric": "test_perplexity",
        "variants": {
            "alone": ["--distill.alpha=0"],
            "logit": [],
            "feature": ["--distill.alpha=0", "--distill.features=ln:ln"],
            "logit + feature": ["--distill.features=ln:ln"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,lm")
    ap.add_argument("--parts", default="accuracy,throughput")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--train-samples", type=int, default=300,
        help="digits: the students train on this many images (0: all 1500); the teacher on all",
    )  # fmt: skip
    ap.add_argument("--out", default="runs/bench_distill")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    common = ["--logging.progress=false", f"--run.out_dir={out}", "--checkpoint.resume="]
    print(machine_line(1), file=sys.stderr)

    def job(module: str, name: str, argv: list[str]) -> list[dict]:
        lines = run_job(module, args.nproc, [*argv, *common, f"--run.name={name}"], out / name)
        print(f"{name}: {lines[-1]}", file=sys.stderr, flush=True)
        return lines

    def teacher(task: str, setup: dict, seed: int) -> dict:
        name = f"{task}-teacher-seed{seed}"
        summary = out / name / "metrics.jsonl"
        if summary.is_file() and '"summary"' in summary.read_text().splitlines()[-1]:
            return json.loads(summary.read_text().splitlines()[-1])  # made by an earlier part
        argv = [*setup["teacher"], "--comm.hook=allreduce", f"--run.seed={seed}"]
        return job("dtrain.train", name, argv)[-1]

    results: dict = {}
    for task in [t for t in args.tasks.split(",") if t]:
        setup = task_setup(task, args.train_samples)
        res = results[task] = {"teacher": {}, "runs": {}, "throughput": {}}
        if "throughput" in args.parts:
            res["teacher"][seeds[0]] = teacher(task, setup, seeds[0])
            res["throughput"] = throughput(task, setup, seeds[0], args.rounds, job, out)
        if "accuracy" in args.parts:
            for seed in seeds:
                res["teacher"][seed] = teacher(task, setup, seed)
                src = f"--distill.teacher={out}/{task}-teacher-seed{seed}"
                for (variant, extra), hook in itertools.product(setup["variants"].items(), HOOKS):
                    name = variant.replace(" ", "").replace("(", "-").replace(")", "")
                    argv = [*setup["student"], *extra, f"--comm.hook={hook}", src,
                            f"--run.seed={seed}"]  # fmt: skip
                    run = f"{task}{setup['tag']}-{name}-{hook}-seed{seed}"
                    lines = job("dtrain.distill", run, argv)
                    res["runs"][(variant, hook, seed)] = lines[-1]
        report(task, setup, res, seeds)
    flat = {
        t: {**r, "runs": {"|".join(map(str, k)): v for k, v in r["runs"].items()}}
        for t, r in results.items()
    }
    write_json(args.json, flat)
    if args.plot and "accuracy" in args.parts:
        plot(results, seeds, args.plot, args.train_samples)


def throughput(task: str, setup: dict, seed: int, rounds: int, job, out: Path) -> dict:
    """Median steps/s over the logged windows after the first, per variant, over rounds."""
    base = [*setup["student"], f"--run.seed={seed}", "--comm.hook=dgc", "--run.max_steps=300",
            "--logging.every_steps=20", "--checkpoint.every_steps=0", "--run.eval_every=100000",
            f"--distill.teacher={out}/{task}-teacher-seed{seed}"]  # fmt: skip
    variants = {
        "student alone": ["--distill.alpha=0"],
        "distilled, teacher forward": [],
        "distilled, logit cache": ["--distill.cache=true"],
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v, extra in variants.items():
            name = f"{task}{setup['tag']}-speed-{v.split(',')[-1].strip().replace(' ', '')}-r{r}"
            lines = job("dtrain.distill", name, [*base, *extra])
            steps = [x["step_time_s"] for x in lines if x.get("kind") == "train"][1:]
            times[v].append(statistics.median(steps))
    return {v: 1.0 / statistics.median(t) for v, t in times.items()}


def _mean_sd(xs: list[float], fmt: str = ".2f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def report(task: str, setup: dict, res: dict, seeds: list[int]) -> None:
    metric = setup["metric"]
    if res["teacher"]:
        t = [res["teacher"][s][metric] for s in sorted(res["teacher"])]
        print(f"\n### {task}: teacher {metric} {_mean_sd(t)} (seeds {sorted(res['teacher'])})\n")
    if res["runs"]:
        rows = []
        for variant in setup["variants"]:
            row = [variant]
            for hook in HOOKS:
                xs = [res["runs"][(variant, hook, s)][metric] for s in seeds]
                row.append(f"{_mean_sd(xs)} ({', '.join(f'{x:.2f}' for x in xs)})")
            ratios = [res["runs"][(variant, "dgc", s)]["ratio_total"] for s in seeds]
            gaps = [
                res["runs"][(variant, "dgc", s)][metric]
                - res["runs"][(variant, "allreduce", s)][metric]
                for s in seeds
            ]
            row += [_mean_sd(gaps), f"{statistics.mean(ratios):.1f}x"]
            rows.append(row)
        print(md_table(["student", *(f"{h}: {metric}" for h in HOOKS), "DGC − allreduce",
                        "DGC byte ratio"], rows))  # fmt: skip
    if res["throughput"]:
        alone = res["throughput"]["student alone"]
        rows = [[v, f"{s:.1f}", f"{alone / s:.2f}x"] for v, s in res["throughput"].items()]
        print()
        print(md_table(["DGC, seed 0", "steps/s", "time per step vs alone"], rows))


def plot(results: dict, seeds: list[int], path: str, train_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in results if results[t]["runs"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        setup, res = task_setup(task, train_samples), results[task]
        metric = setup["metric"]
        variants = list(setup["variants"])
        for i, hook in enumerate(HOOKS):
            means = [statistics.mean(res["runs"][(v, hook, s)][metric] for s in seeds)
                     for v in variants]  # fmt: skip
            sds = [statistics.stdev([res["runs"][(v, hook, s)][metric] for s in seeds])
                   if len(seeds) > 1 else 0 for v in variants]  # fmt: skip
            xs = [j + (i - 0.5) * 0.38 for j in range(len(variants))]
            ax.bar(xs, means, 0.38, yerr=sds, label=hook, capsize=3)
        teacher = statistics.mean(r[metric] for r in res["teacher"].values())
        ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher ({teacher:.2f})")
        ax.set_xticks(range(len(variants)), variants, rotation=20, fontsize=8)
        lows = [res["runs"][k][metric] for k in res["runs"]] + [teacher]
        pad = 0.15 * (max(lows) - min(lows))
        ax.set_ylim(min(lows) - pad, max(lows) + pad)
        ax.set_ylabel(metric.replace("_", " "))
        few = f", {train_samples} training images" if task == "digits" and train_samples else ""
        ax.set_title(f"{task}{few}: student, mean ± sd over seeds {seeds}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
