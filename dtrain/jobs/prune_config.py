"""The pruning job's configuration: the ``[prune]`` section and the job's config class."""

from dataclasses import dataclass, field
from typing import ClassVar

from dtrain.config import JobConfig, _at_least, _choice
from dtrain.errors import UserError
from dtrain.pruning import PRUNABLE
from dtrain.pruning.structured import CHANNEL_IMPORTANCES, GROUPS

__all__ = ["METHODS", "REWINDS", "PruneConfig", "PruneJobConfig"]

METHODS = ("oneshot", "gradual", "iterative", "lottery")
REWINDS = ("auto", "none", "init", "step", "random")


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
    recalibrate_batches: int = 20
    """``channels``: training batches per rank that re-estimate the batch norms' statistics of
    each one-shot pruned model of the sweep (averaged over the ranks), for the report's accuracy
    after pruning with re-estimated statistics beside the raw one (stale statistics leave a
    pruned ResNet near chance); 0: not measured. Fine-tuning starts from the raw model."""
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
        _at_least(s, "recalibrate_batches", self.recalibrate_batches, 0)
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
