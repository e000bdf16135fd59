"""Process-group set-up from the launcher's environment, and rank helpers. No model code.

:func:`init_distributed` is the only place that reads the launcher's environment:

* **torchrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): single- or multi-node, static or c10d rendezvous;
* **srun without torchrun** (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
  ``SLURM_JOB_NODELIST``): the master is the first host of the node list, the port
  ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``; the ranks on this node from the step's
  per-node task counts (``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``, e.g.
  ``2(x3),1``) at ``SLURM_NODEID``, else ``SLURM_NTASKS_PER_NODE``, else the world size;
* otherwise **a single process** (world size 1, an in-memory store).

The backend is NCCL with one device per local rank when CUDA devices are present (and the
device is not forced to CPU), gloo otherwise. Local rank ``l`` takes visible device ``l``, or
device 0 when it sees only one (``srun --gpus-per-task=1`` shows every task its own GPU as
device 0); more local ranks than visible GPUs is one line and exit code 2.
"""

import dataclasses
import gc
import logging
import os
import re
import sys
from datetime import timedelta
from typing import NotRequired, TypedDict

import torch
import torch.distributed as dist

from dtrain.errors import PeerError, RankError, UserError

__all__ = [
    "DistInfo",
    "destroy_distributed",
    "first_slurm_host",
    "init_distributed",
    "launch_env",
    "raise_together",
    "setup_logging",
    "slurm_tasks_per_node",
    "uses_cuda",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun", "slurm" or "single"
    # The number of ranks on each node, when the launcher says (Slurm); () when it does not,
    # and then every node is taken to run local_world_size ranks (torchrun's assumption).
    node_ranks: tuple[int, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def hierarchical_local_size(self) -> int:
        """Ranks per node for hierarchical DGC, which needs node ``n`` to hold the ranks
        ``[n*L, (n+1)*L)``; UserError (this rank's) when the job is not laid out that way.

        Every rank must call it before the hook's process groups are made, and the error must
        reach every rank (:func:`raise_together`): with Slurm's cyclic distribution only some
        ranks see that their rank does not match their local rank.
        """
        size = self.local_world_size
        if len(set(self.node_ranks)) > 1:
            raise UserError(
                f"comm.hierarchical needs the same number of ranks on every node, but the "
                f"nodes run {','.join(map(str, self.node_ranks))}: submit with "
                f"--ntasks-per-node, or set comm.hierarchical=false"
            )
        if self.rank % size != self.local_rank:
            raise UserError(
                f"comm.hierarchical needs consecutive ranks on each node, but rank {self.rank} "
                f"is local rank {self.local_rank} of {size}: use Slurm's block distribution "
                f"(the default), or set comm.hierarchical=false"
            )
        return size


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[07-09,12],login1"`` -> ``"gpu07"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not nodelist:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def slurm_tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed per-node task counts, one per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Raises:
        ValueError: ``value`` is not a comma-separated list of ``<tasks>`` or
            ``<tasks>(x<nodes>)`` with positive numbers (a node of a step runs a task at least).
    """
    counts: list[int] = []
    for item in value.split(","):
        m = _TASKS_ITEM.fullmatch(item.strip())
        tasks, nodes = (int(m.group(1)), int(m.group(2) or 1)) if m else (0, 0)
        if tasks < 1 or nodes < 1:
            raise ValueError(f"{value!r} is not a per-node task list like '2(x3),1'")
        counts += [tasks] * nodes
    return counts


def _slurm_node_ranks(env: dict[str, str], world: int) -> tuple[int, ...]:
    """The step's per-node task counts, ``()`` when unset or not this step's.

    ``SLURM_NTASKS_PER_NODE`` is set only with ``--ntasks-per-node``; srun sets its step's
    per-node counts always (``SLURM_TASKS_PER_NODE`` too, unless ``--preserve-env`` kept the
    allocation's: hence the check against the world size).
    """
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if not env.get(key):
            continue
        try:
            counts = slurm_tasks_per_node(env[key])
        except ValueError as e:
            raise UserError(
                f"environment variable {key}: {e}: start the job with srun, or unset it"
            ) from None
        if sum(counts) == world:
            return tuple(counts)
    return ()


def _int_env(env: dict[str, str], key: str, default: int | None = None) -> int:
    """``env[key]`` as an int (``default`` when unset); UserError naming the variable if not."""
    if key not in env and default is not None:
        return default
    try:
        return int(env[key])
    except ValueError:
        raise UserError(
            f"environment variable {key}={env[key]!r} is not an integer: start the job with "
            f"torchrun or srun, or unset it"
        ) from None


class LaunchEnv(TypedDict):
    """What :func:`launch_env` reads from the launcher's environment."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_ranks: tuple[int, ...]
    master_addr: NotRequired[str]  # slurm only
    master_port: NotRequired[str]  # slurm only


def launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Rank, sizes, master address and port, and the launcher's name, from ``env``."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        return {
            "launcher": "torchrun",
            "rank": _int_env(env, "RANK"),
            "world_size": world,
            "local_rank": _int_env(env, "LOCAL_RANK", 0),
            "local_world_size": _int_env(env, "LOCAL_WORLD_SIZE", world),
            "node_ranks": (),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int_env(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
        port = env.get("MASTER_PORT") or str(10000 + _int_env(env, "SLURM_JOB_ID", 0) % 50000)
        local_rank = _int_env(env, "SLURM_LOCALID", 0)
        node_ranks = _slurm_node_ranks(env, world)
        node = _int_env(env, "SLURM_NODEID", -1)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if 0 <= node < len(node_ranks):
            local_world = node_ranks[node]
        elif len(set(node_ranks)) == 1:  # the same on every node: SLURM_NODEID is not needed
            local_world = node_ranks[0]
        elif per_node.isdigit():
            local_world = int(per_node)
        else:
            local_world = world
        return {
            "launcher": "slurm",
            "rank": _int_env(env, "SLURM_PROCID"),
            "world_size": world,
            "local_rank": local_rank,
            "local_world_size": local_world,
            "node_ranks": node_ranks,
            "master_addr": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            "master_port": port,
        }
    return {
        "launcher": "single",
        "rank": 0,
        "world_size": 1,
        "local_rank": 0,
        "local_world_size": 1,
        "node_ranks": (),
    }


def uses_cuda(device: str) -> bool:
    """Whether ``run.device`` (``"auto"``, ``"cpu"``, ``"cuda"``) means CUDA on this machine."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but no CUDA device is visible: use run.device=cpu")
    return use_cuda


def _gpu_index(local_rank: int, visible: int) -> int:
    """This process's GPU: its local rank's, or the only one it sees (``srun --gpus-per-task=1``
    shows each task its own GPU as device 0); RankError when two ranks would share one."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RankError(
            f"local rank {local_rank} has no GPU ({visible} visible): start at most one process "
            f"per GPU (with srun: --gpus-per-task=1, or as many tasks per node as GPUs)"
        )
    return local_rank


def init_distributed(*, device: str = "auto", threads: int = 0) -> DistInfo:
    """Join (or create) the default process group and pick this process's device.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads; 0: this machine's cores divided by the local processes.

    Returns:
        This process's :class:`DistInfo`.
    """
    le = launch_env()
    rank, world = int(le["rank"]), int(le["world_size"])
    local_rank, local_world = int(le["local_rank"]), int(le["local_world_size"])
    use_cuda = uses_cuda(device)
    if use_cuda:
        dev = torch.device("cuda", _gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=10)
    if le["launcher"] == "torchrun":
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    elif le["launcher"] == "slurm":
        init = f"tcp://{le['master_addr']}:{le['master_port']}"
        dist.init_process_group(
            backend, init_method=init, rank=rank, world_size=world, timeout=timeout
        )
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    node_ranks = tuple(le["node_ranks"])
    info = DistInfo(
        rank, world, local_rank, local_world, dev, backend, str(le["launcher"]), node_ranks
    )
    logger.debug(
        "%s: rank %d of %d (local %d of %d), %s on %s",
        info.launcher,
        rank,
        world,
        local_rank,
        local_world,
        backend,
        dev,
    )
    return info


def raise_together(error: BaseException | None, *, peer_message: str = "") -> None:
    """Every rank calls this with its error (or None); if any rank has one, every rank raises.

    The lowest-numbered failing rank raises its own error (a :class:`UserError` as a
    :class:`RankError`, so that it prints its one line there); every other rank raises a
    :class:`PeerError`, which exits with code 2 without printing. Without a process group, just
    raises ``error``. A collective: it returns only once every rank has reached it, so no rank is
    left waiting for a peer that gave up.

    Args:
        error: this rank's exception, or None when this rank succeeded.
        peer_message: what the other ranks' :class:`PeerError` says (for logs and tests).
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        first = torch.tensor([dist.get_rank() if error is not None else world], device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_bad = int(first.item())
        if first_bad == world:
            return
        if first_bad != dist.get_rank():
            raise PeerError(peer_message or f"rank {first_bad} failed (see its message)")
    if error is None:
        return
    if isinstance(error, UserError) and not isinstance(error, RankError):
        raise RankError(str(error)) from None
    raise error


def destroy_distributed() -> None:
    """Tear the process group down after the caller dropped its DDP model and optimizer.

    Collecting garbage first matters: a gloo DDP process whose reducer is still alive when the
    group goes sometimes aborts at interpreter exit ("terminate called without an active
    exception").
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(rank: int, *, verbose: bool = False) -> None:
    """Rank-prefixed logging to stderr: INFO on rank 0, WARNING elsewhere (DEBUG if verbose)."""
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
