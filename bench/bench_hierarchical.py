"""Hierarchical DGC against flat DGC and flat allreduce: fast links inside nodes, slow between.

Command (as root, from the repository root; defaults shown)::

    .venv/bin/python bench/bench_hierarchical.py --rates 1gbit,100mbit --nodes 2 \\
        --nproc-per-node 2 --steps 40 [--md out.md] [--json out.json] [-- --section.key=value]

Each run is the real job, ``python -m dtrain.train --config configs/mlp_synthetic.toml``
(an MLP on synthetic data; ``--model.width``, default here 2048: 6.3M parameters) on
``--nodes`` network namespaces of ``bench/netsim.py`` with ``--nproc-per-node`` ranks each: the
ranks of a node talk over the namespace's own address (loopback speed), nodes over veths shaped
to the rate. Variants: ``allreduce`` (dense), ``dgc`` (flat: every rank exchanges its sparse
gradient with every other rank over the slow links) and ``hierarchical`` (``--comm.hierarchical``:
dense inside the node, each local rank's share sparse across nodes). The table gives the median
step time of the logged windows after the first (``step_time_s`` of ``metrics.jsonl``, rank 0,
logged every 5 steps) and the bytes per step each rank sends, as the hook counts them: across
nodes for hierarchical (``bytes_sent``), all of it for the others.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import md_table, write_json

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "allreduce": ["--comm.hook=allreduce"],
    "dgc": ["--comm.hook=dgc"],
    "hierarchical": ["--comm.hook=dgc", "--comm.hierarchical=true"],
}


def run(args: argparse.Namespace, rate: str, variant: str) -> list[dict]:
    name = f"hier-{variant}-{rate}"
    out = Path(args.out).resolve()
    cmd = [
        sys.executable, "bench/netsim.py", "run", f"--nodes={args.nodes}", f"--rate={rate}",
        f"--nproc-per-node={args.nproc_per_node}", "--threads=1", "--timeout=1500", "--",
        "-m", "dtrain.train", "--config", "configs/mlp_synthetic.toml", *VARIANTS[variant],
        f"--run.out_dir={out}", f"--run.name={name}", f"--run.max_steps={args.steps}",
        f"--model.width={args.width}", "--logging.every_steps=5", "--logging.progress=false",
        "--checkpoint.resume=", f"--data.batch_size={16 * args.nodes * args.nproc_per_node}",
        *args.extra,
    ]  # fmt: skip
    if (out / name).exists():
        import shutil

        shutil.rmtree(out / name)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1gbit,100mbit")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--out", default="runs/bench_hierarchical")
    ap.add_argument("--md")
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    rows, raw = [], {}
    for rate in args.rates.split(","):
        med, sent = {}, {}
        for variant in VARIANTS:
            lines = run(args, rate, variant)
            raw[f"{rate}/{variant}"] = lines
            train = [x for x in lines if x["kind"] == "train"][1:]
            med[variant] = statistics.median(x["step_time_s"] for x in train)
            sent[variant] = statistics.median(x["bytes_sent"] for x in train)
        for v in VARIANTS:
            rows.append([rate, v, f"{1e3 * med[v]:.1f}", f"{sent[v] / 1e6:.3f}",
                         f"{med[v] / med['dgc']:.2f}"])  # fmt: skip
        print(f"[bench_hierarchical] {rate}: {med}", file=sys.stderr, flush=True)
    text = (
        f"{args.nodes} nodes x {args.nproc_per_node} ranks, MLP width {args.width}, "
        f"{args.steps} steps, rates between nodes: {args.rates} (inside a node: loopback)\n\n"
        + md_table(["rate", "variant", "median step ms", "MB sent/rank/step", "÷ flat DGC"], rows)
    )
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    write_json(args.json, raw)


if __name__ == "__main__":
    main()
