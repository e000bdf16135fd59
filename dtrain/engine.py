"""The ``[engine]`` section's DeepSpeed side: the DeepSpeed config a job runs with.

dtrain builds the optimizer and the learning-rate schedule from ``[optim]`` and the batches from
``[data]`` and ``[run]``; the user's DeepSpeed JSON (``engine.deepspeed_config``) says how the
engine partitions (``zero_optimization``) and anything else DeepSpeed offers, and
:func:`deepspeed_config` merges the two, refusing what would contradict the job.
"""

import json
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain.config import JobConfig
from dtrain.errors import UserError

__all__ = [
    "check_deepspeed",
    "deepspeed_config",
    "initialize",
    "model_state",
    "release",
    "weights_changed",
    "zero_stage",
]

_OWNED = {  # DeepSpeed keys that dtrain sets from the job, and where they come from
    "optimizer": "[optim]",
    "scheduler": "[optim]'s schedule",
    "gradient_clipping": "optim.clip_grad_norm (or comm.clip_norm with DGC)",
    "fp16": "run.precision",
    "bf16": "run.precision",
    "amp": "run.precision",
}


def check_deepspeed() -> None:
    """UserError when DeepSpeed is not installed (nothing imported)."""
    if find_spec("deepspeed") is None:
        raise UserError(
            "engine.name = 'deepspeed' needs DeepSpeed: pip install 'dtrain[deepspeed]' "
            "(or --engine.name=ddp)"
        )


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(cfg: JobConfig, *, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config of a job: ``engine.deepspeed_config``'s JSON with dtrain's batch
    sizes, gradient accumulation and clipping.

    Args:
        cfg: the job's config (``engine.name = "deepspeed"``).
        micro_batch: the per-rank micro-batch (:func:`dtrain.trainer.plan_batches`).

    Raises:
        UserError: the file is missing or not a JSON object, sets what dtrain owns
            (optimizer, scheduler, precision, clipping) or batch sizes that differ from the
            job's, or asks for a ZeRO set-up that DGC cannot run in.
    """
    path = cfg.engine.deepspeed_config
    base: dict[str, Any] = {}
    if path:
        where = f"engine.deepspeed_config = {path!r}"
        try:
            base = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{where}: no such file (see configs/deepspeed/)") from None
        except IsADirectoryError:
            raise UserError(f"{where} is a directory: give a DeepSpeed JSON file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(base, dict):
            raise UserError(f"{where} must hold a JSON object")
        for key, owner in _OWNED.items():
            if key in base:
                raise UserError(
                    f"{path} sets {key!r}: dtrain sets it from {owner}: remove it from the file"
                )
        wanted = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": cfg.run.grad_accum,
            "train_batch_size": cfg.data.batch_size,
        }
        for key, want in wanted.items():
            if key in base and base[key] != want:
                raise UserError(
                    f"{path} sets {key} = {base[key]!r}, the job's [data] and [run] give "
                    f"{want}: remove it from the file (dtrain fills it in)"
                )
    zero = base.get("zero_optimization", {})
    if not isinstance(zero, dict) or not isinstance(zero.get("stage", 0), int):
        raise UserError(f"{path}: zero_optimization must be an object with an integer stage")
    stage = zero_stage(base)
    if not 0 <= stage <= 3:
        raise UserError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
    offload = [k for k in ("offload_optimizer", "offload_param") if zero.get(k)]
    if "offload_param" in offload and stage != 3:
        raise UserError(
            f"{path}: zero_optimization.offload_param needs stage 3 (it offloads the "
            f"partitioned parameters), the file has {stage}: use offload_optimizer"
        )
    if "offload_optimizer" in offload and stage == 0:
        raise UserError(
            f"{path}: zero_optimization.offload_optimizer needs stage 1-3 (it offloads the "
            f"partitioned optimizer state), the file has 0"
        )
    if stage == 3 and cfg.optim.bn_l1 > 0:
        raise UserError(
            f"optim.bn_l1 = {cfg.optim.bn_l1} (Network Slimming) under ZeRO-3 ({path}): the "
            f"batch norms' scales are partitioned outside their layers' forward; use stage 0-2"
        )
    if cfg.comm.hook == "dgc":
        if stage >= 2:
            raise UserError(
                f"comm.hook = 'dgc' under DeepSpeed needs ZeRO stage 0 or 1, {path} has {stage}: "
                f"ZeRO-{stage} reduces and frees each micro-batch's gradients during backward, "
                f"DGC needs every rank's whole gradient once per step: use "
                f"configs/deepspeed/zero1.json, or comm.hook = 'allreduce'"
            )
        if stage == 1 and zero.get("overlap_comm", False):
            raise UserError(
                f"comm.hook = 'dgc' under ZeRO-1 needs zero_optimization.overlap_comm = false "
                f"({path} sets true): DeepSpeed would reduce during backward"
            )
        if stage == 1 and not zero.get("contiguous_gradients", True):
            raise UserError(
                f"comm.hook = 'dgc' under ZeRO-1 needs zero_optimization.contiguous_gradients "
                f"= true ({path} sets false)"
            )
    return {
        **base,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.run.grad_accum,
        "train_batch_size": cfg.data.batch_size,
        "gradient_clipping": float(cfg.optim.clip_grad_norm),  # DeepSpeed's default is 1.0
        "zero_allow_untested_optimizer": True,  # dtrain's torch SGD / AdamW
        # with offload, dtrain's torch optimizer steps on the CPU copy (not DeepSpeed's own)
        **({"zero_force_ds_cpu_optimizer": False} if offload else {}),
        "steps_per_print": base.get("steps_per_print", 10**9),  # dtrain logs its own metrics
    }


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    *,
    device: torch.device,
    local_rank: int,
) -> Any:
    """``deepspeed.initialize`` with dtrain's model, optimizer and :func:`deepspeed_config`, in
    the process group dtrain made; returns the engine."""
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # under srun DeepSpeed asks for it
    os.environ.setdefault("DS_ACCELERATOR", device.type if device.type == "cuda" else "cpu")
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return engine


def model_state(engine: Any) -> dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (a collective under ZeRO-3, which partitions
    the parameters: they are gathered, copied and released again)."""
    module = engine.module
    if int(engine.zero_optimization_stage()) < 3:
        return module.state_dict()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def weights_changed(engine: Any) -> None:
    """After the model's weights were changed in place (pruning masks, a rewind, DGC's flush):
    ZeRO 1 and 2 keep an fp32 master copy of their partition, which would undo the change at the
    next step; it is refreshed from the weights."""
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def release(engine: Any) -> None:
    """Detach an engine from its model before another is built on it (the hooks DeepSpeed put on
    the parameters are removed; left, they would reduce the gradients a second time)."""
    engine.destroy()
