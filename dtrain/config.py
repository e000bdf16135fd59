"""Configuration: one dataclass per component, TOML files, dotted command-line overrides.

A job's config is a :class:`JobConfig` with one section per component (``run``, ``model``,
``data``, ``optim``, ``comm``, ``checkpoint``, ``logging``). Each component is built from its own
section only. Values come, in order, from the dataclass defaults, a TOML file
(``--config configs/NAME.toml``) and ``--section.key=value`` overrides, which are parsed to the
field's type. Unknown sections or keys are errors that name the closest valid key; every field is
validated in its section's ``__post_init__``. The resolved config is written as TOML into the run
directory (:func:`to_toml`) and as a plain dict into every checkpoint (:func:`to_dict`).
"""

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dtrain.errors import UserError

__all__ = [
    "CheckpointConfig",
    "CommConfig",
    "DataConfig",
    "EngineConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "from_dict",
    "load_config",
    "to_dict",
    "to_toml",
]


def _choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{section}.{name} must be one of {', '.join(choices)}, got {value!r}")


def _at_least(section: str, name: str, value: float, low: float) -> None:
    if not value >= low:
        raise UserError(f"{section}.{name} must be >= {low}, got {value!r}")


def _positive(section: str, name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{section}.{name} must be > 0, got {value!r}")


@dataclass
class RunConfig:
    """What to run and where its outputs go."""

    SECTION: ClassVar[str] = "run"

    name: str = ""
    """Run name; the run directory is ``out_dir/name``. Empty: ``<model>-<data>-<hook>``."""
    out_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seeds the model's initial weights, the data order, augmentation and dropout."""
    epochs: float = 30.0
    """Length of training in epochs (fractions allowed); ignored when ``max_steps`` > 0."""
    max_steps: int = 0
    """Length of training in optimizer steps; 0: ``epochs`` decides."""
    eval_every: int = 0
    """Evaluate on the held-out set every this many steps; 0: at the end of every epoch."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler handed to the hook)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; all but the last run under ``no_sync``."""
    threads: int = 0
    """Torch CPU threads per process; 0: cores / local processes."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _positive(s, "epochs", self.epochs)
        _at_least(s, "max_steps", self.max_steps, 0)
        _at_least(s, "eval_every", self.eval_every, 0)
        _choice(s, "device", self.device, ("auto", "cpu", "cuda"))
        _choice(s, "precision", self.precision, ("fp32", "bf16", "fp16"))
        _at_least(s, "grad_accum", self.grad_accum, 1)
        _at_least(s, "threads", self.threads, 0)
        if not 0 <= self.seed < 2**32:  # torch generators take 64 bits; rank seeds add to it
            raise UserError(f"run.seed must be in [0, 2**32), got {self.seed!r}")
        if "/" in self.name or self.name in (".", ".."):
            raise UserError(f"run.name must be a plain directory name, got {self.name!r}")


MODELS = ("digits_cnn", "mlp", "resnet20", "resnet18", "mobilenet", "char_transformer", "lstm_lm")


@dataclass
class ModelConfig:
    """The network. Input shape, classes and vocabulary come from the data."""

    SECTION: ClassVar[str] = "model"

    name: str = "digits_cnn"
    """One of ``digits_cnn``, ``mlp``, ``resnet20``, ``resnet18``, ``mobilenet`` (image
    classifiers), ``char_transformer``, ``lstm_lm`` (character language models)."""
    width: int = 0
    """Width knob: MLP hidden size, CNN base channels, LM embedding/hidden size; 0: the model's
    default."""
    depth: int = 0
    """Depth knob: MLP hidden layers, LM layers; 0: the model's default."""
    heads: int = 4
    """Attention heads (``char_transformer``)."""
    dropout: float = 0.0
    """Dropout probability (MLP, LMs)."""
    init_from: str = ""
    """Start from the weights of this checkpoint (a run directory: its newest complete one)
    instead of a fresh initialisation: a ``dtrain.train`` or ``dtrain.prune`` checkpoint (a
    channel-pruned model is rebuilt to its smaller architecture; a masked one trains dense)."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "name", self.name, MODELS)
        _at_least(s, "width", self.width, 0)
        _at_least(s, "depth", self.depth, 0)
        _at_least(s, "heads", self.heads, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")


DATASETS = ("digits", "cifar10", "text", "synthetic")


@dataclass
class DataConfig:
    """The data set and how it is batched."""

    SECTION: ClassVar[str] = "data"

    name: str = "digits"
    """``digits`` (scikit-learn's bundled 8x8 digits), ``cifar10`` (local
    ``cifar-10-batches-py``), ``text`` (local text files, character level) or ``synthetic``."""
    path: str = ""
    """``cifar10``: the ``cifar-10-batches-py`` directory. ``text``: a file, a directory (its
    ``*.txt`` and ``*.py`` files) or a glob."""
    batch_size: int = 64
    """Global batch size per optimizer step: split over ranks and micro-batches."""
    eval_batch_size: int = 256
    """Batch size per rank for evaluation."""
    seq_len: int = 64
    """``text``: characters per training sequence."""
    augment: bool = True
    """``cifar10``: random crop with 4-pixel padding and horizontal flips."""
    synthetic_shape: tuple[int, ...] = (3, 32, 32)
    """``synthetic``: shape of one input."""
    synthetic_classes: int = 10
    """``synthetic``: number of classes."""
    synthetic_size: int = 2048
    """``synthetic``: number of training samples (plus a quarter as many held out)."""
    test_fraction: float = 0.1
    """``text``: fraction of the characters held out (the end of the corpus)."""
    image_size: int = 0
    """``digits``: resize the 8x8 images to this size (bilinear; 32 for the residual networks,
    as CIFAR's); 0: 8x8."""
    train_samples: int = 0
    """Train on the first N training samples only (sequences for ``text``): a fixed subset, the
    same for every seed, e.g. to study a small-data regime; 0: all of them."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "name", self.name, DATASETS)
        _at_least(s, "batch_size", self.batch_size, 1)
        _at_least(s, "eval_batch_size", self.eval_batch_size, 1)
        _at_least(s, "seq_len", self.seq_len, 2)
        _at_least(s, "synthetic_classes", self.synthetic_classes, 2)
        _at_least(s, "synthetic_size", self.synthetic_size, 1)
        if not self.synthetic_shape or min(self.synthetic_shape) < 1:
            raise UserError(
                f"data.synthetic_shape must be positive sizes, got {self.synthetic_shape}"
            )
        _at_least(s, "image_size", self.image_size, 0)
        _at_least(s, "train_samples", self.train_samples, 0)
        if self.image_size and self.name != "digits":
            raise UserError(
                f"data.image_size applies to data.name = 'digits' only: set it to 0 for "
                f"{self.name!r}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.name in ("cifar10", "text") and not self.path:
            raise UserError(
                f"data.path is required for data.name = {self.name!r}: set --data.path=DIR"
            )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    SECTION: ClassVar[str] = "optim"

    name: str = "sgd"
    """``sgd`` or ``adamw``. With ``comm.hook = "dgc"``, SGD's momentum moves into the hook."""
    lr: float = 0.1
    """Peak learning rate (after warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW)."""
    decay_norm_and_bias: bool = False
    """Apply weight decay to normalisation weights and biases too (off: they get none)."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW betas."""
    schedule: str = "cosine"
    """``cosine`` (to 0), ``step`` (multiply by ``gamma`` at each milestone) or ``constant``,
    after a linear warm-up."""
    warmup_epochs: float = 0.0
    """Linear LR warm-up from 0, in epochs."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """``step`` schedule: milestones as fractions of training."""
    gamma: float = 0.1
    """``step`` schedule: LR factor at each milestone."""
    cycles: int = 1
    """The schedule, warm-up included, runs this many times over the run (warm restarts: e.g.
    one per prune → fine-tune round of ``dtrain.prune``)."""
    bn_l1: float = 0.0
    """Network Slimming (Liu et al., 2017): add ``bn_l1 * sum(|gamma|)`` over every batch norm's
    scale to the loss, so that unimportant channels' scales go to zero (``dtrain.prune``'s
    ``importance = "bn_scale"`` then removes them); 0: off."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm before the step; 0: off. (With DGC use ``comm.clip_norm``:
    DGC clips each rank's gradient before compression.)"""

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "name", self.name, ("sgd", "adamw"))
        _positive(s, "lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"optim.momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0:
            raise UserError("optim.nesterov = true needs optim.momentum > 0")
        _at_least(s, "weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _choice(s, "schedule", self.schedule, ("cosine", "step", "constant"))
        _at_least(s, "warmup_epochs", self.warmup_epochs, 0.0)
        if not all(0.0 < m < 1.0 for m in self.milestones):
            raise UserError(f"optim.milestones must be fractions in (0, 1), got {self.milestones}")
        _positive(s, "gamma", self.gamma)
        _at_least(s, "cycles", self.cycles, 1)
        _at_least(s, "bn_l1", self.bn_l1, 0.0)
        _at_least(s, "clip_grad_norm", self.clip_grad_norm, 0.0)


HOOKS = ("dgc", "allreduce", "fp16", "powersgd")
DGC_MODES = ("lr_weighted", "paper")  # dtrain.comm.dgc_state.MODES (no torch import here)
DENSITY_SCHEDULES = ("auto", "constant", "lr", "budget")


@dataclass
class CommConfig:
    """The DDP communication hook and its parameters (see ``shared/DGC.md``)."""

    SECTION: ClassVar[str] = "comm"

    hook: str = "dgc"
    """``dgc``, ``allreduce``, ``fp16`` or ``powersgd``."""
    bucket_cap_mb: float = 25.0
    """DDP bucket size in MB."""
    density: float = 0.001
    """DGC: fraction of each compressed tensor sent per step."""
    mode: str = "lr_weighted"
    """DGC: ``lr_weighted`` (no masking; residuals hold learning-rate-weighted momentum, flushed
    into the weights after the last step; at density 1 exactly SGD with momentum) or ``paper``
    (``shared/DGC.md`` as published). See ``docs/modes.md``."""
    momentum_masking: str = "auto"
    """DGC: momentum factor masking, ``true``/``false``; ``auto``: the mode's (paper: on)."""
    selection: str = "tensor"
    """DGC: ``tensor`` (k entries of each compressed tensor, the paper's) or ``bucket`` (the same
    total taken from a bucket's compressed tensors at once, largest residuals first; depends on
    DDP's bucket layout, so a resumed run is not bit-exact)."""
    flush: str = "auto"
    """DGC: after the last step, apply what the residuals still hold to the weights (one dense
    allreduce), ``true``/``false``; ``auto``: in ``lr_weighted`` mode with SGD, when the last
    step's learning rate is at most a tenth of ``optim.lr`` (an annealed schedule)."""
    density_schedule: str = "auto"
    """DGC: ``constant`` (the warm-up, then ``density``: the paper's), ``lr`` (the warm-up, then
    a density that follows the learning rate with mean ``density``: higher while the rate is
    high, down to a tenth of the mean at its end) or ``budget`` (every pair that the warm-up and
    ``density`` would send over the run, spent in proportion to the learning rate from
    ``start_iter`` on, without a separate warm-up); ``lr`` and ``budget`` need ``lr_weighted``
    and SGD; ``auto``: ``budget`` there, else ``constant``. See ``docs/modes.md``."""
    clip_norm: float = 0.0
    """DGC: local gradient clipping norm C (scaled by N^-1/2); 0: off."""
    start_iter: int = 0
    """DGC: steps before this one are dense."""
    warmup_epochs: float = 0.0
    """DGC: exponential density warm-up length in epochs (or use ``warmup_steps``)."""
    warmup_steps: int = 0
    """DGC: exponential density warm-up length in steps (or use ``warmup_epochs``)."""
    warmup_stages: int = 4
    """DGC: equal warm-up stages (25%, 6.25%, ... density)."""
    exact_topk: bool = False
    """DGC: ``torch.topk`` selection instead of the sampled threshold."""
    sample_ratio: float = 0.01
    """DGC: minimum fraction sampled to estimate the threshold."""
    min_compress_numel: int = 1024
    """DGC: smaller tensors, and all 1-D ones, are sent dense."""
    value_dtype: str = "float32"
    """DGC: wire dtype of values: ``float32``, ``float16`` or ``bfloat16``."""
    exchange: str = "auto"
    """DGC: how each bucket's selected entries travel: ``sparse`` (all-gather of (value, index)
    pairs), ``dense`` (scattered into a zero buffer that is allreduced) or ``auto`` (per bucket,
    whichever sends fewer bytes; the all-gather loses past about 1/density ranks, see
    ``docs/costmodel.md``)."""
    weight_decay: str = "momentum"
    """DGC with SGD: where weight decay goes once SGD's momentum is in the hook: ``momentum`` (in
    the hook, with a decay-only momentum buffer: exactly SGD's), ``scaled`` (the optimizer's,
    x 1/(1-m)) or ``optimizer`` (the optimizer's, as given). Never communicated."""
    hierarchical: bool = False
    """DGC: average densely inside each node and compress only across nodes (ranks per node:
    the launcher's local world size; every node must run as many)."""
    powersgd_rank: int = 4
    """PowerSGD: matrix approximation rank."""
    powersgd_start_iter: int = 10
    """PowerSGD: steps of plain allreduce before compression starts."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "hook", self.hook, HOOKS)
        _positive(s, "bucket_cap_mb", self.bucket_cap_mb)
        if not 0.0 < self.density <= 1.0:
            raise UserError(f"comm.density must be in (0, 1], got {self.density!r}")
        _at_least(s, "clip_norm", self.clip_norm, 0.0)
        _choice(s, "mode", self.mode, DGC_MODES)
        _choice(s, "momentum_masking", self.momentum_masking, ("auto", "true", "false"))
        _choice(s, "flush", self.flush, ("auto", "true", "false"))
        _choice(s, "selection", self.selection, ("tensor", "bucket"))
        _choice(s, "density_schedule", self.density_schedule, DENSITY_SCHEDULES)
        if self.density_schedule in ("lr", "budget") and self.mode == "paper":
            raise UserError(
                f"comm.density_schedule = {self.density_schedule!r} needs comm.mode = "
                f"'lr_weighted' (the density follows its learning-rate weights)"
            )
        masking = self.momentum_masking == "true" or (
            self.momentum_masking == "auto" and self.mode == "paper"
        )
        if self.selection == "bucket" and masking:
            raise UserError(
                "comm.momentum_masking (on by default in mode 'paper') needs comm.selection = "
                "'tensor' (masking works per tensor)"
            )
        if self.flush == "true" and self.mode == "paper":
            raise UserError(
                "comm.flush = true needs comm.mode = 'lr_weighted': the paper's residuals carry "
                "no learning rate to apply them at"
            )
        _at_least(s, "start_iter", self.start_iter, 0)
        _at_least(s, "warmup_epochs", self.warmup_epochs, 0.0)
        _at_least(s, "warmup_steps", self.warmup_steps, 0)
        if self.warmup_epochs > 0 and self.warmup_steps > 0:
            raise UserError(
                "comm.warmup_epochs and comm.warmup_steps are both set: give the DGC warm-up "
                "in one of them (e.g. --comm.warmup_epochs=0 --comm.warmup_steps=N)"
            )
        _at_least(s, "warmup_stages", self.warmup_stages, 1)
        if not 0.0 < self.sample_ratio <= 1.0:
            raise UserError(f"comm.sample_ratio must be in (0, 1], got {self.sample_ratio!r}")
        _at_least(s, "min_compress_numel", self.min_compress_numel, 1)
        _choice(s, "value_dtype", self.value_dtype, ("float32", "float16", "bfloat16"))
        _choice(s, "exchange", self.exchange, ("auto", "sparse", "dense"))
        _choice(s, "weight_decay", self.weight_decay, ("momentum", "scaled", "optimizer"))
        _at_least(s, "powersgd_rank", self.powersgd_rank, 1)
        # PyTorch's PowerSGD needs allreduce steps first (DDP rebuilds its buckets after one).
        _at_least(s, "powersgd_start_iter", self.powersgd_start_iter, 2)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and whether to resume."""

    SECTION: ClassVar[str] = "checkpoint"

    every_steps: int = 0
    """Write a checkpoint every this many steps (and always at the end); 0: only at the end."""
    keep: int = 2
    """Complete checkpoints kept in the run directory (older ones are deleted)."""
    resume: str = ""
    """``""`` (start fresh; an existing checkpoint in the run directory is an error), ``auto``
    (continue from the newest complete checkpoint if there is one) or a checkpoint directory."""

    def __post_init__(self) -> None:
        _at_least(self.SECTION, "every_steps", self.every_steps, 0)
        _at_least(self.SECTION, "keep", self.keep, 1)


@dataclass
class LoggingConfig:
    """Metrics and progress output (rank 0 only)."""

    SECTION: ClassVar[str] = "logging"

    every_steps: int = 10
    """Log training metrics every this many steps."""
    wandb: str = "disabled"
    """``disabled``, ``offline`` or ``online``; metrics always go to ``metrics.jsonl``."""
    wandb_project: str = ""
    """wandb project; empty: ``WANDB_PROJECT``, else ``dtrain``."""
    wandb_entity: str = ""
    """wandb entity (user or team); empty: ``WANDB_ENTITY``, else your default entity."""
    wandb_group: str = ""
    """wandb run group (e.g. one per sweep); empty: ``WANDB_RUN_GROUP``, else none."""
    wandb_name: str = ""
    """wandb run name; empty: ``WANDB_NAME``, else the run directory's name."""
    progress: bool = True
    """tqdm progress bar (rank 0, when stderr is a terminal)."""

    def __post_init__(self) -> None:
        _at_least(self.SECTION, "every_steps", self.every_steps, 1)
        _choice(self.SECTION, "wandb", self.wandb, ("disabled", "offline", "online"))


@dataclass
class EngineConfig:
    """What wraps the model and reduces its gradients: PyTorch's DDP or DeepSpeed's engine."""

    SECTION: ClassVar[str] = "engine"

    name: str = "ddp"
    """``ddp`` (DistributedDataParallel with comm.hook) or ``deepspeed`` (its engine: ZeRO;
    comm.hook ``allreduce`` is DeepSpeed's own reduction, ``dgc`` replaces it at ZeRO 0 and 1)."""
    deepspeed_config: str = ""
    """A DeepSpeed JSON config (``configs/deepspeed/zero1.json``); empty: ZeRO stage 0. dtrain
    fills in the batch sizes, gradient accumulation and clipping from [data], [run], [optim]."""

    def __post_init__(self) -> None:
        _choice(self.SECTION, "name", self.name, ("ddp", "deepspeed"))


@dataclass
class JobConfig:
    """A whole job's config: one section per component."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not self.run.name:
            self.run.name = f"{self.model.name}-{self.data.name}-{self.comm.hook}"
        if self.engine.name == "deepspeed":
            if self.comm.hook not in ("allreduce", "dgc"):
                raise UserError(
                    f"engine.name = 'deepspeed' reduces gradients itself: comm.hook = "
                    f"'allreduce' (DeepSpeed's own) or 'dgc', got {self.comm.hook!r}"
                )
            if self.comm.hierarchical:
                raise UserError("comm.hierarchical needs engine.name = 'ddp'")
            if self.run.precision != "fp32":
                raise UserError(
                    f"engine.name = 'deepspeed' runs fp32 in dtrain for now, got run.precision "
                    f"= {self.run.precision!r}: use run.precision = 'fp32' or engine.name = 'ddp'"
                )
        if self.comm.hook == "dgc" and self.comm.flush == "true" and self.optim.name != "sgd":
            raise UserError(
                f"comm.flush = true needs optim.name = 'sgd' (the residuals are applied at SGD's "
                f"learning rate), got {self.optim.name!r}"
            )
        schedule = self.comm.density_schedule
        if self.comm.hook == "dgc" and schedule in ("lr", "budget") and self.optim.name != "sgd":
            raise UserError(
                f"comm.density_schedule = {schedule!r} needs optim.name = 'sgd' (the hook reads "
                f"SGD's learning rates), got {self.optim.name!r}"
            )
        if self.comm.hook == "dgc" and self.optim.clip_grad_norm > 0:
            raise UserError(
                "optim.clip_grad_norm would clip DGC's momentum-corrected output: with "
                "comm.hook = 'dgc' use comm.clip_norm (local clipping before compression)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------------------------- loading

C = typing.TypeVar("C")  # a job config, or any dataclass of section dataclasses (the pipeline)


def _sections(cls: type = JobConfig) -> dict[str, type]:
    # f.type is the section's class: this module has no `from __future__ import annotations`.
    return {f.name: typing.cast(type, f.type) for f in dataclasses.fields(cls)}


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if match:
        return f" (did you mean {match[0]!r}?)"
    sec = name.split(".")[0] + "."
    same = [v for v in valid if v.startswith(sec)] or sorted({v.split(".")[0] for v in valid})
    return f" (valid: {', '.join(same)})"


def _convert(key: str, value: Any, typ: Any) -> Any:
    """``value`` (from TOML or a command-line string) as ``typ``, or UserError."""
    from_cli = isinstance(value, str) and typ is not str
    origin = typing.get_origin(typ)
    try:
        if origin is tuple:
            (item, _) = typing.get_args(typ)
            if from_cli:
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(_convert(key, v, item) for v in value)
        if typ is bool:
            if from_cli:
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise TypeError
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ is int:
            if from_cli:
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if typ is float:
            if from_cli:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            if not math.isfinite(value):
                raise TypeError
            return float(value)
        if typ is str:
            if isinstance(value, bool):  # a TOML boolean for a true/false/auto choice
                return "true" if value else "false"
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    name = typ.__name__ if origin is None else f"list of {typing.get_args(typ)[0].__name__}"
    raise UserError(f"{key} must be {name}, got {value!r}")


def from_dict(
    data: dict[str, Any],
    *,
    source: str = "config",
    cls: type[C] = JobConfig,  # type: ignore[assignment]
) -> C:
    """Build a :class:`JobConfig` (or the job config ``cls``, a subclass with more sections)
    from nested plain values, checking names and types."""
    sections = _sections(cls)
    built = {}
    for sec, values in data.items():
        if sec not in sections:
            raise UserError(f"{source}: unknown section [{sec}]{_closest(sec, list(sections))}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{sec}] must be a table of key = value")
        section = sections[sec]
        hints = typing.get_type_hints(section)
        names = [f.name for f in dataclasses.fields(section)]
        kwargs = {}
        for key, value in values.items():
            if key not in names:
                hint = _closest(f"{sec}.{key}", [f"{sec}.{n}" for n in names])
                raise UserError(f"{source}: unknown key {sec}.{key}{hint}")
            kwargs[key] = _convert(f"{sec}.{key}", value, hints[key])
        built[sec] = section(**kwargs)
    return cls(**built)


def parse_overrides(args: list[str], cls: type = JobConfig) -> dict[str, dict[str, str]]:
    """``["--optim.lr=0.1", "--comm.hook", "dgc"]`` -> ``{"optim": {"lr": "0.1"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    valid = [f"{s}.{f.name}" for s, c in _sections(cls).items() for f in dataclasses.fields(c)]
    it = iter(args)
    for arg in it:
        if not arg.startswith("--") or "." not in arg:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            following = next(it, None)
            if following is None:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            value = following
        if key not in valid:
            raise UserError(f"unknown key {key}{_closest(key, valid)}")
        sec, name = key.split(".", 1)
        out.setdefault(sec, {})[name] = value
    return out


def load_config(
    path: str | None,
    overrides: list[str] | None = None,
    cls: type[C] = JobConfig,  # type: ignore[assignment]
) -> C:
    """The config of a TOML file (or the defaults) with ``--section.key=value`` overrides;
    ``cls``: the job's config class (a :class:`JobConfig` with more sections)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file {path} not found (see configs/ for examples)") from None
        except IsADirectoryError:
            raise UserError(f"config file {path} is a directory; pass a .toml file") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
    for sec, values in parse_overrides(overrides or [], cls).items():
        if not isinstance(data.get(sec, {}), dict):
            raise UserError(f"{source}: [{sec}] must be a table of key = value")
        data.setdefault(sec, {}).update(values)
    return from_dict(data, source=source, cls=cls)


# ---------------------------------------------------------------------------------- writing


def to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """Nested plain values (tuples as lists): TOML-writable and ``weights_only``-loadable."""
    out = {}
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        out[f.name] = {
            g.name: list(v) if isinstance(v := getattr(sec, g.name), tuple) else v
            for g in dataclasses.fields(sec)
        }
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Any) -> str:
    """The resolved config as TOML text; :func:`load_config` reads it back to an equal config."""
    lines = []
    for sec, values in to_dict(cfg).items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
