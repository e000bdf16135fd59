"""The pruning job: start from a trained run, prune, fine-tune with the shared trainer, report.

:class:`PruneConfig` is the job's ``[prune]`` section; :func:`make_trainer` builds a
:class:`~dtrain.trainer.Trainer` whose model comes from ``prune.source`` and whose
:class:`PruneExtension` keeps the masks: it prunes on the schedule of ``prune.method``, proves
every rank chose the same masks before any weight changes, zeroes the pruned weights (and the
optimizer's state for them) after every step and hands the masks to the DGC hook, which then
never sends a pruned coordinate. :func:`write_report` measures the result.
"""

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dtrain.checkpoint import atomic_write_text, load_shared, restore_model
from dtrain.config import JobConfig, _at_least, _choice, to_dict
from dtrain.data import DataInfo
from dtrain.distributed import DistInfo
from dtrain.errors import UserError
from dtrain.models import build_model
from dtrain.models.vision import ResNet
from dtrain.pruning import (
    PRUNABLE,
    Disagreement,
    MaskSet,
    cubic_sparsity,
    magnitude_masks,
    prunable_weights,
    round_sparsity,
    structured,
    verify_identical,
)
from dtrain.pruning.apoz import relu_feeders
from dtrain.pruning.measure import latency_ms, macs, nonzero_parameters
from dtrain.pruning.structured import CHANNEL_IMPORTANCES, GROUPS, widths
from dtrain.trainer import Extension, Trainer

__all__ = [
    "METHODS",
    "PruneConfig",
    "PruneExtension",
    "PruneJobConfig",
    "make_trainer",
    "write_report",
]

logger = logging.getLogger(__name__)

METHODS = ("oneshot", "gradual", "iterative", "lottery")
REWINDS = ("auto", "none", "init", "step", "random")
REPORT = "prune_report.json"
PLOT = "accuracy_vs_sparsity.png"


@dataclass
class PruneConfig:
    """What to prune, how and on which schedule (``dtrain.prune``)."""

    SECTION: ClassVar[str] = "prune"

    source: str = ""
    """The trained model: a ``dtrain.train`` (or ``dtrain.prune``) run directory (its newest
    complete checkpoint) or a checkpoint directory ``run_dir/checkpoints/step_XXXXXXXX``."""
    method: str = "oneshot"
    """``oneshot`` (prune once to ``sparsity`` before the first step, then fine-tune),
    ``gradual`` (Zhu & Gupta's cubic schedule from ``initial_sparsity`` at ``start_step`` to
    ``sparsity`` at ``end_step``, every ``frequency`` steps), ``iterative`` (``rounds`` equal
    prune → fine-tune rounds, each pruning the same fraction of what remains) or ``lottery``
    (iterative, and every round starts again from the ``rewind`` weights: Frankle & Carbin's
    lottery ticket; set ``optim.cycles = rounds`` so that each round gets the whole schedule)."""
    scope: str = "global"
    """``layer`` (each layer loses ``sparsity`` of its weights) or ``global`` (the smallest
    weights of all pruned layers together)."""
    sparsity: float = 0.9
    """Final fraction of the pruned layers' weights that are zero, in [0, 1)."""
    modules: tuple[str, ...] = ("conv", "linear")
    """Module types whose weights are pruned: ``conv``, ``linear``, ``embedding``."""
    ignore: tuple[str, ...] = ()
    """Layers (module names, e.g. ``fc2``) left dense."""
    initial_sparsity: float = 0.0
    """``gradual``: sparsity at ``start_step``."""
    start_step: int = 0
    """``gradual``: the first step that prunes."""
    end_step: int = 0
    """``gradual``: the step from which ``sparsity`` holds; 0: half of the run."""
    frequency: int = 10
    """``gradual``: steps between mask updates."""
    rounds: int = 3
    """``iterative``, ``lottery``: prune → fine-tune rounds (equal shares of the run)."""
    rewind: str = "auto"
    """Weights each round restarts from once pruned: ``none`` (the pruned weights fine-tuned),
    ``init`` (the source run's initial weights, rebuilt from its seed, or kept by a prune run),
    ``step`` (the source run's checkpoint at ``rewind_step``: late rewinding) or ``random``
    (freshly initialised weights, another seed: the lottery ticket's control); ``auto``:
    ``init`` for ``lottery``, else ``none``. The weights are kept in the checkpoint."""
    rewind_step: int = 0
    """``rewind = "step"``: the step of the source run's checkpoint to rewind to."""
    granularity: str = "weights"
    """``weights`` (unstructured: masks, the architecture stays) or ``channels`` (structured:
    whole channels are removed, Torch-Pruning's dependency graph couples the layers that share
    them; the result is a smaller dense model; ``method = "oneshot"`` or ``"iterative"``: every
    round removes the same fraction of the channels left, and the optimizer's and DGC's momentum
    and residuals of what remains carry over)."""
    groups: str = "all"
    """``channels``: which channel groups lose channels: ``all``, ``stages`` (only the channels
    a residual add shares: each ResNet stage keeps one, smaller width, the stage-level pruning
    of residual networks) or ``blocks`` (only the others: the channels inside each block)."""
    importance: str = "auto"
    """What ranks the candidates: ``magnitude`` (weights); for channels ``l1`` or ``l2`` (filter
    norms), ``taylor`` (first-order, |w · dL/dw| from ``taylor_batches`` batches per rank,
    all-reduced) or ``bn_scale`` (|γ|: Network Slimming, after training with
    ``optim.bn_l1``) or ``apoz`` (the average percentage of zeros after each ReLU, counted over
    the held-out set on all ranks and summed: the highest go first); ``auto``: ``magnitude``
    for weights, ``l1`` for channels."""
    round_to: int = 1
    """``channels``: keep a multiple of this many channels per group (rounded down)."""
    taylor_batches: int = 4
    """``importance = "taylor"``: training batches per rank whose gradients score channels."""
    sweep: tuple[float, ...] = ()
    """Sparsities (channels: fractions of channels) at which the source model's one-shot
    accuracy, without fine-tuning, is measured for the report and its plot (``sparsity`` is
    always measured); empty: 0.5, 0.7, 0.8, 0.9, 0.95, 0.98 for weights, 0.1 to 0.6 for
    channels."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _choice(s, "method", self.method, METHODS)
        _choice(s, "scope", self.scope, ("layer", "global"))
        for name in ("sparsity", "initial_sparsity"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise UserError(f"prune.{name} must be in [0, 1), got {v!r}")
        if self.initial_sparsity > self.sparsity:
            raise UserError(
                f"prune.initial_sparsity = {self.initial_sparsity} is above prune.sparsity = "
                f"{self.sparsity}: the gradual schedule only adds zeros"
            )
        if not self.modules:
            raise UserError(f"prune.modules is empty: name some of {', '.join(PRUNABLE)}")
        for m in self.modules:
            _choice(s, "modules", m, tuple(PRUNABLE))
        if not all(0.0 <= v < 1.0 for v in self.sweep):
            raise UserError(f"prune.sweep must hold sparsities in [0, 1), got {self.sweep}")
        _at_least(s, "start_step", self.start_step, 0)
        _at_least(s, "end_step", self.end_step, 0)
        _at_least(s, "frequency", self.frequency, 1)
        _at_least(s, "rounds", self.rounds, 1)
        _choice(s, "granularity", self.granularity, ("weights", "channels"))
        _at_least(s, "round_to", self.round_to, 1)
        _at_least(s, "taylor_batches", self.taylor_batches, 1)
        _choice(s, "groups", self.groups, GROUPS)
        if self.granularity == "channels":
            _choice(s, "importance", self.importance, ("auto", *CHANNEL_IMPORTANCES))
            if self.method not in ("oneshot", "iterative"):
                raise UserError(
                    f"prune.granularity = 'channels' prunes once or in rounds: set prune.method "
                    f"= 'oneshot' or 'iterative' (got {self.method!r})"
                )
            if self.rewind not in ("auto", "none"):
                raise UserError(
                    "prune.rewind needs prune.granularity = 'weights' (rewound weights have the "
                    "unpruned architecture)"
                )
        else:
            _choice(s, "importance", self.importance, ("auto", "magnitude"))
        _choice(s, "rewind", self.rewind, REWINDS)
        _at_least(s, "rewind_step", self.rewind_step, 0)
        if self.method == "lottery" and self.rewind == "none":
            raise UserError("prune.method = 'lottery' rewinds: set prune.rewind to init or step")
        if self.method == "gradual" and self.rewind_mode != "none":
            raise UserError("prune.rewind needs rounds: use prune.method = lottery or iterative")
        if (self.rewind == "step") != (self.rewind_step > 0):
            raise UserError(
                "prune.rewind = 'step' and prune.rewind_step > 0 go together (late rewinding "
                "to the source run's checkpoint at that step)"
            )

    @property
    def criterion(self) -> str:
        """``importance`` with ``auto`` resolved."""
        if self.importance != "auto":
            return self.importance
        return "l1" if self.granularity == "channels" else "magnitude"

    @property
    def sweep_points(self) -> list[float]:
        """The sparsities of the one-shot sweep, ``sparsity`` included."""
        default = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6) if self.granularity == "channels" else (
            0.5, 0.7, 0.8, 0.9, 0.95, 0.98
        )  # fmt: skip
        return sorted({*(self.sweep or default), self.sparsity})

    @property
    def rewind_mode(self) -> str:
        """``rewind`` with ``auto`` resolved."""
        if self.rewind != "auto":
            return self.rewind
        return "init" if self.method == "lottery" else "none"


@dataclass
class PruneJobConfig(JobConfig):
    """A training job's sections plus ``[prune]``; the rest configures the fine-tuning."""

    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self) -> None:
        if not self.prune.source:
            raise UserError(
                "prune.source is required: --prune.source=RUN_DIR (a dtrain.train run "
                "directory or one of its checkpoint directories)"
            )
        if not self.run.name:
            self.run.name = f"{self.model.name}-{self.data.name}-prune-{self.prune.method}"
        super().__post_init__()


# ------------------------------------------------------------------------------ the source


def _model_mismatch(saved: dict[str, Any], cfg: JobConfig) -> str | None:
    mine = to_dict(cfg)["model"]
    for key, value in mine.items():
        if key != "init_from" and key in saved and saved[key] != value:
            return f"model.{key} = {saved[key]!r} (this job: {value!r})"
    return None


class PruneExtension(Extension):
    """Keeps the masks of one pruning job (see the module docstring); its state is the masks,
    the schedule's position and the accuracies measured before fine-tuning."""

    name = "prune"

    def __init__(self, cfg: PruneJobConfig) -> None:
        self.cfg = cfg
        self.p = cfg.prune
        self.source_path = ""
        self.source_masks: dict[str, Tensor] = {}
        self.masks: MaskSet | None = None
        self.target = 0.0  # the sparsity the masks were made for
        self.end_step = 0
        self.total_steps = 0
        self.before: dict[str, float] = {}  # the source model, evaluated
        self.sweep: list[dict[str, float]] = []  # sparsity, one-shot metric (, macs)
        self.history: list[Any] = []  # channels: Torch-Pruning's pruning history
        self.example_shape: list[int] = []
        self.dense: dict[str, Any] = {}  # channels: the unpruned model's size
        self.rewind_to: dict[str, Tensor] = {}  # the weights every round restarts from
        self.rounds: list[dict[str, float]] = []  # each round's end: sparsity, metric

    # ---------------------------------------------------------------- input (every rank)
    def model_source(self, cfg: JobConfig, info: DataInfo) -> nn.Module:
        """The source run's model with its trained weights (and masks, from a prune run)."""
        ckpt, shared = load_shared(self.p.source)
        saved = shared.get("config", {})
        if "model" in saved and (why := _model_mismatch(saved["model"], cfg)):
            raise UserError(
                f"prune.source {ckpt} was trained with {why}: set the [model] section to the "
                f"source's"
            )
        self.example_shape = list(info.in_shape)
        model = restore_model(
            build_model(cfg.model, info), shared, what=f"prune.source {ckpt}",
            example_shape=info.in_shape,
        )  # fmt: skip
        pruned = shared.get("extensions", {}).get("prune", {})
        self.history = list(pruned.get("history", []))  # a channel-pruned source's
        self.source_path = str(ckpt)
        self.source_masks = dict(pruned.get("masks", {}))
        self.rewind_to = self._rewind_weights(ckpt, shared, pruned, cfg, info)
        return model

    def _rewind_weights(
        self, ckpt: Path, shared: dict, pruned: dict, cfg: JobConfig, info: DataInfo
    ) -> dict[str, Tensor]:
        """The weights of ``prune.rewind``: ``{}`` for none."""
        how = self.p.rewind_mode
        if how == "none":
            return {}
        if how == "init" and pruned.get("rewind"):  # a prune run's source: its rewind point
            return dict(pruned["rewind"])
        if how == "step":
            run = ckpt.parent.parent
            at = run / "checkpoints" / f"step_{self.p.rewind_step:08d}"
            if not at.is_dir():
                raise UserError(
                    f"prune.rewind_step = {self.p.rewind_step}: {run} has no complete checkpoint "
                    f"at that step; train the source with --checkpoint.every_steps="
                    f"{self.p.rewind_step} and a large enough --checkpoint.keep"
                )
            return dict(load_shared(at)[1]["model"])
        seed = int(shared.get("config", {}).get("run", {}).get("seed", 0))
        with torch.random.fork_rng():  # as dtrain.train built it: the seed, then the model
            torch.manual_seed(seed if how == "init" else seed + 1_000_003)
            return build_model(cfg.model, info).state_dict()

    def _weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        try:
            return prunable_weights(model, types=self.p.modules, ignore=self.p.ignore)
        except KeyError as e:
            raise UserError(f"prune.ignore: {e.args[0]} in {self.cfg.model.name}") from None

    def check(self, trainer: Trainer, model: nn.Module) -> None:
        """Refuse what cannot be pruned, before anything is written."""
        p = self.p
        if p.granularity == "channels":
            self._check_channels(trainer, model)
            return
        weights = self._weights(model)
        if not weights:
            raise UserError(
                f"{self.cfg.model.name} has no {'/'.join(p.modules)} layer left to prune "
                f"(prune.modules, prune.ignore)"
            )
        self.total_steps = total = trainer.total_steps
        self.end_step = p.end_step or max(p.start_step + 1, total // 2)
        if p.method == "gradual" and not p.start_step < self.end_step <= total:
            raise UserError(
                f"prune.start_step = {p.start_step} and prune.end_step = {self.end_step} must "
                f"satisfy start < end <= the run's {total} steps"
            )
        if p.method in ("iterative", "lottery") and p.rounds > total:
            raise UserError(f"prune.rounds = {p.rounds} is more than the run's {total} steps")
        for name, keep in magnitude_masks(weights, p.sparsity, scope=p.scope).items():
            if not keep.any():
                raise UserError(
                    f"prune.sparsity = {p.sparsity} ({p.scope}) would remove every weight of "
                    f"{name.removesuffix('.weight')}: lower it, use prune.scope = 'layer', or "
                    f"add the layer to prune.ignore"
                )
        unknown = set(self.source_masks) - set(weights)
        if unknown:
            raise UserError(
                f"prune.source holds masks for {sorted(unknown)[0]}, which this job does not "
                f"prune: keep prune.modules and prune.ignore as in the source run"
            )

    def _check_channels(self, trainer: Trainer, model: nn.Module) -> None:
        p = self.p
        try:
            structured._tp()
        except ImportError as e:
            raise UserError(f"prune.granularity = 'channels': {e}") from None
        names = dict(model.named_modules())
        for n in p.ignore:
            if n not in names:
                raise UserError(f"prune.ignore: no layer named {n!r} in {self.cfg.model.name}")
        if p.criterion == "bn_scale" and not trainer.bn_scales:
            raise UserError(
                f"prune.importance = 'bn_scale' (Network Slimming) needs batch norm layers, "
                f"and {self.cfg.model.name} has none: use l1, l2 or taylor"
            )
        if p.criterion == "apoz":
            try:
                feeders = relu_feeders(model)
            except Exception as e:  # torch.fx cannot trace it
                raise UserError(
                    f"prune.importance = 'apoz' traces {self.cfg.model.name} with torch.fx, "
                    f"which failed ({type(e).__name__}): use l1, l2 or taylor"
                ) from None
            if not feeders:
                raise UserError(
                    f"prune.importance = 'apoz' needs ReLUs after convolutions or linear "
                    f"layers, and {self.cfg.model.name} has none: use l1, l2 or taylor"
                )
        if self.source_masks:
            raise UserError(
                "prune.source was pruned with masks (prune.granularity = 'weights'): channel "
                "pruning starts from its dense source; give that one"
            )
        self.total_steps = total = trainer.total_steps
        if p.method == "iterative" and p.rounds > total:
            raise UserError(f"prune.rounds = {p.rounds} is more than the run's {total} steps")

    # ---------------------------------------------------------------- schedule
    def target_at(self, step: int) -> float:
        """The sparsity the masks must have before step ``step`` (0-based) runs."""
        p = self.p
        if p.method == "oneshot":
            return p.sparsity
        if p.method == "gradual":
            return cubic_sparsity(
                step, initial=p.initial_sparsity, final=p.sparsity, start=p.start_step,
                end=self.end_step, frequency=p.frequency,
            )  # fmt: skip
        return round_sparsity(self.round_of(step), rounds=p.rounds, final=p.sparsity)

    def round_of(self, step: int) -> int:
        """The prune → fine-tune round that step ``step`` belongs to (0 without rounds)."""
        if self.p.method not in ("iterative", "lottery"):
            return 0
        length = self.total_steps / self.p.rounds
        return min(int(step / length), self.p.rounds - 1)

    # ---------------------------------------------------------------- training (every rank)
    def on_start(self, trainer: Trainer) -> None:
        if self.p.granularity == "channels":
            self._start_channels(trainer)
            return
        weights = self._weights(trainer.model)
        if self.masks is not None:  # resumed: the checkpoint's masks
            self._install(trainer, self.masks.keep)
            return
        keep = {n: m.to(weights[n].device) for n, m in self.source_masks.items()}
        self.before = trainer.evaluate()
        metric = _metric_key(self.before)
        for s in self.p.sweep_points:
            masks = magnitude_masks(weights, s, scope=self.p.scope, keep=keep)
            got = _evaluate_masked(trainer, weights, masks)[metric]
            self.sweep.append({"sparsity": s, metric: got})
        self._prune(trainer, weights, self.target_at(0), keep)
        self._rewind(trainer)

    def _start_channels(self, trainer: Trainer) -> None:
        """Channels: measure the source, then remove them before the first step (all at once,
        or the first round's share); resumed: already removed."""
        if self.masks is not None:
            return
        channels = _channels()
        p = self.p
        example = channels.example_input(self.example_shape, trainer.info.device)
        one = example[:1]
        self.dense = {
            "parameters": sum(x.numel() for x in trainer.model.parameters()),
            "macs": macs(trainer.model, one),
            "widths": widths(trainer.model),
        }
        self.before = trainer.evaluate()
        metric = _metric_key(self.before)
        model = trainer.model
        for s in p.sweep_points:  # one-shot, on copies, for the report's curve
            trainer.model = copy.deepcopy(model)
            try:
                channels.prune_channels(trainer, ratio=s, rebuild=False, **self._channel_args())
                self.sweep.append(
                    {"sparsity": s, metric: trainer.evaluate()[metric],
                     "macs": macs(trainer.model, one)}
                )  # fmt: skip
            finally:
                trainer.model = model
        self._remove_channels(trainer, self.target_at(0))
        self.masks = MaskSet({}, {})

    def _channel_args(self) -> dict[str, Any]:
        p = self.p
        return {
            "importance": p.criterion, "global_pruning": p.scope == "global", "groups": p.groups,
            "round_to": p.round_to, "ignore": p.ignore, "taylor_batches": p.taylor_batches,
        }  # fmt: skip

    def _remove_channels(self, trainer: Trainer, target: float) -> None:
        """Remove channels on every rank: all of ``prune.sparsity`` at once, or one round's
        share (the same fraction of the channels left each round), after the source's own
        removals (a channel-pruned source: they are replayed first on reload)."""
        p = self.p
        ratio = p.sparsity if p.method == "oneshot" else 1.0 - (1.0 - p.sparsity) ** (1 / p.rounds)
        channels = _channels()
        self.history = self.history + channels.prune_channels(
            trainer, ratio=ratio, **self._channel_args()
        )
        setattr(trainer.model, "pruning_history", list(self.history))  # noqa: B010
        self.target = target

    def _sparsity(self, trainer: Trainer) -> float:
        """Weights: the masks' sparsity; channels: the fraction of the parameters removed."""
        if self.p.granularity == "channels":
            return (
                1.0 - sum(x.numel() for x in trainer.model.parameters()) / self.dense["parameters"]
            )
        assert self.masks is not None
        return self.masks.sparsity()

    def after_step(self, trainer: Trainer) -> None:
        assert self.masks is not None  # made in on_start
        self.masks.apply_(trainer.optimizer)
        step = trainer.step
        if step < trainer.total_steps and self.round_of(step) != self.round_of(step - 1):
            self.rounds.append(self._round_end(trainer))
        if step < trainer.total_steps:
            target = self.target_at(step)
            if target > self.target and self.p.granularity == "channels":
                self._remove_channels(trainer, target)
            elif target > self.target:
                self._prune(trainer, self._weights(trainer.model), target, self.masks.keep)
                self._rewind(trainer)

    def _round_end(self, trainer: Trainer) -> dict[str, float]:
        metric = trainer.evaluate()
        key = _metric_key(metric)
        return {"step": trainer.step, "sparsity": self._sparsity(trainer), key: metric[key]}

    def _rewind(self, trainer: Trainer) -> None:
        """Restart from the rewind weights under the current masks: the optimizer's and the
        hook's momentum and residuals are zeroed (they belong to the weights that are gone)."""
        if not self.rewind_to:
            return
        trainer.model.load_state_dict(self.rewind_to)
        trainer.optimizer.state.clear()
        reset = getattr(trainer.hook_state, "reset", None)
        if reset is not None:
            reset()
        assert self.masks is not None
        self.masks.apply_(trainer.optimizer)
        if trainer.info.is_main:
            logger.info("rewound to the %s weights at step %d", self.p.rewind_mode, trainer.step)

    def _prune(
        self, trainer: Trainer, weights: dict[str, nn.Parameter], target: float, keep: dict
    ) -> None:
        masks = magnitude_masks(weights, target, scope=self.p.scope, keep=keep or None)
        self._install(trainer, masks)
        self.target = target
        if trainer.info.is_main:
            logger.info(
                "pruned to %.4f sparsity (%s, %s) at step %d",
                self.masks.sparsity() if self.masks else 0.0,
                self.p.method,
                self.p.scope,
                trainer.step,
            )

    def _install(self, trainer: Trainer, masks: dict[str, Tensor]) -> None:
        """Verify every rank holds ``masks``, then apply them to the weights, the optimizer
        state and the hook."""
        try:
            verify_identical(masks, what="mask", device=trainer.info.device)
        except Disagreement as e:
            raise UserError(str(e)) from None
        self.masks = MaskSet(self._weights(trainer.model), masks)
        self.masks.apply_(trainer.optimizer)
        set_masks = getattr(trainer.hook_state, "set_masks", None)
        if set_masks is not None:  # DGC: pruned coordinates are never sent
            set_masks(self.masks.by_param())

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict() if self.masks else {},
            "target": self.target,
            "before": dict(self.before),
            "sweep": [dict(x) for x in self.sweep],
            "source": self.source_path,
            "prune": to_dict(self.cfg)["prune"],
            "rewind": dict(self.rewind_to),
            "rounds": [dict(r) for r in self.rounds],
            "history": self.history,
            "example_shape": self.example_shape,
            "dense": dict(self.dense),
        }

    def resume_model(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        if state.get("history"):
            model = _channels().rebuild_from(model, state)
        return model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["prune"]
        now = to_dict(self.cfg)["prune"]
        keys = ("method", "scope", "sparsity", "modules", "ignore", "rounds", "rewind")
        for key in (*keys, "granularity", "importance", "groups"):
            if saved.get(key, PruneConfig.groups if key == "groups" else None) != now[key]:
                raise UserError(
                    f"the checkpoint was pruned with prune.{key} = {saved.get(key)!r}, this "
                    f"job has {now[key]!r}: resume with the same [prune] section"
                )
        self.masks = MaskSet(
            {n: nn.Parameter(torch.empty(m.shape)) for n, m in state["masks"].items()},
            state["masks"],
        )  # placeholders: on_start binds the masks to the model's weights
        self.target = float(state["target"])
        self.before = dict(state["before"])
        self.sweep = [dict(x) for x in state["sweep"]]
        self.history = list(state.get("history", []))
        self.dense = dict(state.get("dense", {}))
        self.rewind_to = dict(state["rewind"])
        self.rounds = [dict(r) for r in state["rounds"]]


def _channels() -> Any:
    """:mod:`dtrain.jobs.channels` (imports Torch-Pruning, an extra, only when needed)."""
    from dtrain.jobs import channels

    return channels


def _metric_key(evaluated: dict[str, float]) -> str:
    return "test_accuracy" if "test_accuracy" in evaluated else "test_perplexity"


@torch.no_grad()
def _evaluate_masked(
    trainer: Trainer, weights: dict[str, nn.Parameter], masks: dict[str, Tensor]
) -> dict[str, float]:
    """The model evaluated with ``masks`` applied, its weights restored afterwards."""
    saved = {n: w.detach().clone() for n, w in weights.items()}
    for n, w in weights.items():
        w.mul_(masks[n])
    try:
        return trainer.evaluate()
    finally:
        for n, w in weights.items():
            w.copy_(saved[n])


def make_trainer(cfg: PruneJobConfig, info: DistInfo, *, check_only: bool = False) -> Trainer:
    """The shared trainer with the pruning job's model source and extension."""
    ext = PruneExtension(cfg)
    return Trainer(
        cfg, info, check_only=check_only, model_source=ext.model_source, extensions=[ext]
    )


# ------------------------------------------------------------------------------ the report


def write_report(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Measure the pruned model and write ``prune_report.json`` and ``accuracy_vs_sparsity.png``
    into the run directory (rank 0); adds the headline figures to ``summary``."""
    ext = next(e for e in trainer.extensions if isinstance(e, PruneExtension))
    assert ext.masks is not None
    metric = _metric_key(summary)
    counts = ext.masks.counts()
    channels = ext.p.granularity == "channels"
    params = sum(p.numel() for p in trainer.model.parameters())
    if channels:  # the fraction of the parameters removed
        summary["sparsity"] = 1.0 - params / ext.dense["parameters"]
    else:
        kept = sum(k for k, _ in counts.values())
        summary["sparsity"] = 1.0 - kept / sum(n for _, n in counts.values())
    summary[f"{metric}_before"] = ext.before[metric]
    pruned = next(x[metric] for x in ext.sweep if x["sparsity"] == ext.p.sparsity)
    summary[f"{metric}_pruned"] = pruned
    if not trainer.info.is_main:
        return
    model = trainer.model
    x = trainer.data.x_test
    one, batch = x[:1].to(trainer.info.device), _batch_of(x, 64).to(trainer.info.device)
    steps = max(int(summary["steps"]), 1)
    stats = trainer.hook_state.stats()  # DGC: pairs with and without the masks
    report: dict[str, Any] = {
        "source": ext.source_path,
        "method": ext.p.method,
        "granularity": ext.p.granularity,
        "importance": ext.p.criterion,
        "scope": ext.p.scope,
        "ratio": ext.p.sparsity,
        "metric": metric.removeprefix("test_"),
        f"{metric}_before": ext.before[metric],
        f"{metric}_pruned": pruned,
        f"{metric}_final": summary[metric],
        "sparsity": summary["sparsity"],
        "layers": {
            n.removesuffix(".weight"): {"kept": k, "numel": c, "sparsity": 1.0 - k / c}
            for n, (k, c) in counts.items()
        },
        "parameters": params,
        "nonzero_parameters": nonzero_parameters(model),
        "macs": macs(model, one),
        "nonzero_macs": macs(model, one, keep=ext.masks.keep),
        "latency_ms_batch1": latency_ms(model, one),
        "latency_ms_batch64": latency_ms(model, batch, repeats=10),
        "latency_threads": torch.get_num_threads(),
        "hook": trainer.cfg.comm.hook,
        "bytes_last_step": stats["bytes_sent"],
        "bytes_per_step": summary["bytes_sent_total"] / steps,
        "dense_bytes_per_step": summary["dense_bytes_total"] / steps,
        "steps": summary["steps"],
        "sweep": [dict(x) for x in ext.sweep],
        "rewind": ext.p.rewind_mode,
        "rounds": [*ext.rounds, {"step": summary["steps"], "sparsity": summary["sparsity"],
                                  metric: summary[metric]}],
    }  # fmt: skip
    if channels:
        report["parameters_before"] = ext.dense["parameters"]
        report["macs_before"] = ext.dense["macs"]
        report["widths_before"] = ext.dense["widths"]
        dense = build_model(trainer.cfg.model, trainer.data.info).to(trainer.info.device)
        report["widths"] = widths(model)
        if isinstance(model, ResNet) and isinstance(dense, ResNet):  # per stage: shared, inside
            report["stage_widths_before"] = dense.stage_widths()
            report["stage_widths"] = model.stage_widths()
        report["latency_ms_batch1_before"] = latency_ms(dense, one)  # the unpruned shape
        report["latency_ms_batch64_before"] = latency_ms(dense, batch, repeats=10)
    if "pairs_sent" in stats:
        report["pairs_last_step"] = stats["pairs_sent"]
        report["pairs_last_step_unmasked"] = stats["pairs_unmasked"]
    run_dir = trainer.run_dir
    atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2) + "\n")
    _plot(run_dir / PLOT, report, metric)
    logger.info("pruning report: %s", run_dir / REPORT)


def _batch_of(x: Tensor, n: int) -> Tensor:
    reps = math.ceil(n / x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n] if reps > 1 else x[:n]


def _plot(path: Path, report: dict[str, Any], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = report["metric"]
    channels = report["granularity"] == "channels"
    fig, ax = plt.subplots(figsize=(6, 4))
    key = "macs" if channels else "sparsity"
    xs = [r[key] / (1e6 if channels else 1) for r in report["sweep"]]
    label = f"one-shot, {report['importance']}, {report['scope']}"
    ax.plot(xs, [r[metric] for r in report["sweep"]], "o-", label=label)
    ax.axhline(report[f"{metric}_before"], color="gray", ls="--", label="before pruning")
    x = report["macs"] / 1e6 if channels else report["sparsity"]
    ax.plot(
        [x], [report[f"{metric}_final"]], "r*", ms=14,
        label=f"{report['method']}, fine-tuned ({report['hook']})",
    )  # fmt: skip
    if channels:
        ax.axvline(report["macs_before"] / 1e6, color="gray", ls=":", label="MACs before")
    ax.set_xlabel("MACs per image (millions)" if channels else "sparsity of the pruned layers")
    ax.set_ylabel(f"test {name}" + (" (%)" if name == "accuracy" else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
