"""The distillation job: a frozen teacher's outputs train a student with the shared trainer.

:class:`DistillConfig` is the job's ``[distill]`` section; :func:`make_trainer` builds a
:class:`~dtrain.trainer.Trainer` whose model is the student (``[model]``, optionally
``model.init_from`` a pruned run) and whose :class:`DistillExtension` loads the teacher from
``distill.teacher`` on every rank (eval mode, no gradients, never in DDP) and replaces the
training loss by Hinton et al.'s, plus FitNets' hint loss on named feature pairs through learned
adapters. The adapters are a submodule of the student (``distill_adapters``), so DDP reduces their
gradients and every checkpoint keeps them; a later job restoring the student leaves them out.
With ``distill.cache`` the teacher runs once over the (unaugmented) training set at the first
step (:mod:`dtrain.distillation.cache`: a shard per rank, saved with its key, gathered into one
table) and every step reads its rows of the table instead.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dtrain.checkpoint import TRAINING_ONLY, load_shared, restore_model
from dtrain.config import JobConfig, ModelConfig
from dtrain.data import DataInfo
from dtrain.distillation import FeatureTaps, feature_loss, make_adapter, soft_loss
from dtrain.distillation.cache import build_table, cache_key, check_shard, shard_file
from dtrain.distributed import DistInfo
from dtrain.errors import UserError
from dtrain.models import build_model
from dtrain.trainer import Extension, Trainer, initial_model

__all__ = ["DistillConfig", "DistillExtension", "DistillJobConfig", "make_trainer"]

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The teacher and the distillation loss (``dtrain.distill``)."""

    SECTION: ClassVar[str] = "distill"

    teacher: str = ""
    """The teacher: a ``dtrain.train`` or ``dtrain.prune`` run directory (its newest complete
    checkpoint) or checkpoint directory; its model is rebuilt from the config saved there."""
    temperature: float = 4.0
    """T > 0: the soft targets are softmax(teacher logits / T)."""
    alpha: float = 0.9
    """Weight of the soft term in [0, 1]: ``(1 − α)·CE + α·T²·KL`` (0: the student alone)."""
    features: tuple[str, ...] = ()
    """Feature pairs ``"student_layer:teacher_layer"`` (module names, e.g. ``conv2:conv2``)
    matched with the mean squared error through a learned adapter where shapes differ."""
    feature_weight: float = 1.0
    """Weight of each feature pair's hint loss."""
    cache: bool = False
    """Compute the teacher's logits for the whole training set once (each rank a shard, saved,
    then gathered on every rank) and read them back in every step: no teacher forward after
    that. Fixed inputs only (no augmentation) and logit KD only (feature hints need the
    teacher's forward). Memory: samples x outputs x 4 bytes on every rank's device."""
    cache_dir: str = ""
    """Where the cache's shards are kept; default ``teacher_cache/`` in the run directory,
    rebuilt when the teacher or the data changed. A directory given here can be shared by
    several students of one teacher; a stale one is an error (delete it to rebuild)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if not self.feature_weight >= 0:
            raise UserError(f"distill.feature_weight must be >= 0, got {self.feature_weight!r}")
        for pair in self.features:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise UserError(f"distill.features: {pair!r} is not 'student_layer:teacher_layer'")
        if self.cache and self.features:
            raise UserError(
                "distill.cache keeps the teacher's logits only, and distill.features needs its "
                "intermediate features every step: drop one of them"
            )
        if self.cache_dir and not self.cache:
            raise UserError("distill.cache_dir is set but distill.cache is false: set both")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(p.split(":")[0], p.split(":")[1]) for p in self.features]


@dataclass
class DistillJobConfig(JobConfig):
    """A training job's sections (the student's) plus ``[distill]``."""

    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if not self.distill.teacher:
            raise UserError(
                "distill.teacher is required: --distill.teacher=RUN_DIR (a dtrain.train or "
                "dtrain.prune run directory or one of its checkpoint directories)"
            )
        if self.distill.cache and self.data.name == "cifar10" and self.data.augment:
            raise UserError(
                "distill.cache needs fixed training inputs, and data.augment = true crops and "
                "flips them every epoch: set data.augment=false, or distill.cache=false"
            )
        if not self.run.name:
            self.run.name = f"{self.model.name}-{self.data.name}-distill"
        super().__post_init__()


def _example(info: DataInfo) -> Tensor:
    shape = info.in_shape
    if len(shape) == 1:  # token ids
        return torch.zeros(2, *shape, dtype=torch.long)
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


class DistillExtension(Extension):
    """The teacher and the distillation loss of one job (see the module docstring)."""

    name = "distill"

    def __init__(self, cfg: DistillJobConfig) -> None:
        self.cfg = cfg
        self.d = cfg.distill
        self.teacher: nn.Module | None = None
        self.teacher_path = self.teacher_name = ""
        self.teacher_vocab: str | None = None
        self.student_taps: FeatureTaps | None = None
        self.teacher_taps: FeatureTaps | None = None
        self.cache_key: dict[str, Any] = {}
        self.cache_reuse = False
        self.table: Tensor | None = None  # the cached teacher outputs, one row per sample
        self.sums: Tensor | None = None  # the loss terms since the last log line (metrics)

    # ---------------------------------------------------------------- input (every rank)
    def model_source(self, cfg: JobConfig, info: DataInfo) -> nn.Module:
        """The student (as ``dtrain.train`` builds it), with the adapters of the feature pairs;
        loads the teacher."""
        student = initial_model(cfg, info)
        self.teacher = teacher = self._load_teacher(info)
        x = _example(info)
        with torch.no_grad():
            t_out, s_out = teacher(x), student.eval()(x)
        student.train()
        if t_out.shape != s_out.shape:
            raise UserError(
                f"the teacher's outputs ({list(t_out.shape)[1:]}) and the student's "
                f"({list(s_out.shape)[1:]}) differ: distill between models of the same classes "
                f"or vocabulary"
            )
        if self.d.pairs:
            student.add_module(TRAINING_ONLY, self._adapters(student, teacher, x))
        return student

    def _load_teacher(self, info: DataInfo) -> nn.Module:
        try:
            ckpt, shared = load_shared(self.d.teacher)
        except UserError as e:
            raise UserError(f"distill.teacher: {e}") from None
        classes = shared.get("num_classes", info.num_classes)
        if classes != info.num_classes:
            kind = "characters" if info.kind == "lm" else "classes"
            raise UserError(
                f"distill.teacher {ckpt} predicts {classes} {kind}, the student's data has "
                f"{info.num_classes}: distill between models of the same classes or vocabulary"
            )
        saved = dict(shared.get("config", {}).get("model", {}))
        saved.pop("init_from", None)
        known = {f for f in ModelConfig.__dataclass_fields__}
        mcfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
        with torch.random.fork_rng():  # the student's initialisation stays the seed's
            model = build_model(mcfg, info)
        teacher = restore_model(
            model, shared, what=f"distill.teacher {ckpt}", example_shape=info.in_shape
        )
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_path = str(ckpt)
        self.teacher_name = mcfg.name
        self.teacher_vocab = shared.get("vocab")
        return teacher

    def _adapters(self, student: nn.Module, teacher: nn.Module, x: Tensor) -> nn.ModuleDict:
        s_names, t_names = [s for s, _ in self.d.pairs], [t for _, t in self.d.pairs]
        try:
            s_taps = FeatureTaps(student, s_names)
        except KeyError as e:
            raise UserError(f"distill.features: the student has {e.args[0]}") from None
        try:
            t_taps = FeatureTaps(teacher, t_names)
        except KeyError as e:
            s_taps.close()
            raise UserError(f"distill.features: the teacher has {e.args[0]}") from None
        try:
            with torch.no_grad():
                student.eval()(x)
                teacher(x)
            adapters = nn.ModuleDict()
            for s, t in self.d.pairs:
                s_shape, t_shape = s_taps.outputs[s].shape, t_taps.outputs[t].shape
                try:
                    adapters[s.replace(".", "_")] = make_adapter(tuple(s_shape), tuple(t_shape))
                except ValueError as e:
                    raise UserError(f"distill.features {s}:{t}: {e}") from None
        finally:
            student.train()
            s_taps.close()
            t_taps.close()
        return adapters

    def check(self, trainer: Trainer, model: nn.Module) -> None:
        """The teacher's vocabulary against the student's data; the cache's inputs and shard."""
        vocab = trainer.data.vocab
        if self.teacher_vocab and vocab and self.teacher_vocab != vocab:
            extra = sorted(set(vocab) - set(self.teacher_vocab))[:5]
            raise UserError(
                f"distill.teacher {self.teacher_path} was trained on another vocabulary "
                f"({len(self.teacher_vocab)} characters, this data has {len(vocab)}"
                f"{', e.g. new: ' + repr(''.join(extra)) if extra else ''}): distill on the "
                f"text the teacher was trained on"
            )
        if self.d.cache:
            self._check_cache(trainer)

    def cache_dir(self, trainer: Trainer) -> Path:
        return Path(self.d.cache_dir) if self.d.cache_dir else trainer.run_dir / "teacher_cache"

    def _check_cache(self, trainer: Trainer) -> None:
        if trainer.data.augment is not None:
            raise UserError(
                "distill.cache needs fixed training inputs, and this data is augmented every "
                "epoch: set data.augment=false, or distill.cache=false"
            )
        assert self.teacher is not None
        info = trainer.info
        self.cache_key = cache_key(
            teacher=self.teacher.state_dict(), x=trainer.data.x_train,
            precision=trainer.cfg.run.precision, rank=info.rank, world_size=info.world_size,
        )  # fmt: skip
        path = shard_file(self.cache_dir(trainer), info.rank, info.world_size)
        why = check_shard(path, self.cache_key)
        if why is not None and why != "missing" and self.d.cache_dir:
            raise UserError(
                f"distill.cache_dir: {path} is stale ({why}): delete {self.d.cache_dir} to "
                f"rebuild it, or choose another distill.cache_dir"
            )
        if why not in (None, "missing"):
            logger.info("teacher cache %s is stale (%s): rebuilding it", path, why)
        self.cache_reuse = why is None

    def _build_cache(self, trainer: Trainer) -> Tensor:
        assert self.teacher is not None
        teacher, info = self.teacher, trainer.info
        x = trainer.data.x_train

        def forward(xb: Tensor) -> Tensor:
            with torch.no_grad(), trainer._autocast():
                return teacher(xb)

        def progress(r: Any) -> Any:
            if not (info.is_main and trainer.cfg.logging.progress and sys.stderr.isatty()):
                return r
            from tqdm import tqdm

            return tqdm(r, desc="teacher cache", unit="batch", leave=False)

        start = time.perf_counter()
        table = build_table(
            forward, x, key=self.cache_key, directory=self.cache_dir(trainer),
            rank=info.rank, world_size=info.world_size,
            batch_size=trainer.cfg.data.eval_batch_size, device=info.device,
            reuse=self.cache_reuse, progress=progress,
        )  # fmt: skip
        if info.is_main:
            logger.info(
                "teacher cache: %s outputs of %s, %.1f MB per rank, %s in %.1f s (%s)",
                f"{len(table):,}", list(table.shape[1:]), table.numel() * 4 / 1e6,
                "read back" if self.cache_reuse else "computed", time.perf_counter() - start,
                self.cache_dir(trainer),
            )  # fmt: skip
        return table

    # ---------------------------------------------------------------- training (every rank)
    def on_start(self, trainer: Trainer) -> None:
        assert self.teacher is not None
        self.teacher.to(trainer.info.device)
        if trainer.info.is_main:
            logger.info(
                "teacher %s (%s parameters, frozen, not in DDP) from %s", self.teacher_name,
                f"{sum(p.numel() for p in self.teacher.parameters()):,}", self.teacher_path,
            )  # fmt: skip
        if self.d.pairs:
            self.student_taps = FeatureTaps(trainer.model, [s for s, _ in self.d.pairs])
            self.teacher_taps = FeatureTaps(self.teacher, [t for _, t in self.d.pairs])

    def loss(self, trainer: Trainer, x: Tensor, out: Tensor, y: Tensor, loss: Tensor) -> Tensor:
        assert self.teacher is not None
        d = self.d
        if d.alpha == 0 and not d.pairs:  # nothing needs the teacher: the student alone
            return loss
        if d.cache:
            if self.table is None:  # built at the first step: the run directory exists now
                self.table = self._build_cache(trainer)
            assert trainer.batch_indices is not None
            t_out = self.table[trainer.batch_indices.to(self.table.device, non_blocking=True)]
        else:
            with torch.no_grad(), trainer._autocast():
                t_out = self.teacher(x)
        total = (1.0 - d.alpha) * loss
        if self.sums is None:  # kd loss, feature loss, micro-batches since the last log line
            self.sums = torch.zeros(3, dtype=torch.float64, device=loss.device)
        if d.alpha > 0:
            kd = soft_loss(out, t_out, temperature=d.temperature)
            total = total + d.alpha * kd
            self.sums[0] += kd.detach().double()
        if d.pairs and d.feature_weight > 0:
            assert self.student_taps is not None and self.teacher_taps is not None
            adapters = getattr(trainer.model, TRAINING_ONLY)
            pairs = [(s, t, d.feature_weight) for s, t in d.pairs]
            by_name = {s: adapters[s.replace(".", "_")] for s, _ in d.pairs}
            feat = feature_loss(
                self.student_taps.outputs, self.teacher_taps.outputs, pairs, by_name
            )
            total = total + feat
            self.sums[1] += feat.detach().double()
        self.sums[2] += 1
        return total

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """The mean distillation terms since the last log line, over the ranks: ``kd_loss``
        (the soft-target loss, before ``alpha``) and ``feature_loss`` (weighted)."""
        if self.sums is None:  # the teacher is not used (alpha 0, no pairs): on every rank
            return {}
        kd, feat, n = trainer.all_mean(self.sums.tolist())
        self.sums.zero_()
        out = {}
        if self.d.alpha > 0:
            out["kd_loss"] = kd / max(n, 1.0)
        if self.d.pairs and self.d.feature_weight > 0:
            out["feature_loss"] = feat / max(n, 1.0)
        return out

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher_path, "distill": dict(vars(self.d))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["teacher"] != self.teacher_path:
            raise UserError(
                f"the checkpoint was distilled from {state['teacher']}, this job's teacher is "
                f"{self.teacher_path}: resume with the same distill.teacher"
            )


def make_trainer(cfg: DistillJobConfig, info: DistInfo, *, check_only: bool = False) -> Trainer:
    """The shared trainer with the distillation job's student and extension."""
    ext = DistillExtension(cfg)
    return Trainer(
        cfg, info, check_only=check_only, model_source=ext.model_source, extensions=[ext]
    )
