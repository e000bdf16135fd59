"""DGC's per-step selection and decompression cost as the model grows, against backward time.

Command (defaults shown)::

    .venv/bin/python bench/bench_selection_scaling.py --sizes 1,3,10,30,100 --density 0.001 \\
        --batch 32 --repeats 5 --threads 1 [--world 2] [--md out.md] [--plot out.png]

For each size S (millions of parameters) an MLP 1024 -> h -> h -> 10 with h chosen so that it has
about S·10⁶ parameters is built in one process with ``torch.set_num_threads(--threads)`` (1: what
each rank of a 2-rank job on 2 cores has). Timed, median of ``--repeats`` after one warm-up:

* ``backward``: ``loss.backward()`` of a batch of ``--batch`` (the forward is not counted);
* ``select``: for every weight matrix, what the DGC hook does before communicating —
  momentum correction into new u/v buffers (:func:`~dtrain.comm.sparsify.momentum_correction`)
  and sampled-threshold selection (:func:`~dtrain.comm.sparsify.select_sampled`), plus packing
  the k values;
* ``decompress``: what it does after — zeroing the parameter's gradient and scatter-adding the k
  pairs of ``--world`` ranks into it (``index_add_``).

The table gives the milliseconds and ``select`` and ``select + decompress`` as a share of the
backward time; the plot shows all three against the parameter count.
"""

import argparse
import math
import statistics
import time

import torch
from common import machine_line, md_table
from torch import nn

from dtrain.comm.sparsify import momentum_correction, num_selected, select_sampled


def mlp_of(size: float, seed: int = 0) -> nn.Module:
    """1024 -> h -> h -> 10 with about ``size`` parameters."""
    h = int((-(1024 + 10 + 2) + math.sqrt((1024 + 12) ** 2 + 4 * size)) / 2)
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1024, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    )


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size_m: float, args: argparse.Namespace) -> dict:
    model = mlp_of(size_m * 1e6)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, 1024)
    y = torch.randint(0, 10, (args.batch,))

    def backward() -> None:
        model.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        t0 = time.perf_counter()
        loss.backward()
        backward.seconds = time.perf_counter() - t0

    backward.seconds = 0.0
    bw = []
    for _ in range(args.repeats + 1):
        backward()
        bw.append(backward.seconds)
    bw_s = statistics.median(bw[1:])

    mats = [p for p in model.parameters() if p.dim() > 1]
    grads = [p.grad.view(-1) for p in mats]
    state = [
        (torch.zeros_like(g), torch.zeros_like(g), torch.empty_like(g), torch.empty_like(g))
        for g in grads
    ]
    picked: list[torch.Tensor] = []
    step = [0]

    def select() -> None:
        picked.clear()
        step[0] += 1
        for i, (g, (u, v, u2, v2)) in enumerate(zip(grads, state, strict=True)):
            momentum_correction(g, u, v, momentum=0.9, nesterov=False, u_out=u2, v_out=v2)
            k = num_selected(g.numel(), args.density)
            idx = select_sampled(v2, k, sample_ratio=0.01, start=step[0] * 7919 + i)
            picked.append(torch.cat([idx.to(torch.int32), v2[idx].view(torch.int32)]))

    def decompress() -> None:
        for g, pairs in zip(grads, picked, strict=True):
            k = pairs.numel() // 2
            idx = pairs[:k].long().repeat(args.world)
            vals = pairs[k:].view(torch.float32).repeat(args.world)
            g.zero_()
            g.index_add_(0, idx, vals)

    sel_s = median_time(select, args.repeats)
    dec_s = median_time(decompress, args.repeats)
    return {
        "size_m": size_m,
        "params": n_params,
        "backward_ms": 1e3 * bw_s,
        "select_ms": 1e3 * sel_s,
        "decompress_ms": 1e3 * dec_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,3,10,30,100", help="millions of parameters")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--world", type=int, default=2, help="ranks whose pairs are scatter-added")
    ap.add_argument("--md", help="write the table here")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = machine_line(args.threads)
    rows, results = [], []
    for s in (float(x) for x in args.sizes.split(",") if x.strip()):
        r = measure(s, args)
        results.append(r)
        share = r["select_ms"] / r["backward_ms"]
        both = (r["select_ms"] + r["decompress_ms"]) / r["backward_ms"]
        rows.append(
            [
                f"{r['params'] / 1e6:.1f}M",
                f"{r['backward_ms']:.1f}",
                f"{r['select_ms']:.1f}",
                f"{r['decompress_ms']:.1f}",
                f"{100 * share:.1f}%",
                f"{100 * both:.1f}%",
            ]
        )
    text = (
        f"MLP 1024-h-h-10, batch {args.batch}, density {args.density}, decompression of "
        f"{args.world} ranks' pairs, median of {args.repeats}; {load}\n\n"
        + md_table(
            [
                "parameters",
                "backward ms",
                "select ms",
                "decompress ms",
                "select / backward",
                "(select + decompress) / backward",
            ],
            rows,
        )
    )
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["params"] for r in results]
        for key, label in (
            ("backward_ms", "backward"),
            ("select_ms", "DGC select"),
            ("decompress_ms", "DGC decompress"),
        ):
            ax.loglog(xs, [r[key] for r in results], marker="o", label=label)
        ax.set_xlabel("parameters")
        ax.set_ylabel("ms per step (1 thread)")
        ax.set_title(f"DGC selection cost vs backward, density {args.density}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
