"""Running ``dtrain.train`` as a user does: under torchrun, under srun-like env, as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The test's environment without launcher variables, plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    e = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return e


def torchrun(
    nproc: int, *args: str, timeout: float = 240, module: str = "dtrain.train", **extra: str
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        module,
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


def single(
    *args: str, timeout: float = 240, module: str = "dtrain.train", **extra: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(
        cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


def srun_like(nproc: int, *args: str, timeout: float = 240) -> list[tuple[int, str, str]]:
    """``nproc`` processes that know their rank only from SLURM_* variables, as srun starts
    them; ``(returncode, stdout, stderr)`` of each."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        e = env(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS=str(nproc),
            SLURM_NTASKS_PER_NODE=str(nproc),
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID="7",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "-m", "dtrain.train", *args]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def wandb_env(tmp: Path) -> dict[str, str]:
    """wandb's own files (settings, cache, artifacts) under ``tmp``: nothing in HOME."""
    return {f"WANDB_{k}_DIR": str(tmp / f"wandb-{k.lower()}") for k in ("CONFIG", "CACHE", "DATA")}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
