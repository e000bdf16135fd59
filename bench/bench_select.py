"""Speed of DGC's top-k selection: exact ``torch.topk`` against the sampled threshold.

Command (defaults shown)::

    .venv/bin/python bench/bench_select.py --numel 25000000 --density 0.001 --repeats 7 \\
        --threads 1 --dists gaussian,studentt3,laplace,residual [--json results.json]

What is measured, on one flat fp32 tensor of ``--numel`` entries (seeded) per distribution, with
``k = num_selected(numel, density)`` and ``torch.set_num_threads(--threads)`` (1 by default: each
rank of a 2-rank job on 2 cores has one thread):

* ``topk``: ``torch.topk(v.abs(), k, sorted=False)`` — what exact selection costs;
* ``select_exact``: :func:`dtrain.comm.sparsify.select_exact` (the same plus the call);
* ``select_sampled``: :func:`dtrain.comm.sparsify.select_sampled` with ``sample_ratio=0.01``
  and a different ``start`` (sample offset) in every repetition, as the hook does per step;
* ``one pass``: ``v.amax()``, one read of the tensor, for scale (not a selection).

Each is run once to warm up, then ``--repeats`` times; the table gives the median in ms, the
speed-up of sampled over topk, and the number of entries sampled selection returned, min and max
over the repetitions relative to k (it must lie in [0.9k, k]; the hook pads the rest).

Distributions: ``gaussian`` (randn), ``studentt3`` (Student's t, 3 degrees of freedom: heavy
tails), ``laplace``, and ``residual``: what the hook selects from after ``--residual-steps`` steps
of DGC — momentum 0.9 and error feedback on gradients with per-coordinate log-normal scales, the k
largest entries sent (zeroed in u and v) every step, then one more gradient added.
"""

import argparse
import time
from collections.abc import Callable

import torch
from common import machine_line, md_table, median, write_json

from dtrain.comm.sparsify import num_selected, select_exact, select_sampled

DISTS = ("gaussian", "studentt3", "laplace", "residual")


def make_tensor(dist_name: str, n: int, k: int, seed: int, residual_steps: int) -> torch.Tensor:
    torch.manual_seed(seed)
    if dist_name == "gaussian":
        return torch.randn(n)
    if dist_name == "studentt3":
        return torch.distributions.StudentT(3.0).sample((n,))
    if dist_name == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((n,))
    if dist_name == "residual":
        scale = torch.randn(n).mul_(0.5).exp_()  # some coordinates have larger gradients
        u = torch.zeros(n)
        v = torch.zeros(n)
        for _ in range(residual_steps):
            u.mul_(0.9).add_(torch.randn(n).mul_(scale))
            v.add_(u)
            idx = torch.topk(v.abs(), k, sorted=False).indices
            v.index_fill_(0, idx, 0.0)
            u.index_fill_(0, idx, 0.0)
        u.mul_(0.9).add_(torch.randn(n).mul_(scale))
        return v.add_(u)
    raise SystemExit(f"unknown distribution {dist_name!r}; choose from {', '.join(DISTS)}")


def timed(fn: Callable[[int], torch.Tensor], repeats: int) -> tuple[list[float], list[int]]:
    """Seconds and result sizes of ``fn(rep)`` for rep in 0..repeats-1, after one warm-up."""
    fn(-1)
    secs, counts = [], []
    for rep in range(repeats):
        t0 = time.perf_counter()
        out = fn(rep)
        secs.append(time.perf_counter() - t0)
        counts.append(out.numel())
    return secs, counts


def bench_one(v: torch.Tensor, k: int, repeats: int, sample_ratio: float) -> dict:
    res: dict = {}
    for name, fn in (
        ("one_pass", lambda rep: v.amax().view(1)),
        ("topk", lambda rep: torch.topk(v.abs(), k, sorted=False).indices),
        ("select_exact", lambda rep: select_exact(v, k)),
        (
            "select_sampled",
            lambda rep: select_sampled(
                v, k, sample_ratio=sample_ratio, start=1_000_003 * (rep + 1) + 7_919
            ),
        ),
    ):
        secs, counts = timed(fn, repeats)
        res[name] = {"seconds": secs, "counts": counts, "median_ms": 1e3 * median(secs)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-ratio", type=float, default=0.01)
    ap.add_argument("--dists", default=",".join(DISTS), help=f"any of {', '.join(DISTS)}")
    ap.add_argument("--residual-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write raw results (all timings) here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    n = args.numel
    k = num_selected(n, args.density)
    dists = [d.strip() for d in args.dists.split(",") if d.strip()]
    results = {}
    rows = []
    for d in dists:
        v = make_tensor(d, n, k, args.seed, args.residual_steps)
        r = bench_one(v, k, args.repeats, args.sample_ratio)
        del v
        results[d] = r
        counts = r["select_sampled"]["counts"]
        lo, hi = min(counts), max(counts)
        ok = 0.9 * k <= lo and hi <= k
        topk_ms, samp_ms = r["topk"]["median_ms"], r["select_sampled"]["median_ms"]
        rows.append(
            [
                d,
                f"{r['one_pass']['median_ms']:.1f}",
                f"{topk_ms:.1f}",
                f"{r['select_exact']['median_ms']:.1f}",
                f"{samp_ms:.1f}",
                f"{topk_ms / samp_ms:.1f}x",
                f"{lo / k:.4f} / {hi / k:.4f}",
                "yes" if ok else "**NO**",
            ]
        )

    print(
        f"Selection of k = {k:,} of {n:,} fp32 entries (density {args.density}), "
        f"median of {args.repeats} after 1 warm-up; sample_ratio {args.sample_ratio}; "
        f"{machine_line(args.threads)}\n"
    )
    print(
        md_table(
            [
                "distribution",
                "one pass (amax) ms",
                "topk(abs) ms",
                "select_exact ms",
                "select_sampled ms",
                "speed-up sampled vs topk",
                "sampled count min / max (/k)",
                "in [0.9k, k]",
            ],
            rows,
        )
    )
    write_json(
        args.json,
        {"numel": n, "k": k, "density": args.density, "threads": args.threads, "results": results},
    )


if __name__ == "__main__":
    main()
