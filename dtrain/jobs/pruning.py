"""The pruning job: start from a trained run, prune, fine-tune with the shared trainer, report.

:class:`~dtrain.jobs.prune_config.PruneConfig` is the job's ``[prune]`` section;
:func:`make_trainer` builds a :class:`~dtrain.trainer.Trainer` whose model comes from
``prune.source`` and whose
:class:`PruneExtension` keeps the masks: it prunes on the schedule of ``prune.method``, proves
every rank chose the same masks before any weight changes, zeroes the pruned weights (and the
optimizer's state for them) after every step and hands the masks to the DGC hook, which then
never sends a pruned coordinate. :func:`dtrain.jobs.prune_report.write_report` measures the
result.
"""

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.checkpoint import load_shared, restore_model
from dtrain.config import JobConfig, to_dict
from dtrain.data import DataInfo
from dtrain.distributed import DistInfo
from dtrain.engine import zero_stage
from dtrain.errors import UserError
from dtrain.jobs.prune_config import METHODS, PruneConfig, PruneJobConfig
from dtrain.models import build_model
from dtrain.pruning import (
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
from dtrain.pruning.measure import macs
from dtrain.pruning.structured import widths
from dtrain.trainer import Extension, Trainer

__all__ = [
    "METHODS",
    "PruneConfig",
    "PruneExtension",
    "PruneJobConfig",
    "make_trainer",
    "metric_key",
]

logger = logging.getLogger(__name__)

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
        stage = zero_stage(trainer.ds_config) if trainer.ds_config is not None else 0
        taylor = p.granularity == "channels" and p.criterion == "taylor"
        if stage == 3 or (stage == 2 and taylor):
            why = (
                "partitions the weights the masks multiply"
                if stage == 3
                else "reduces and frees the gradients during backward, which Taylor reads"
            )
            raise UserError(
                f"dtrain.prune under ZeRO-{stage} ({trainer.cfg.engine.deepspeed_config}): "
                f"ZeRO-{stage} {why}; use configs/deepspeed/zero1.json"
            )
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
        metric = metric_key(self.before)
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
        metric = metric_key(self.before)
        model = trainer.model
        for s in p.sweep_points:  # one-shot, on copies, for the report's curve
            trainer.model = copy.deepcopy(model)
            try:
                channels.prune_channels(trainer, ratio=s, rebuild=False, **self._channel_args())
                point = {
                    "sparsity": s, metric: trainer.evaluate()[metric],
                    "macs": macs(trainer.model, one),
                }  # fmt: skip
                n = p.recalibrate_batches
                if n and channels.recalibrate(trainer, n):
                    point[f"{metric}_recalibrated"] = trainer.evaluate()[metric]
                self.sweep.append(point)
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
        trainer.weights_changed()
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

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """The sparsity now and the schedule's target (the same on every rank)."""
        return {"sparsity": self._sparsity(trainer), "target": self.target}

    def _round_end(self, trainer: Trainer) -> dict[str, float]:
        metric = trainer.evaluate()
        key = metric_key(metric)
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
        trainer.weights_changed()
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
        trainer.weights_changed()
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


def metric_key(evaluated: dict[str, float]) -> str:
    """The metric of a model's evaluation: accuracy (classifiers) or perplexity (text)."""
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
