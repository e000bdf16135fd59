"""Code shared by the benchmarks in ``bench/``: models, rank spawning, hooks, tables.

Not a benchmark itself. The scripts import it as ``common`` (they run as
``.venv/bin/python bench/<name>.py``, which puts ``bench/`` first on ``sys.path``; spawned ranks
inherit that path).

Note: no ``from __future__ import annotations`` here — DDP inspects the hooks' annotations and
rejects string annotations.
"""

import itertools
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dtrain.comm import dgc_hook, make_hook
from dtrain.comm.dgc import DGCState
from dtrain.spawn import run_ranks  # noqa: F401  (re-exported for the scripts)

# ---------------------------------------------------------------------------------------- models


def parse_widths(text: str) -> tuple[int, ...]:
    """``"8192,1792,10"`` -> ``(8192, 1792, 10)``."""
    widths = tuple(int(w) for w in text.split(",") if w.strip())
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"--widths needs at least two positive integers, got {text!r}")
    return widths


def mlp(widths: Sequence[int], seed: int = 0) -> nn.Module:
    """Linear(w0, w1) -> ReLU -> ... -> Linear(w[-2], w[-1]); the same weights for a given seed."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet18(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """CIFAR-style ResNet-18 (3x32x32 input, 11.2M parameters), without torchvision."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, widths: Sequence[int], seed: int = 0) -> tuple[nn.Module, tuple]:
    """``(model, input_shape_without_batch)`` for ``"mlp"`` or ``"resnet18"``."""
    if name == "mlp":
        return mlp(widths, seed), (widths[0],)
    if name == "resnet18":
        return resnet18(10, seed), (3, 32, 32)
    raise ValueError(f"unknown model {name!r}; choose mlp or resnet18")


def num_classes(name: str, widths: Sequence[int]) -> int:
    return widths[-1] if name == "mlp" else 10


def make_batches(
    rank: int, count: int, batch: int, in_shape: tuple, classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random batches, different on every rank, the same in every run."""
    g = torch.Generator().manual_seed(12345 + rank)
    return [
        (
            torch.randn(batch, *in_shape, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(count)
    ]


# ---------------------------------------------------------------------------------------- hooks


def noop_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Returns the bucket unchanged, without communicating: DDP's compute-only cost."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class RecordingDGC:
    """A :class:`DGCState` plus the bucket layout seen at each step (for analytic bytes)."""

    def __init__(self, dgc: DGCState) -> None:
        self.dgc = dgc
        # step -> list of buckets, each a list of (numel, dim) of its parameters, in bucket order
        self.layout: dict[int, list[list[tuple[int, int]]]] = {}


def recording_dgc_hook(
    state: RecordingDGC, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """:func:`dgc_hook`, after noting the bucket's parameter shapes."""
    params = [(p.numel(), p.dim()) for p in bucket.parameters()]
    state.layout.setdefault(state.dgc.iter, []).append(params)
    return dgc_hook(state.dgc, bucket)


# Hook variants the benchmarks know, by label. Each entry: description for the table.
HOOK_NOTES = {
    "compute": "no-op hook: bucket returned unchanged, no communication (lower bound)",
    "ddp": "DDP without a hook: built-in C++ allreduce",
    "allreduce": "make_hook('allreduce'): PyTorch's Python allreduce_hook",
    "fp16": "make_hook('fp16'): PyTorch's fp16_compress_hook",
    "powersgd": (
        "make_hook('powersgd', rank {rank}): on gloo this is dtrain's powersgd_waiting_hook, "
        "which waits for each bucket (no overlap with backward)"
    ),
    "dgc32": "make_hook('dgc', density {density}, momentum 0.9, value_dtype float32)",
    "dgc16": "make_hook('dgc', density {density}, momentum 0.9, value_dtype float16)",
    "dgcpaper": "make_hook('dgc', mode 'paper', density {density}, momentum 0.9)",
}
ALL_HOOKS = tuple(HOOK_NOTES)


def register(
    label: str,
    ddp: nn.Module,
    *,
    density: float,
    powersgd_rank: int = 4,
    powersgd_min_rate: float = 2.0,
) -> Any:
    """Register hook ``label`` on ``ddp``; returns the hook state (DGCState for DGC)."""
    if label == "ddp":
        return None
    if label == "compute":
        ddp.register_comm_hook(None, noop_hook)
        return None
    if label in ("allreduce", "fp16"):
        state, hook = make_hook(label)
    elif label == "powersgd":
        state, hook = make_hook(
            "powersgd",
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=2,
            min_compression_rate=powersgd_min_rate,
        )
    elif label in ("dgc32", "dgc16", "dgcpaper"):
        vdt = torch.float16 if label == "dgc16" else torch.float32
        mode = "paper" if label == "dgcpaper" else "lr_weighted"
        state, hook = make_hook("dgc", density=density, momentum=0.9, value_dtype=vdt, mode=mode)
        state.attach(ddp.module.named_parameters())
    else:
        raise ValueError(f"unknown hook {label!r}; choose from {', '.join(ALL_HOOKS)}")
    ddp.register_comm_hook(state, hook)
    return state


def parse_hooks(text: str) -> list[str]:
    hooks = [h.strip() for h in text.split(",") if h.strip()]
    unknown = [h for h in hooks if h not in HOOK_NOTES]
    if unknown:
        raise SystemExit(f"unknown hooks {unknown}; choose from {', '.join(ALL_HOOKS)}")
    return hooks


# ---------------------------------------------------------------------------------------- output


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_job(
    module: str, nproc: int, argv: Sequence[str], run_dir: Path, *, metrics: bool = True
) -> list[dict]:
    """``torchrun --nproc_per_node=NPROC -m MODULE ARGV`` on this host, run from the repo root,
    into ``run_dir`` (removed first if a previous benchmark left it); its ``metrics.jsonl``
    lines (``metrics=False``: none, e.g. for the pipeline). Exits with the job's stderr if it
    fails."""
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, *argv,
    ]  # fmt: skip
    if run_dir.exists():
        shutil.rmtree(run_dir)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={**os.environ})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if not metrics:
        return []
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def machine_line(threads: int) -> str:
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {threads}, "
        f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
