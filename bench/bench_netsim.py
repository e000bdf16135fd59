"""Step time and bytes of every hook on a simulated slow cluster: one command, the whole table.

Command (as root, from the repository root; defaults shown; about 12-15 minutes on the 2-core
development machine when it is otherwise idle, estimated from partial runs: 2 ranks take ~40 s
at 1 Gbit/s and ~110 s at 100 Mbit/s, 4 ranks about twice that)::

    .venv/bin/python bench/bench_netsim.py --worlds 2,4 --rates unlimited,10gbit,1gbit,100mbit \\
        --hooks compute,allreduce,fp16,powersgd1,powersgd4,dgc32,dgc16 \\
        --widths 8192,1792,10 --batch 32 --warmup 1 --block-warmup 1 --rounds 2 \\
        --steps unlimited=10,10gbit=10,1gbit=6,100mbit=3 \\
        --md netsim.md --json netsim.json --plots netsim_plots
    .venv/bin/python bench/bench_netsim.py --widths 4096,2432,10 ...   # 9,988,234 parameters

Set-up: for every world size W in ``--worlds`` and rate R in ``--rates``, ``bench/netsim.py``
builds W network namespaces on a bridge, each node's egress shaped to R with ``tc tbf`` (see
netsim.py; ``unlimited`` is the bare veth: 15-27 Gbit/s one way on the development machine), and
starts one torchrun node with one rank per namespace (gloo over the veth, 1 torch thread). All W
ranks share this machine's CPU cores, so with 4 ranks on 2 cores compute is slower than on
a real cluster; the ``compute`` row of the same launch gives that cost, so the communication
share is measured against it. No latency is added (the kernel has no ``netem``).

What runs: in ONE launch per (W, R), every rank builds one DDP model per hook (the MLP of
``--widths``, ~15M parameters by default, same seed everywhere, so DDP's initial broadcast is
skipped with ``init_sync=False`` and the equality is checked instead) and trains on random data
(batch ``--batch`` per rank; SGD lr 0.01, momentum 0.9 for the baselines and 0 for DGC, whose
momentum 0.9 is in the hook). Hooks:

- ``compute``: a no-op hook (bucket returned unchanged): the step without communication;
- ``allreduce``, ``fp16``: PyTorch's ``allreduce_hook`` / ``fp16_compress_hook`` via
  ``dtrain.comm.make_hook``;
- ``powersgd1``, ``powersgd4``: PyTorch's PowerSGD at rank 1 / 4 (``start_powerSGD_iter`` 2,
  ``min_compression_rate`` 2). On gloo ``make_hook("powersgd")`` returns dtrain's
  ``powersgd_waiting_hook``, which completes each bucket before DDP hands over the next (PyTorch's
  hook starts collectives in callbacks that gloo runs out of order), so it has no overlap with
  backward here; on NCCL it would be PyTorch's hook unchanged;
- ``dgc32``, ``dgc16``: DGC at density ``--density`` with fp32 / fp16 values.

Timing: after ``--warmup`` untimed steps per hook (at least 2 for PowerSGD, so that its timed
steps are compressed), the hooks run in contiguous blocks, in an order that rotates every round,
``--rounds`` times. A block is ``--block-warmup`` untimed steps (the first step after switching
models was measured 10-60% slower, whatever the hook) and then S timed steps (S from ``--steps``
for the rate: fewer at slow rates, where a dense allreduce of the 15M-parameter model takes
~5 s at 2 ranks and ~7 s at 4). Every step starts after a barrier and is timed to the end
of ``optimizer.step()``; a step's time is the slowest rank's.
Blocks, not step-by-step interleaving as in bench_overhead.py, because each rank reads its own
interface counters (``/sys/class/net/<iface>/statistics/{tx,rx}_bytes``, inside its namespace)
at block boundaries, after a barrier, so the bytes of a block belong to one hook; the rotation
keeps the hooks under the same conditions.

Per (W, R, hook) the table gives: median step time; the compute-only step time (``compute``'s
median) and the communication share (step − compute) / step, which counts everything the hook
adds to a no-op step (compression work such as DGC's selection and PowerSGD's matrix products,
and waiting on the network; with few steps it can come out slightly negative, i.e. within the
noise of ``compute``); bytes each rank sent and received
per step on the wire (counter delta over the hook's blocks ÷ its steps, mean over ranks;
Ethernet/IP/TCP headers and the per-step barrier included, which is what ``compute`` shows);
bytes per step the hook reports (``stats()["bytes_sent"]``: DGCState's own, and
``dtrain.comm.counting.counted`` for the baselines: the payload handed to the collectives, not
multiplied by the collective's fan-out, so ring allreduce puts ~2(W−1)/W of it on the wire and
DGC's allgather ~(W−1)x); the compression ratio the hook reports (dense / sent) and the one
measured on the wire (allreduce's bytes sent ÷ the hook's); and the step time ÷ allreduce's.
Below the table: the ratios the targets ask for. ``--json`` keeps every step of every rank,
``--plots DIR`` writes step time against rate per hook (``step_time_<W>ranks.png``).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import machine_line, md_table, median, mlp, noop_hook, parse_widths, write_json
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import make_hook
from dtrain.comm.counting import counted

HOOK_NOTES = {
    "compute": "no-op hook, no communication",
    "allreduce": "PyTorch allreduce_hook",
    "fp16": "PyTorch fp16_compress_hook",
    "powersgd1": "PyTorch PowerSGD rank 1 (waiting per bucket on gloo)",
    "powersgd4": "PyTorch PowerSGD rank 4 (waiting per bucket on gloo)",
    "dgc32": "DGC, fp32 values",
    "dgc16": "DGC, fp16 values",
}
DEFAULT_STEPS = "unlimited=10,10gbit=10,1gbit=6,100mbit=3"
POWERSGD_START = 2

# ---------------------------------------------------------------------------------- worker


def _register(label: str, ddp: DDP, cfg: dict) -> object:
    """Register hook ``label`` on ``ddp``; the state whose ``stats()`` reports bytes (or None)."""
    if label == "compute":
        ddp.register_comm_hook(None, noop_hook)
        return None
    if label.startswith("dgc"):
        vdt = torch.float32 if label == "dgc32" else torch.float16
        state, hook = make_hook("dgc", density=cfg["density"], momentum=0.9, value_dtype=vdt)
        state.attach(ddp.module.named_parameters())
        ddp.register_comm_hook(state, hook)
        return state
    if label.startswith("powersgd"):
        name = "powersgd"
        inner, hook = make_hook(
            name,
            matrix_approximation_rank=int(label.removeprefix("powersgd")),
            start_powerSGD_iter=POWERSGD_START,
            min_compression_rate=2.0,
        )
    else:
        name = label
        inner, hook = make_hook(name)
    state, wrapped = counted(name, inner, hook)
    ddp.register_comm_hook(state, wrapped)
    return state


def _counters(iface: str) -> tuple[int, int]:
    """(tx, rx) bytes of this namespace's interface; the worker runs inside the namespace."""
    base = Path("/sys/class/net", iface, "statistics")
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def _check_same_init(models: dict) -> None:
    """DDP's initial broadcast is skipped (init_sync=False): prove the replicas are equal."""
    sums = torch.tensor(
        [sum(p.double().sum().item() for p in m[0].parameters()) for m in models.values()],
        dtype=torch.float64,
    )
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("replicas differ at start although built with the same seed")


def worker(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    hooks, widths = cfg["hooks"], cfg["widths"]

    models = {}
    for label in hooks:
        ddp = DDP(mlp(widths, seed=cfg["seed"]), init_sync=False)
        state = _register(label, ddp, cfg)
        momentum = 0.0 if label.startswith("dgc") else cfg["sgd_momentum"]
        models[label] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=momentum), state)
    _check_same_init(models)
    g = torch.Generator().manual_seed(12345 + rank)
    b = cfg["batch"]
    batches = [
        (torch.randn(b, widths[0], generator=g), torch.randint(0, widths[-1], (b,), generator=g))
        for _ in range(4)
    ]

    def step(ddp: DDP, opt: torch.optim.Optimizer, i: int) -> float:
        x, y = batches[i % len(batches)]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    def run_block(label: str, steps: int, rnd: int) -> dict:
        ddp, opt, state = models[label]
        for i in range(cfg["block_warmup"]):  # untimed: the cost of switching models
            step(ddp, opt, i)
        dist.barrier()
        c0 = _counters(iface)
        times, sent = [], []
        for i in range(steps):
            times.append(step(ddp, opt, i))
            sent.append(state.stats()["bytes_sent"] if state is not None else 0)
        dist.barrier()
        c1 = _counters(iface)
        block = {"hook": label, "round": rnd, "times": times, "hook_sent": sent}
        block.update(tx=c1[0] - c0[0], rx=c1[1] - c0[1])
        if state is not None:
            s = state.stats()
            block.update(ratio=s["ratio"], dense_bytes=s["dense_bytes"])
            if "select_seconds" in s:
                block["select_seconds"] = s["select_seconds"]
        return block

    for label in hooks:  # untimed warm-up; PowerSGD compresses from its step POWERSGD_START on
        need = max(cfg["warmup"], POWERSGD_START if label.startswith("powersgd") else 0)
        for i in range(need):
            step(*models[label][:2], i)
    blocks = []
    for rnd in range(cfg["rounds"]):
        k = rnd % len(hooks)
        for label in hooks[k:] + hooks[:k]:
            blocks.append(run_block(label, cfg["steps"], rnd))
    params = sum(p.numel() for p in models[hooks[0]][0].parameters())
    out = {"rank": rank, "world": world, "iface": iface, "params": params, "blocks": blocks}
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    # Leave without interpreter teardown, in which gloo sometimes aborts (see dtrain/spawn.py).
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------- driver


def parse_steps(text: str, rates: list[str]) -> dict[str, int]:
    """``"8"`` (every rate) or ``"unlimited=8,100mbit=2"`` -> steps per rate."""
    if "=" not in text:
        return dict.fromkeys(rates, int(text))
    spec = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}
    missing = [r for r in rates if r not in spec]
    if missing:
        raise SystemExit(f"--steps gives no step count for rates {missing}")
    return spec


def launch(world: int, rate: str, cfg: dict, args: argparse.Namespace) -> dict:
    """One netsim cluster, one torchrun node per namespace running :func:`worker`."""
    import netsim

    with tempfile.TemporaryDirectory(prefix="dtrain-benchnet-") as tmp:
        cfg = {**cfg, "out_dir": tmp}
        cfg_path = Path(tmp, "cfg.json")
        cfg_path.write_text(json.dumps(cfg))
        log_dir = Path(args.log_dir, f"w{world}_{rate}") if args.log_dir else Path(tmp, "logs")
        t0 = time.monotonic()
        with netsim.Cluster(world, rate) as cluster:
            nodes = netsim.run_torchrun(
                cluster,
                [os.path.abspath(__file__), "--worker", str(cfg_path)],
                threads=cfg["threads"],
                timeout=args.launch_timeout,
                log_dir=log_dir,
            )
        ranks = [Path(tmp, f"rank{r}.json") for r in range(world)]
        ok = all(n.returncode == 0 for n in nodes) and all(p.exists() for p in ranks)
        result = {
            "world": world,
            "rate": rate,
            "seconds": time.monotonic() - t0,
            "nodes": [{k: v for k, v in vars(n).items() if k != "log"} for n in nodes],
            "ok": ok,
        }
        if ok:
            result["ranks"] = [json.loads(p.read_text()) for p in ranks]
        else:
            tails = "\n".join(
                f"--- node {n.node}\n{Path(n.log).read_text()[-3000:]}" for n in nodes
            )
            print(f"launch {world} ranks at {rate} failed:\n{tails}", file=sys.stderr)
            result["error"] = tails
        return result


def summarize(launch_res: dict, hooks: list[str]) -> dict[str, dict]:
    """Per hook: step times (max over ranks), medians, bytes per step, ratios."""
    ranks = launch_res["ranks"]
    out: dict[str, dict] = {}
    for h in hooks:
        per_rank = [[b for b in r["blocks"] if b["hook"] == h] for r in ranks]
        step_s = [
            max(ts) for blocks in zip(*per_rank, strict=True)
            for ts in zip(*(b["times"] for b in blocks), strict=True)
        ]  # fmt: skip
        steps = sum(len(b["times"]) for b in per_rank[0])
        tx = [sum(b["tx"] for b in bl) / steps for bl in per_rank]
        rx = [sum(b["rx"] for b in bl) / steps for bl in per_rank]
        hook_sent = [median([s for b in bl for s in b["hook_sent"]]) for bl in per_rank]
        last = per_rank[0][-1]
        out[h] = {
            "step_seconds": step_s,
            "median_ms": 1e3 * median(step_s),
            "tx_per_step": tx,
            "rx_per_step": rx,
            "hook_sent_per_step": hook_sent,
            "hook_ratio": last.get("ratio"),
            "dense_bytes": last.get("dense_bytes"),
        }
    comp = out.get("compute", {}).get("median_ms")
    ar = out.get("allreduce")
    for _h, s in out.items():
        s["compute_ms"] = comp
        s["comm_share"] = (s["median_ms"] - comp) / s["median_ms"] if comp else None
        s["vs_allreduce"] = s["median_ms"] / ar["median_ms"] if ar else None
        mean_tx = _mean(s["tx_per_step"])
        s["wire_ratio"] = _mean(ar["tx_per_step"]) / mean_tx if ar else None
        comm_s = (s["median_ms"] - comp) / 1e3 if comp else 0
        # bits this rank put on the wire per second of communication: how full the link was
        s["wire_mbit_per_comm_s"] = 8 * mean_tx / comm_s / 1e6 if comm_s > 0 else None
    return out


def _mb(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    x /= 1e6
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _row(w: int, r: str, h: str, x: dict) -> list:
    share = x["comm_share"]
    comm = h != "compute"
    return [
        w,
        r,
        h,
        f"{x['median_ms']:.1f}",
        _f(x["compute_ms"], ".1f"),
        "-" if share is None else f"{100 * share:.0f}%",
        _mb(_mean(x["tx_per_step"])),
        _mb(_mean(x["rx_per_step"])),
        _mb(_mean(x["hook_sent_per_step"])) if comm else "-",
        _f(x["hook_ratio"], ".1f") if comm else "-",
        _f(x["wire_ratio"], ".1f") if comm else "-",
        _f(x["vs_allreduce"], ".2f"),
    ]


def table(summaries: dict, worlds: list[int], rates: list[str], hooks: list[str]) -> str:
    rows = [
        _row(w, r, h, summaries[(w, r)][h])
        for w in worlds
        for r in rates
        if (w, r) in summaries
        for h in hooks
    ]
    return md_table(
        [
            "ranks", "rate", "hook", "median step ms", "compute ms", "comm share",
            "sent MB/step (wire)", "received MB/step (wire)", "hook sent MB/step",
            "ratio (hook)", "ratio (wire)", "vs allreduce",
        ],
        rows,
    )  # fmt: skip


def target_ratios(summaries: dict) -> list[tuple[str, float]]:
    """The ratios the issue's targets are stated in, where the run has the cells."""

    def ms(w: int, r: str, h: str) -> float | None:
        s = summaries.get((w, r))
        return s[h]["median_ms"] if s and h in s else None

    out = []
    for dgc in ("dgc32", "dgc16"):
        specs = [
            ("100 Mbit/s, 4 ranks: allreduce step / {} step", (4, "100mbit", "allreduce", dgc)),
            ("1 Gbit/s, 2 ranks: powersgd4 step / {} step", (2, "1gbit", "powersgd4", dgc)),
            ("unlimited, 2 ranks: {} step / allreduce step", (2, "unlimited", dgc, "allreduce")),
            ("unlimited, 4 ranks: {} step / allreduce step", (4, "unlimited", dgc, "allreduce")),
        ]
        for text, (w, r, num, den) in specs:
            a, b = ms(w, r, num), ms(w, r, den)
            if a and b:
                out.append((text.format(dgc), a / b))
    return out


def plots(summaries: dict, worlds: list[int], rates: list[str], hooks: list[str], d: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(d).mkdir(parents=True, exist_ok=True)
    written = []
    for w in worlds:
        have = [r for r in rates if (w, r) in summaries]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for h in hooks:
            ax.plot(have, [summaries[(w, r)][h]["median_ms"] for r in have], marker="o", label=h)
        ax.set_yscale("log")
        ax.set_xlabel("link rate per node (tc tbf on each namespace's egress)")
        ax.set_ylabel("median step time, ms (max over ranks)")
        ax.set_title(f"{w} ranks, one per namespace: step time by hook")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(d, f"step_time_{w}ranks.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worlds", default="2,4", help="ranks (= namespaces) per launch")
    ap.add_argument("--rates", default="unlimited,10gbit,1gbit,100mbit", help="tc tbf rates")
    ap.add_argument("--hooks", default=",".join(HOOK_NOTES), help="comma-separated subset")
    ap.add_argument("--widths", default="8192,1792,10", help="MLP widths (4096,2432,10: ~10M)")
    ap.add_argument("--batch", type=int, default=32, help="batch size per rank")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per hook (PowerSGD: ≥2)")
    ap.add_argument(
        "--block-warmup", type=int, default=1, help="untimed steps at the start of every block"
    )
    ap.add_argument("--steps", default=DEFAULT_STEPS, help="steps per block: N or rate=N,...")
    ap.add_argument("--rounds", type=int, default=2, help="blocks per hook (rotating order)")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--sgd-momentum", type=float, default=0.9, help="baselines' SGD momentum")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launch-timeout", type=float, default=1200.0, help="seconds per launch")
    ap.add_argument("--log-dir", help="keep the torchrun logs here (w<W>_<rate>/node<i>.log)")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--json", help="write raw results (every step of every rank) here")
    ap.add_argument("--plots", help="write step_time_<W>ranks.png here")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0

    import netsim

    netsim.install_signal_handlers()
    worlds = [int(w) for w in args.worlds.split(",") if w]
    rates = [r for r in args.rates.split(",") if r]
    hooks = [h for h in args.hooks.split(",") if h]
    unknown = [h for h in hooks if h not in HOOK_NOTES]
    if unknown:
        print(f"unknown hooks {unknown}; choose from {', '.join(HOOK_NOTES)}", file=sys.stderr)
        return 2
    try:
        for r in rates:
            netsim.parse_rate(r)
        steps = parse_steps(args.steps, rates)
        netsim.require_root()
    except (netsim.NetsimError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    cfg = {
        "hooks": hooks,
        "widths": list(parse_widths(args.widths)),
        "batch": args.batch,
        "warmup": args.warmup,
        "block_warmup": args.block_warmup,
        "rounds": args.rounds,
        "density": args.density,
        "sgd_momentum": args.sgd_momentum,
        "threads": args.threads,
        "seed": args.seed,
    }
    machine = machine_line(args.threads)
    launches, summaries = [], {}
    try:
        for w in worlds:
            for r in rates:
                print(f"[bench_netsim] {w} ranks at {r}: {steps[r]} steps x {args.rounds} rounds "
                      f"per hook", file=sys.stderr, flush=True)  # fmt: skip
                res = launch(w, r, {**cfg, "steps": steps[r]}, args)
                launches.append(res)
                if res["ok"]:
                    summaries[(w, r)] = summarize(res, hooks)
    except netsim.NetsimError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_netsim: interrupted; namespaces removed", file=sys.stderr)
        return 130

    params = next((x["ranks"][0]["params"] for x in launches if x["ok"]), 0)
    head = (
        f"DDP step time and bytes on a simulated cluster (bench/netsim.py: one namespace per "
        f"rank, tc tbf on each node's egress, no added latency), MLP {args.widths} "
        f"({params:,} parameters), batch {args.batch}/rank, gloo, 1 rank per namespace; per hook "
        f"{args.rounds} blocks of {args.block_warmup} untimed + --steps {args.steps} timed steps "
        f"after {args.warmup} warm-up (PowerSGD {POWERSGD_START}); step time = max over ranks, "
        f"median; bytes per step are per rank, mean over ranks. {machine}"
    )
    body = table(summaries, worlds, rates, hooks)
    ratios = target_ratios(summaries)
    lines = "\n".join(f"- {t}: **{v:.2f}**" for t, v in ratios) or "- none: this run lacks them"
    text = f"{head}\n\n{body}\n\nRatios (same run):\n\n{lines}\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    write_json(
        args.json,
        {
            "config": {**cfg, "steps": steps, "worlds": worlds, "rates": rates},
            "machine": machine,
            "summary": {f"{w}x{r}": s for (w, r), s in summaries.items()},
            "ratios": dict(ratios),
            "launches": launches,
        },
    )
    if args.plots:
        for p in plots(summaries, worlds, rates, hooks, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0 if all(x["ok"] for x in launches) else 1


if __name__ == "__main__":
    sys.exit(main())
