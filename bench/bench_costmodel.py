"""Sparse all-gather or dense reduction: DGC's bytes per rank, measured and modelled.

Command (defaults shown)::

    .venv/bin/python bench/bench_costmodel.py --worlds 2,4,8 --widths 1024,2048,2048,2048,10 \\
        --density 0.001 --warmup 2 --steps 3 [--skip-measure] [--md out.md] \\
        [--plots docs/img] [--json out.json]

(a) Measured against predicted. For each N in ``--worlds``, N spawned gloo ranks (1 torch thread
each; N may exceed the cores: bytes do not depend on time) train an MLP (``--widths``; default
10.5M parameters, DDP's default 25 MB buckets) with DGC at ``--density``, fp32 values, once with
``exchange="sparse"`` and once with ``exchange="dense"``. After ``--warmup`` steps (DDP rebuilds
its buckets after the first), ``--steps`` steps are measured:

* **payload**: ``stats()["bytes_sent"]``, the buffers the rank hands to the collectives, against
  :func:`dtrain.comm.costmodel.model_payload_bytes` summed over the buckets the hook saw;
* **wire**: the bytes the rank's process really wrote to its sockets (``wchar`` of
  ``/proc/self/io``: gloo's TCP transport writes with ``writev``; nothing else writes during the
  measured steps), against :func:`dtrain.comm.costmodel.model_bytes` (ring all-gather
  ``(N-1) P``, ring allreduce ``2 (N-1)/N B``) summed over the buckets. gloo adds a small header
  per message. Received bytes equal sent bytes in ring algorithms and are not measured
  separately (``recv`` is not counted in ``rchar``).

(b) The model alone, N = 2 .. 1024, for ResNet-50 (ImageNet, 25.6M parameters, layer list
written out here), ResNet-18 and ResNet-20 (CIFAR forms, :mod:`dtrain.models.vision`) and the
2-layer LSTM language model of the paper's PTB experiment (vocabulary 10,000, 1,500 units,
untied embedding and decoder: 66.0M): bytes each rank receives per step, sparse against dense,
every parameter with DGC's rules (1-D and smaller than ``min_compress_numel`` = 1024: dense in
both), the whole model as one bucket; and the crossover N (the smallest N at which the dense
reduction sends fewer bytes) per model at density 0.001 and 0.01 with fp32 and fp16 values.
``--plots DIR`` writes ``DIR/costmodel.png``.
"""

import argparse
import gc
import math
from pathlib import Path

import torch
from common import RecordingDGC, make_batches, md_table, mlp, parse_widths, run_ranks, write_json
from common import recording_dgc_hook as hook
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import costmodel
from dtrain.comm.dgc import DGCState
from dtrain.models.vision import resnet18, resnet20

MIN_COMPRESS = 1024  # DGCState's default min_compress_numel
PATHS = ("sparse", "dense")


# ---------------------------------------------------------------------------------- (a) measured


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _measure_rank(rank: int, world: int, widths: tuple, density: float, warmup: int, steps: int):
    batches = make_batches(rank, warmup + steps, 8, (widths[0],), widths[-1])
    out = {}
    for exchange in PATHS:
        ddp = DDP(mlp(widths))
        state = RecordingDGC(DGCState(density=density, momentum=0.9, exchange=exchange))
        state.dgc.attach(ddp.module.named_parameters())
        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)

        def step(x: torch.Tensor, y: torch.Tensor, ddp=ddp, opt=opt) -> None:
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(ddp(x), y).backward()  # waits for every bucket
            opt.step()

        for x, y in batches[:warmup]:
            step(x, y)
        sent0, w0 = state.dgc.stats()["bytes_sent_total"], _wchar()
        for x, y in batches[warmup:]:
            step(x, y)
        w1, sent1 = _wchar(), state.dgc.stats()["bytes_sent_total"]
        buckets = state.layout[warmup + steps - 1]  # every measured step has the same layout
        out[exchange] = {
            "payload": (sent1 - sent0) / steps,
            "wire": (w1 - w0) / steps,
            "shapes": [[(n,) if d <= 1 else (1, n) for n, d in b] for b in buckets],
            "choices": sorted(set(state.dgc._exchanges.values())),
        }
        del ddp, state, opt
        gc.collect()
    return out


def measure(args: argparse.Namespace) -> tuple[list[dict], str]:
    rows, table = [], []
    for world in args.worlds:
        ranks = run_ranks(
            _measure_rank,
            world,
            args.widths,
            args.density,
            args.warmup,
            args.steps,
            threads=1,
            timeout=1800,
        )
        for path in PATHS:
            r = ranks[0][path]
            kw = {
                "world_size": world,
                "density": args.density,
                "value_bytes": 4,
                "exchange": path,
                "min_compress_numel": MIN_COMPRESS,
            }
            payload = sum(costmodel.model_payload_bytes(b, **kw) for b in r["shapes"])
            wire = sum(costmodel.model_bytes(b, **kw) for b in r["shapes"])
            wires = [x[path]["wire"] for x in ranks]
            assert all(x[path]["payload"] == r["payload"] for x in ranks)
            assert r["choices"] == [path]  # forced: every bucket went this way
            row = {
                "world": world,
                "exchange": path,
                "buckets": len(r["shapes"]),
                "payload_predicted": payload,
                "payload_measured": r["payload"],
                "wire_predicted": wire,
                "wire_measured_min": min(wires),
                "wire_measured_max": max(wires),
            }
            rows.append(row)
            table.append(
                [
                    world,
                    path,
                    row["buckets"],
                    f"{payload:,.0f}",
                    f"{r['payload']:,.0f}",
                    f"{wire:,.0f}",
                    f"{min(wires):,.0f} – {max(wires):,.0f}",
                    f"{max(wires) / wire:.4f}",
                ]
            )
    headers = [
        "N",
        "exchange",
        "buckets",
        "payload predicted B",
        "payload `stats()` B",
        "wire predicted B",
        "wire measured B (min – max over ranks)",
        "measured / predicted (max)",
    ]
    return rows, md_table(headers, table)


# ------------------------------------------------------------------------------------ (b) model


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50 (ImageNet, 1000 classes): 25,557,032 parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            cout = 4 * width
            shapes += [(width, cin, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(cout, width, 1, 1), (cout,), (cout,)]
            if b == 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return [*shapes, (1000, 2048), (1000,)]


def lstm_ptb_shapes(vocab: int = 10_000, hidden: int = 1500, layers: int = 2) -> list[tuple]:
    """The paper's PTB language model: embedding, 2 LSTM layers, untied decoder (66.0M)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(4 * hidden, hidden), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    return [*shapes, (vocab, hidden), (vocab,)]


def model_shapes() -> dict[str, list[tuple[int, ...]]]:
    cifar = {"in_channels": 3, "num_classes": 10}
    return {
        "ResNet-50 (ImageNet)": resnet50_shapes(),
        "ResNet-18 (CIFAR)": [tuple(p.shape) for p in resnet18(**cifar).parameters()],
        "ResNet-20 (CIFAR)": [tuple(p.shape) for p in resnet20(**cifar).parameters()],
        "LSTM LM (PTB, 2x1500)": lstm_ptb_shapes(),
    }


def crossover(shapes: list[tuple[int, ...]], density: float, value_bytes: int) -> int:
    """The model's crossover N, checked against the byte counts on both sides of it."""
    n = costmodel.model_crossover(shapes, density=density, value_bytes=value_bytes)

    def cost(world: int, exchange: str) -> float:
        return costmodel.model_bytes(
            shapes, world_size=world, density=density, value_bytes=value_bytes, exchange=exchange
        )

    assert cost(n, "dense") < cost(n, "sparse")
    assert n == 2 or cost(n - 1, "dense") >= cost(n - 1, "sparse")
    return n


def model_table(models: dict[str, list]) -> tuple[list[dict], str]:
    rows, table = [], []
    for name, shapes in models.items():
        total = sum(math.prod(s) for s in shapes)
        comp = sum(math.prod(s) for s in shapes if len(s) > 1 and math.prod(s) >= MIN_COMPRESS)
        row = {"model": name, "params": total, "compressed": comp}
        for d in (0.001, 0.01):
            for vb in (4, 2):
                row[f"crossover_d{d}_vb{vb}"] = crossover(shapes, d, vb)
        kw = {"world_size": 64, "density": 0.001, "value_bytes": 4}
        row["mb_n64_sparse"] = costmodel.model_bytes(shapes, exchange="sparse", **kw) / 1e6
        row["mb_n64_dense"] = costmodel.model_bytes(shapes, exchange="dense", **kw) / 1e6
        rows.append(row)
        table.append(
            [
                name,
                f"{total / 1e6:.2f}M",
                f"{100 * comp / total:.2f}%",
                row["crossover_d0.001_vb4"],
                row["crossover_d0.001_vb2"],
                row["crossover_d0.01_vb4"],
                row["crossover_d0.01_vb2"],
                f"{row['mb_n64_sparse']:.2f} / {row['mb_n64_dense']:.1f}",
            ]
        )
    headers = [
        "model",
        "parameters",
        "compressed",
        "crossover N, d=0.001 fp32",
        "d=0.001 fp16",
        "d=0.01 fp32",
        "d=0.01 fp16",
        "MB/rank/step at N=64, d=0.001 fp32: sparse / dense",
    ]
    return rows, md_table(headers, table)


def warmup_table(models: dict[str, list]) -> tuple[list[dict], str]:
    """Crossover N at each density of DGC.md's warm-up (25%, 6.25%, 1.5625%, 0.39%, final)."""
    densities = (0.25, 0.0625, 0.015625, 0.00390625, 0.001)
    rows, table = [], []
    for name, shapes in models.items():
        for vb in (4, 2):
            row = {"model": name, "value_bytes": vb}
            row.update({f"d{d}": crossover(shapes, d, vb) for d in densities})
            rows.append(row)
            table.append([name, "fp32" if vb == 4 else "fp16", *(row[f"d{d}"] for d in densities)])
    headers = ["model", "values", *(f"d={d:g}" for d in densities)]
    return rows, md_table(headers, table)


def plot(models: dict[str, list], out_dir: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({round(2 ** (i / 8)) for i in range(8, 81)})  # 2 .. 1024
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2), sharex=True)
    lines = [  # (exchange, density, colour, label)
        ("sparse", 0.001, "C0", "sparse all-gather, d=0.001"),
        ("sparse", 0.01, "C1", "sparse all-gather, d=0.01"),
        ("dense", 0.001, "C3", "dense reduction (any d)"),
    ]
    for ax, (name, shapes) in zip(axes.flat, models.items(), strict=True):
        for exchange, d, colour, label in lines:
            for vb, style in ((4, "-"), (2, "--")):
                ys = [
                    costmodel.model_bytes(
                        shapes, world_size=n, density=d, value_bytes=vb, exchange=exchange
                    )
                    for n in worlds
                ]
                dtype = "fp32" if vb == 4 else "fp16"
                ax.plot(worlds, ys, style, color=colour, lw=1.4, label=f"{label}, {dtype}")
        for d, colour in ((0.001, "C0"), (0.01, "C1")):
            n = crossover(shapes, d, 4)
            if n <= worlds[-1]:
                y = costmodel.model_bytes(
                    shapes, world_size=n, density=d, value_bytes=4, exchange="dense"
                )
                ax.plot([n], [y], "o", color=colour, ms=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(
            f"{name}, {sum(math.prod(s) for s in shapes) / 1e6:.1f}M parameters", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("ranks N")
    for ax in axes[:, 0]:
        ax.set_ylabel("bytes received per rank per step")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("DGC exchange cost model (ring collectives; dots: crossover, fp32)", fontsize=11)
    fig.tight_layout()
    path = Path(out_dir) / "costmodel.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4,8", help="world sizes to measure, e.g. 2,4,8")
    ap.add_argument("--widths", default="1024,2048,2048,2048,10", type=parse_widths)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps (>= 2)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps")
    ap.add_argument("--skip-measure", action="store_true", help="only the model part (b)")
    ap.add_argument("--md", help="write the Markdown tables to this file")
    ap.add_argument("--plots", help="write costmodel.png into this directory")
    ap.add_argument("--json", help="write the raw numbers to this file")
    args = ap.parse_args()
    args.worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    if args.warmup < 2:
        raise SystemExit("--warmup must be >= 2: DDP rebuilds its buckets after the first step")

    out: dict = {}
    md = []
    if not args.skip_measure:
        params = sum(p.numel() for p in mlp(args.widths).parameters())
        rows, table = measure(args)
        out["measured"] = rows
        md += [
            f"MLP {' -> '.join(map(str, args.widths))} ({params:,} parameters), density "
            f"{args.density}, fp32 values, per rank per step (mean of {args.steps} steps):",
            "",
            table,
            "",
        ]
    models = model_shapes()
    rows, table = model_table(models)
    out["models"] = rows
    md += ["Crossover world size per model (the whole model as one bucket):", "", table, ""]
    rows, table = warmup_table(models)
    out["warmup"] = rows
    md += ["Crossover world size at each warm-up density:", "", table, ""]
    if args.plots:
        md.append(f"Plot: `{plot(models, args.plots)}`")
    text = "\n".join(md)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
