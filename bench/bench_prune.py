"""Pruning the digits CNN with the real jobs: accuracy and DGC's bytes, side by side in one run.

Command (defaults shown)::

    .venv/bin/python bench/bench_prune.py --seeds 0,1,2 --nproc 2 --densities 0.001,0.01,0.1 \\
        [--out runs/bench_prune] [--json out.json] [--plot docs/img/prune_digits.png]

Per seed: the default training job (``configs/digits.toml``, DGC, 30 epochs) as the source; then
``dtrain.prune`` with ``configs/prune/digits_global90.toml`` (global magnitude pruning to 90%,
10 epochs of fine-tuning) with DGC and with allreduce; the lottery ticket
(``configs/prune/digits_lottery.toml``: 3 rounds to 80%, each rewound to the source's initial
weights and trained 30 epochs) and its control (the lottery's final mask on re-initialised
weights, 30 epochs). For seed 0 also the other schedules (gradual, iterative) and the layer-wise
scope, and DGC's bytes per step at each density (constant, ``density_schedule = "constant"``)
with the masks (90%) and without them (the same fine-tuning at sparsity 0), read from the last
step. Prints Markdown tables; ``--plot`` copies seed 0's ``accuracy_vs_sparsity.png``.

``--parts channels`` (structured, ``--channel-seeds 0,1``): ResNet-20 on the digits at 32x32
(``configs/resnet20_digits32.toml``, 30 epochs, DGC) as the source, then
``configs/prune/resnet20_channels.toml`` (half of the channels inside every block removed by L1
norm, 15 epochs of fine-tuning) with DGC and with allreduce, with Taylor importance, stage-level
(``prune.groups = "stages"``: each stage's shared width halved) and in 3 iterative rounds (DGC's
state carried over each removal, the learning-rate schedule restarted each round); CPU
latency of the unpruned and the pruned model (inside blocks, stage-level) measured here,
alternating, at 1 and 2 threads (median of 5 rounds of the median of 10 runs).
``--plot-channels`` copies seed 0's plot::

    .venv/bin/python bench/bench_prune.py --parts channels \\
        --plot-channels docs/img/prune_resnet20.png
"""

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from common import machine_line, md_table, run_job, write_json

PRUNE_CONFIG = "configs/prune/digits_global90.toml"
LOTTERY = "configs/prune/digits_lottery.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--densities", default="0.001,0.01,0.1")
    ap.add_argument("--out", default="runs/bench_prune")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--parts", default="weights", help="weights (unstructured) and/or channels")
    ap.add_argument("--channel-seeds", default="0,1")
    ap.add_argument("--plot-channels")
    args = ap.parse_args()
    if "channels" in args.parts:
        channels(args)
    if "weights" not in args.parts:
        return
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    common = ["--logging.progress=false", f"--run.out_dir={out}", "--checkpoint.resume="]
    print(machine_line(1), file=sys.stderr)

    def prune(name: str, seed: int, *extra: str, config: str = PRUNE_CONFIG) -> dict:
        argv = [
            "--config", config, *common, f"--run.name={name}", f"--run.seed={seed}",
            f"--prune.source={out}/source-seed{seed}", *extra,
        ]  # fmt: skip
        summary = run_job("dtrain.prune", args.nproc, argv, out / name)[-1]
        report = json.loads((out / name / "prune_report.json").read_text())
        row = {**report, "summary": summary}
        print(f"{name}: {json.dumps(summary)}", file=sys.stderr, flush=True)
        return row

    runs: dict[str, dict] = {}
    for seed in seeds:
        src = f"source-seed{seed}"
        argv = ["--config", "configs/digits.toml", *common, f"--run.name={src}"]
        run_job("dtrain.train", args.nproc, [*argv, f"--run.seed={seed}"], out / src)
        for hook in ("dgc", "allreduce"):
            runs[f"{hook}-seed{seed}"] = prune(f"{hook}-seed{seed}", seed, f"--comm.hook={hook}")
        runs[f"lottery-seed{seed}"] = prune(f"lottery-seed{seed}", seed, config=LOTTERY)
        runs[f"control-seed{seed}"] = prune(
            f"control-seed{seed}", seed, f"--prune.source={out}/lottery-seed{seed}",
            "--prune.method=oneshot", "--prune.rewind=random", "--run.epochs=30",
            "--optim.cycles=1", config=LOTTERY,
        )  # fmt: skip
    s0 = seeds[0]
    for method in ("gradual", "iterative"):
        runs[method] = prune(method, s0, f"--prune.method={method}")
    runs["layer"] = prune("layer", s0, "--prune.scope=layer")
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    for d in densities:
        for sparsity in (0.9, 0.0):
            name = f"bytes-d{d}-s{sparsity}"
            runs[name] = prune(
                name, s0, f"--comm.density={d}", f"--prune.sparsity={sparsity}",
                "--comm.density_schedule=constant",
            )  # fmt: skip

    # ---- tables
    def acc(r: dict, key: str) -> float:
        return r[f"test_accuracy_{key}"]

    rows = []
    drops = {"dgc": [], "allreduce": []}
    for seed in seeds:
        for hook in ("dgc", "allreduce"):
            r = runs[f"{hook}-seed{seed}"]
            drop = acc(r, "before") - acc(r, "final")
            drops[hook].append(drop)
            rows.append([
                seed, hook, f"{acc(r, 'before'):.2f}", f"{acc(r, 'pruned'):.2f}",
                f"{acc(r, 'final'):.2f}", f"{drop:+.2f}",
            ])  # fmt: skip
    print(md_table(["seed", "fine-tune hook", "before", "pruned (one-shot)", "fine-tuned",
                    "drop"], rows))  # fmt: skip
    for hook, d in drops.items():
        print(f"\n{hook}: mean drop {_mean_sd(d)} points")
    rows, gaps = [], {"lottery": [], "control": []}
    for seed in seeds:
        lt, ct = runs[f"lottery-seed{seed}"], runs[f"control-seed{seed}"]
        dense = acc(lt, "before")
        gaps["lottery"].append(dense - acc(lt, "final"))
        gaps["control"].append(dense - acc(ct, "final"))
        per_round = ", ".join(f"{x['test_accuracy']:.2f}" for x in lt["rounds"])
        rows.append([
            seed, f"{dense:.2f}", per_round, f"{acc(lt, 'final'):.2f}", f"{acc(ct, 'final'):.2f}",
            f"{lt['sparsity']:.4f}",
        ])  # fmt: skip
    print()
    print(md_table(["seed", "dense (source)", "lottery per round (41.5/65.8/80%)",
                    "lottery 80%", "control 80%", "sparsity"], rows))  # fmt: skip
    for k, g in gaps.items():
        print(f"\n{k}: mean gap to dense {_mean_sd(g)} points")
    rows = []
    for name in ("dgc-seed" + str(s0), "gradual", "iterative", "layer"):
        r = runs[name]
        rows.append([
            name, r["method"], r["scope"], f"{r['sparsity']:.4f}", f"{acc(r, 'before'):.2f}",
            f"{acc(r, 'final'):.2f}", f"{r['nonzero_parameters']:,}", f"{r['macs']:,}",
            f"{r['nonzero_macs']:,}", f"{r['latency_ms_batch1']:.3f}",
            f"{r['latency_ms_batch64']:.3f}",
        ])  # fmt: skip
    print()
    print(md_table(["run", "method", "scope", "sparsity", "before", "fine-tuned", "nonzero params",
                    "MACs", "nonzero MACs", "ms @1", "ms @64"], rows))  # fmt: skip
    rows = []
    for d in densities:
        m, u = runs[f"bytes-d{d}-s0.9"], runs[f"bytes-d{d}-s0.0"]
        rows.append([
            d, u["pairs_last_step"], m["pairs_last_step"], u["bytes_last_step"],
            m["bytes_last_step"], f"{u['bytes_last_step'] / m['bytes_last_step']:.2f}x",
            f"{acc(u, 'final'):.2f}", f"{acc(m, 'final'):.2f}",
        ])  # fmt: skip
    print()
    head = ["density", "pairs unmasked", "pairs masked", "bytes/step unmasked"]
    head += ["bytes/step masked", "saving", "acc unmasked", "acc masked"]
    print(md_table(head, rows))
    write_json(args.json, runs)
    if args.plot:
        shutil.copyfile(out / f"dgc-seed{s0}" / "accuracy_vs_sparsity.png", args.plot)


def _latency(run_dir: Path) -> dict[int, tuple[float, float]]:
    """threads -> (unpruned ms, pruned ms) at batch 64, measured alternately in this process."""
    import torch

    from dtrain.checkpoint import load_shared
    from dtrain.config import from_dict
    from dtrain.data import load_data
    from dtrain.jobs.channels import rebuild_from
    from dtrain.models import build_model
    from dtrain.pruning.measure import latency_ms

    _, s = load_shared(run_dir)
    cfg = from_dict({k: v for k, v in s["config"].items() if k != "prune"})
    info = load_data(cfg.data, seed=0).info
    pruned = rebuild_from(build_model(cfg.model, info), s["extensions"]["prune"])
    pruned.load_state_dict(s["model"])
    dense = build_model(cfg.model, info)
    x = torch.randn(64, *info.in_shape)
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        a, b = [], []
        for _ in range(5):
            a.append(latency_ms(dense, x, repeats=10))
            b.append(latency_ms(pruned, x, repeats=10))
        out[threads] = (statistics.median(a), statistics.median(b))
    return out


def channels(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.channel_seeds.split(",") if s.strip()]
    out = Path(args.out)
    common = ["--logging.progress=false", f"--run.out_dir={out}", "--checkpoint.resume="]
    config = "configs/prune/resnet20_channels.toml"
    rows, lat_rows, runs = [], [], {}
    for seed in seeds:
        src = f"r20-source-seed{seed}"
        argv = ["--config", "configs/resnet20_digits32.toml", *common, f"--run.name={src}"]
        run_job("dtrain.train", args.nproc, [*argv, f"--run.seed={seed}"], out / src)
        for name, extra in (
            ("l1-dgc", []), ("l1-allreduce", ["--comm.hook=allreduce"]),
            ("taylor-dgc", ["--prune.importance=taylor"]),
            ("stages-dgc", ["--prune.groups=stages"]),
            ("iterative-dgc", ["--prune.method=iterative", "--prune.rounds=3", "--optim.cycles=3"]),
        ):  # fmt: skip
            run = f"r20-{name}-seed{seed}"
            argv = [
                "--config", config, *common, f"--run.name={run}", f"--run.seed={seed}",
                f"--prune.source={out}/{src}", *extra,
            ]  # fmt: skip
            run_job("dtrain.prune", args.nproc, argv, out / run)
            r = runs[run] = json.loads((out / run / "prune_report.json").read_text())
            print(f"{run}: {r['test_accuracy_final']:.2f}", file=sys.stderr, flush=True)
            drop = r["test_accuracy_before"] - r["test_accuracy_final"]
            rows.append([
                seed, name, f"{r['test_accuracy_before']:.2f}", f"{r['test_accuracy_pruned']:.2f}",
                f"{r['test_accuracy_final']:.2f}", f"{drop:+.2f}",
                f"{r['parameters_before']:,} → {r['parameters']:,}",
                f"{r['macs_before'] / 1e6:.2f} → {r['macs'] / 1e6:.2f}M "
                f"({r['macs'] / r['macs_before']:.3f}x)",
            ])  # fmt: skip
            if name in ("l1-dgc", "stages-dgc"):
                for threads, (a, b) in _latency(out / run).items():
                    lat_rows.append([seed, name, threads, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x"])
    print(md_table(["seed", "run", "before", "pruned (one-shot)", "fine-tuned", "drop",
                    "parameters", "MACs per image"], rows))  # fmt: skip
    print()
    print(md_table(["seed", "run", "threads", "unpruned ms @64", "pruned ms @64", "speed-up"],
                   lat_rows))  # fmt: skip
    for name in ("l1-dgc", "stages-dgc", "iterative-dgc"):
        r0 = runs[f"r20-{name}-seed{seeds[0]}"]
        print(f"\nstage widths, {name} (seed {seeds[0]}):", json.dumps(r0["stage_widths"]))
    write_json(args.json and args.json.replace(".json", "-channels.json"), runs)
    if args.plot_channels:
        shutil.copyfile(out / f"r20-l1-dgc-seed{seeds[0]}" / "accuracy_vs_sparsity.png",
                        args.plot_channels)  # fmt: skip


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.2f} ± {sd:.2f}"


if __name__ == "__main__":
    main()
