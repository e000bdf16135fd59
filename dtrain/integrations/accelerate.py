"""Deep Gradient Compression on a model prepared by Hugging Face Accelerate.

::

    from accelerate import Accelerator
    from dtrain.integrations.accelerate import register_dgc

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    dgc = register_dgc(accelerator, model, optimizer, density=0.001)
    ...
    accelerator.save_state("ckpt")  # also writes ckpt/dgc_state_rank<r>.pt on every rank
    accelerator.load_state("ckpt")  # and reads this rank's back

With more than one process (``accelerate launch --num_processes N``, or torchrun) Accelerate's
model is a ``DistributedDataParallel`` (under ``torch.compile``, its wrapper), on which the DGC
hook registers as on any DDP model. DDP takes one communication hook, so Accelerate's own
``DistributedDataParallelKwargs(comm_hook=...)`` must stay unset. Accelerate saves the objects
given to ``register_for_checkpointing`` on the main process only, but DGC's residuals differ by
rank: :func:`register_dgc` therefore adds a save and a load pre-hook to the accelerator that
write and read one file per rank inside the checkpoint directory.
"""

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dtrain.checkpoint import atomic_torch_save
from dtrain.comm import register_dgc as register_on_ddp
from dtrain.comm.dgc_state import DGCState
from dtrain.comm.hierarchical import HierarchicalDGCState

__all__ = ["load_dgc_state", "register_dgc", "save_dgc_state", "state_file"]

logger = logging.getLogger(__name__)

# Accelerate's DistributedType values with DDP underneath (GPUs, CPUs, and other devices).
_DDP_TYPES = ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA",
              "MULTI_MUSA", "MULTI_HPU")  # fmt: skip


def state_file(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its DGC state in a checkpoint directory."""
    return Path(directory) / f"dgc_state_rank{rank}.pt"


def save_dgc_state(state: DGCState | HierarchicalDGCState, directory: str | Path) -> Path:
    """Write this rank's hook state to ``directory/dgc_state_rank<r>.pt`` (atomically); every
    rank calls it. Returns the file."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = state_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, state.state_dict())
    return path


def load_dgc_state(state: DGCState | HierarchicalDGCState, directory: str | Path) -> None:
    """Load this rank's hook state from ``directory`` (written by :func:`save_dgc_state`).

    Raises:
        FileNotFoundError: ``directory`` holds no state for this rank (saved without DGC, or by
            fewer ranks).
        ValueError: it was saved with another world size.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = state_file(directory, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} was saved without dtrain's DGC state for rank "
            f"{rank} (by another world size, or before register_dgc): resume from a checkpoint "
            f"written with DGC by the same number of processes"
        )
    state.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))


def register_dgc(
    accelerator: Any, model: torch.nn.Module, optimizer: Any, **kwargs: Any
) -> DGCState | HierarchicalDGCState:
    """Register the DGC hook on a model that ``accelerator.prepare`` returned.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (DDP, or ``torch.compile`` of it).
        optimizer: the prepared optimizer (Accelerate's wrapper, or the torch optimizer inside);
            SGD's momentum moves into the hook as with :func:`dtrain.comm.register_dgc`.
        **kwargs: :func:`dtrain.comm.register_dgc`'s arguments (``density``, ``warmup_steps``,
            ...). ``grad_scaler`` defaults to the accelerator's (fp16 mixed precision).

    Returns:
        The registered hook state; ``accelerator.save_state(dir)`` now also writes it per rank
        into ``dir`` and ``accelerator.load_state(dir)`` loads it back.

    Raises:
        ValueError: the accelerator does not use DDP (one process, DeepSpeed, FSDP, ...).
        TypeError: ``model`` is not the DDP model Accelerate prepared.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if accelerator.num_processes < 2:
        raise ValueError(
            "DGC compresses the gradients that processes exchange, and this Accelerator has one "
            "process: launch with `accelerate launch --num_processes N` (N >= 2) or torchrun"
        )
    if kind not in _DDP_TYPES:
        raise ValueError(
            f"Accelerate's {kind} reduces the gradients itself, and DGC is a DDP communication "
            f"hook: use Accelerate's plain multi-process mode (DDP), or dtrain's own jobs"
        )
    kwargs.setdefault("grad_scaler", getattr(accelerator, "scaler", None))
    inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer's torch optimizer
    state = register_on_ddp(model, inner, **kwargs)

    def save(models: list, weights: list, output_dir: str) -> None:
        save_dgc_state(state, output_dir)

    def load(models: list, input_dir: str) -> None:
        load_dgc_state(state, input_dir)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    logger.info("DGC: its state is saved per rank with accelerator.save_state")
    return state
