"""The pruning job: start from a trained run, prune, fine-tune with the shared trainer, report.

:class:`PruneConfig` is the job's ``[prune]`` section; :func:`make_trainer` builds a
:class:`~dtrain.trainer.Trainer` whose model comes from ``prune.source`` and whose
:class:`PruneExtension` keeps the masks: it prunes on the schedule of ``prune.method``, proves
every rank chose the same masks before any weight changes, zeroes the pruned weights (and the
optimizer's state for them) after every step and hands the masks to the DGC hook, which then
never sends a pruned coordinate. :func:`write_report` measures the result.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dtrain.checkpoint import atomic_write_text, load_shared
from dtrain.config import JobConfig, _at_least, _choice, to_dict
from dtrain.data import DataInfo
from dtrain.distributed import DistInfo
from dtrain.errors import UserError
from dtrain.models import build_model
from dtrain.pruning import (
    PRUNABLE,
    Disagreement,
    MaskSet,
    cubic_sparsity,
    magnitude_masks,
    prunable_weights,
    round_sparsity,
    verify_identical,
)
from dtrain.pruning.measure import latency_ms, macs, nonzero_parameters
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

METHODS = ("magnitude", "gradual", "iterative")
REPORT = "prune_report.json"
PLOT = "accuracy_vs_sparsity.png"


@dataclass
class PruneConfig:
    """What to prune, how and on which schedule (``dtrain.prune``)."""

    SECTION: ClassVar[str] = "prune"

    source: str = ""
    """The trained model: a ``dtrain.train`` (or ``dtrain.prune``) run directory (its newest
    complete checkpoint) or a checkpoint directory ``run_dir/checkpoints/step_XXXXXXXX``."""
    method: str = "magnitude"
    """``magnitude`` (prune once to ``sparsity`` before the first step, then fine-tune),
    ``gradual`` (Zhu & Gupta's cubic schedule from ``initial_sparsity`` at ``start_step`` to
    ``sparsity`` at ``end_step``, every ``frequency`` steps) or ``iterative`` (``rounds`` equal
    prune → fine-tune rounds, each pruning the same fraction of what remains)."""
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
    """``iterative``: prune → fine-tune rounds (equal shares of the run)."""
    sweep: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    """Sparsities at which the source model's one-shot accuracy (no fine-tuning) is measured
    for the report and its plot (``sparsity`` is always measured)."""

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
        if key in saved and saved[key] != value:
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
        self.sweep: list[tuple[float, float]] = []  # (sparsity, one-shot metric)

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
        model = build_model(cfg.model, info)
        missing, unexpected = _load_strict(model, shared.get("model", {}))
        if missing or unexpected:
            raise UserError(
                f"prune.source {ckpt} does not fit model.name = {cfg.model.name!r}: "
                f"{'missing ' + missing if missing else 'unexpected ' + unexpected}"
            )
        self.source_path = str(ckpt)
        self.source_masks = dict(shared.get("extensions", {}).get("prune", {}).get("masks", {}))
        return model

    def _weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        try:
            return prunable_weights(model, types=self.p.modules, ignore=self.p.ignore)
        except KeyError as e:
            raise UserError(f"prune.ignore: {e.args[0]} in {self.cfg.model.name}") from None

    def check(self, trainer: Trainer, model: nn.Module) -> None:
        """Refuse what cannot be pruned, before anything is written."""
        p = self.p
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
        if p.method == "iterative" and p.rounds > total:
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

    # ---------------------------------------------------------------- schedule
    def target_at(self, step: int) -> float:
        """The sparsity the masks must have before step ``step`` (0-based) runs."""
        p = self.p
        if p.method == "magnitude":
            return p.sparsity
        if p.method == "gradual":
            return cubic_sparsity(
                step, initial=p.initial_sparsity, final=p.sparsity, start=p.start_step,
                end=self.end_step, frequency=p.frequency,
            )  # fmt: skip
        length = self.total_steps / p.rounds
        index = min(int(step / length), p.rounds - 1)
        return round_sparsity(index, rounds=p.rounds, final=p.sparsity)

    # ---------------------------------------------------------------- training (every rank)
    def on_start(self, trainer: Trainer) -> None:
        weights = self._weights(trainer.model)
        if self.masks is not None:  # resumed: the checkpoint's masks
            self._install(trainer, self.masks.keep)
            return
        keep = {n: m.to(weights[n].device) for n, m in self.source_masks.items()}
        self.before = trainer.evaluate()
        metric = _metric_key(self.before)
        for s in sorted({*self.p.sweep, self.p.sparsity}):
            masks = magnitude_masks(weights, s, scope=self.p.scope, keep=keep)
            self.sweep.append((s, _evaluate_masked(trainer, weights, masks)[metric]))
        self._prune(trainer, weights, self.target_at(0), keep)

    def after_step(self, trainer: Trainer) -> None:
        assert self.masks is not None  # made in on_start
        self.masks.apply_(trainer.optimizer)
        if trainer.step < trainer.total_steps:
            target = self.target_at(trainer.step)
            if target > self.target:
                self._prune(trainer, self._weights(trainer.model), target, self.masks.keep)

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
            "sweep": [list(x) for x in self.sweep],
            "source": self.source_path,
            "prune": to_dict(self.cfg)["prune"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["prune"]
        now = to_dict(self.cfg)["prune"]
        for key in ("method", "scope", "sparsity", "modules", "ignore", "rounds"):
            if saved.get(key) != now[key]:
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
        self.sweep = [(float(s), float(a)) for s, a in state["sweep"]]


def _load_strict(model: nn.Module, state: dict[str, Tensor]) -> tuple[str, str]:
    """Load ``state`` into ``model``; the first missing / unexpected / misshapen key, or ''."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for k in own:
        if k in state and tuple(state[k].shape) != tuple(own[k].shape):
            return "", f"{k} of shape {list(state[k].shape)} (the model's: {list(own[k].shape)})"
    if missing or unexpected:
        return (missing[0] if missing else ""), (unexpected[0] if unexpected else "")
    model.load_state_dict(state)
    return "", ""


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
    kept = sum(k for k, _ in counts.values())
    total = sum(n for _, n in counts.values())
    summary["sparsity"] = 1.0 - kept / total
    summary[f"{metric}_before"] = ext.before[metric]
    pruned = dict(ext.sweep)[ext.p.sparsity]
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
        "scope": ext.p.scope,
        "metric": metric.removeprefix("test_"),
        f"{metric}_before": ext.before[metric],
        f"{metric}_pruned": pruned,
        f"{metric}_final": summary[metric],
        "sparsity": summary["sparsity"],
        "layers": {
            n.removesuffix(".weight"): {"kept": k, "numel": c, "sparsity": 1.0 - k / c}
            for n, (k, c) in counts.items()
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "nonzero_parameters": nonzero_parameters(model),
        "macs": macs(model, one),
        "nonzero_macs": macs(model, one, keep=ext.masks.keep),
        "latency_ms_batch1": latency_ms(model, one),
        "latency_ms_batch64": latency_ms(model, batch, repeats=10),
        "hook": trainer.cfg.comm.hook,
        "bytes_last_step": stats["bytes_sent"],
        "bytes_per_step": summary["bytes_sent_total"] / steps,
        "dense_bytes_per_step": summary["dense_bytes_total"] / steps,
        "steps": summary["steps"],
        "sweep": [{"sparsity": s, metric: a} for s, a in ext.sweep],
    }
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
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["sparsity"] for r in report["sweep"]]
    ax.plot(xs, [r[metric] for r in report["sweep"]], "o-", label=f"one-shot {report['scope']}")
    ax.axhline(report[f"{metric}_before"], color="gray", ls="--", label="before pruning")
    ax.plot(
        [report["sparsity"]], [report[f"{metric}_final"]], "r*", ms=14,
        label=f"{report['method']}, fine-tuned ({report['hook']})",
    )  # fmt: skip
    ax.set_xlabel("sparsity of the pruned layers")
    ax.set_ylabel(f"test {name}" + (" (%)" if name == "accuracy" else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
