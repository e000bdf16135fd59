"""Train a model with DDP and a selectable communication hook (DGC by default).

One process (CPU or one GPU)::

    python -m dtrain.train --config configs/digits.toml

torchrun, one node (2 CPU processes with gloo, or one process per GPU with NCCL)::

    torchrun --nproc_per_node=2 -m dtrain.train --config configs/digits.toml --comm.hook=allreduce
    NPROC=8 CONFIG=configs/resnet20_cifar10.toml launch/train.sh --data.path=/data/cifar

torchrun, several nodes (run on every node; c10d rendezvous on the first)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 \\
        --rdzv_id=job42 -m dtrain.train --config configs/resnet18_cifar10.toml

Slurm: ``sbatch --nodes=2 slurm/train.sbatch`` (torchrun per node) or
``sbatch --nodes=2 --ntasks-per-node=8 slurm/train_srun.sbatch`` (``srun python -m
dtrain.train``, no torchrun).

Options: ``--config FILE`` (TOML, see ``configs/``), ``--section.key=value`` overrides (checked
against the config's fields and types), ``--resume`` (continue from the newest complete checkpoint
in the run directory), ``--check`` (validate config, data, run directory and checkpoint for the
world size in ``WORLD_SIZE``, then exit). Errors in the input print one line and exit with code 2.
"""

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.config import JobConfig, load_config
from dtrain.distributed import (
    DistInfo,
    destroy_distributed,
    init_distributed,
    launch_env,
    setup_logging,
    uses_cuda,
)
from dtrain.errors import EXIT_USAGE, UserError, should_print
from dtrain.metrics import format_summary
from dtrain.trainer import Trainer


@dataclass(frozen=True)
class Job:
    """What differs between the jobs that share this entry point's life cycle (parse, check,
    init, train, report, exit code): their name, config class, trainer and final report."""

    prog: str
    description: str
    config: type[JobConfig] = JobConfig
    trainer: Callable[..., Trainer] = Trainer
    """``trainer(cfg, info, check_only=...)``: a :class:`Trainer` with the job's extensions."""
    finish: Callable[[Trainer, dict[str, Any]], None] | None = None
    """Called on every rank after training with the summary (e.g. to write a report)."""


TRAIN = Job("dtrain.train", __doc__.splitlines()[0])


def parse_args(argv: list[str] | None, job: Job = TRAIN) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=job.prog, description=job.description, allow_abbrev=False)
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--check", action="store_true", help="validate the input, then exit")
    # The deepspeed launcher (and torch.distributed.launch) pass it; the rank comes from the
    # environment they set, as under torchrun.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def load(argv: list[str] | None, job: Job = TRAIN) -> tuple[JobConfig, argparse.Namespace]:
    args, overrides = parse_args(argv, job)
    cfg = load_config(args.config, overrides, job.config)
    if args.resume and not cfg.checkpoint.resume:
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, resume="auto")
    return cfg, args


def check(cfg: JobConfig, job: Job = TRAIN) -> None:
    """Everything :class:`Trainer` checks, without a process group (for launchers)."""
    env = dict(os.environ)
    if "WORLD_SIZE" in env:  # a launcher checking for the world it is about to start
        env.setdefault("RANK", "0")
    world = int(launch_env(env)["world_size"])
    device = torch.device("cuda" if uses_cuda(cfg.run.device) else "cpu")
    info = DistInfo(0, world, 0, 1, device, "none", "check")
    job.trainer(cfg, info, check_only=True)
    print(f"{job.prog}: ok: {cfg.run_dir} for {info.world_size} process(es)")


def main(argv: list[str] | None = None, job: Job = TRAIN) -> int:
    rank = 0
    try:
        rank = int(launch_env()["rank"])
        setup_logging(rank)
        cfg, args = load(argv, job)
        if args.check:
            check(cfg, job)
            return 0
        info = init_distributed(device=cfg.run.device, threads=cfg.run.threads)
        summary = run(cfg, info, job)
        if info.is_main:
            print(format_summary(summary), flush=True)
        return 0
    except UserError as e:
        if should_print(e, rank):  # one line per failure across the job
            print(f"{job.prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        destroy_distributed()


def run(cfg: JobConfig, info: DistInfo, job: Job = TRAIN) -> dict[str, Any]:
    """Build the job's trainer, train, run its ``finish``; returns the summary. Collective: every
    rank of an initialised process group calls it (the pipeline runs its stages so)."""
    trainer = job.trainer(cfg, info)
    try:
        summary = trainer.train()
        if job.finish is not None:
            job.finish(trainer, summary)
        return summary
    finally:
        trainer.close()
        del trainer


def exit_now(code: int) -> None:
    """Leave with ``code`` once all work, collectives included, is done, without interpreter
    teardown: that avoids the rare gloo abort at exit ("terminate called without an active
    exception") that would fail torchrun after a successful run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
