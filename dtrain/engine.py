"""The ``[engine]`` section's DeepSpeed side: the DeepSpeed config a job runs with.

dtrain builds the optimizer and the learning-rate schedule from ``[optim]`` and the batches from
``[data]`` and ``[run]``; the user's DeepSpeed JSON (``engine.deepspeed_config``) says how the
engine partitions (``zero_optimization``) and anything else DeepSpeed offers, and
:func:`deepspeed_config` merges the two, refusing what would contradict the job.
"""

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from dtrain.config import JobConfig
from dtrain.errors import UserError

__all__ = ["check_deepspeed", "deepspeed_config", "zero_stage"]

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
        "steps_per_print": base.get("steps_per_print", 10**9),  # dtrain logs its own metrics
    }
