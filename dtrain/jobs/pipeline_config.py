"""The compression pipeline's configuration: one section per stage, and the stage order.

A pipeline file (``configs/pipeline/*.toml``) names the starting model and the stages; a training
stage (``distill``, ``prune``, the fine-tunes of ``lowrank`` and ``quantize.method = "qat"``)
points at its own job's config file and ``set``\\ s keys of it (``"section.key=value"``, as on
that job's command line).
"""

from dataclasses import dataclass, field
from typing import ClassVar

from dtrain.config import _at_least, _choice, _positive
from dtrain.errors import UserError

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_QUANTIZE",
    "ORDER",
    "DistillStage",
    "ExportStage",
    "LowRankStage",
    "PipelineConfig",
    "PipelineFile",
    "PruneStage",
    "QuantizeStage",
    "check_order",
]

ORDER = ("distill", "prune", "lowrank", "quantize", "export")
"""The stages in the only order they compose: a quantized model is not pruned or factorised
again, and the export is last."""
QUANT_METHODS = ("int8_weight_only", "int8_dynamic", "int8_static", "qat")
EXPORT_FORMATS = ("pt2", "onnx")
ONNX_QUANTIZE = ("auto", "none", "dynamic", "static")

_DONE = {"distill": "distilled", "prune": "pruned", "lowrank": "factorised"}
_WHY = {
    ("prune", "distill"): "the student would start over from its own initialisation",
    ("lowrank", "prune"): "the channel plan would not see the factorised layers",
    ("lowrank", "distill"): "the student would start over from its own initialisation",
}


def check_order(stages: tuple[str, ...]) -> None:
    """UserError unless ``stages`` are known, each at most once, in :data:`ORDER`."""
    if not stages:
        raise UserError("pipeline.stages is empty: name at least one of " + ", ".join(ORDER))
    for s in stages:
        if s not in ORDER:
            from dtrain.config import _closest

            raise UserError(
                f"pipeline.stages: unknown stage {s!r}{_closest(s, list(ORDER))} "
                f"(the stages: {' → '.join(ORDER)})"
            )
    for i, later in enumerate(stages):
        for earlier in stages[i + 1 :]:
            if earlier == later:
                raise UserError(f"pipeline.stages names {later!r} twice")
            if ORDER.index(earlier) < ORDER.index(later):
                why = _WHY.get((later, earlier)) or (
                    "the export is the last stage"
                    if later == "export"
                    else f"a quantized model is not {_DONE[earlier]} again"
                )
                raise UserError(
                    f"pipeline.stages: {earlier!r} after {later!r} is impossible ({why}); "
                    f"the order is {' → '.join(ORDER)}"
                )


@dataclass
class PipelineConfig:
    """The pipeline's own settings (``[pipeline]``)."""

    SECTION: ClassVar[str] = "pipeline"

    source: str = ""
    """The starting model: a ``dtrain.train`` / ``prune`` / ``distill`` run directory (its newest
    complete checkpoint) or a ``run_dir/checkpoints/step_XXXXXXXX`` directory."""
    stages: tuple[str, ...] = ORDER
    """The stages to run, a subsequence of ``distill, prune, lowrank, quantize, export``."""
    name: str = "pipeline"
    """The pipeline's directory is ``out_dir/name``; each stage gets ``out_dir/name/<stage>``."""
    out_dir: str = "runs"
    device: str = "auto"
    """The training stages' processes: ``auto``, ``cpu`` or ``cuda`` (post-training stages run
    on rank 0's CPU)."""
    threads: int = 0
    """Torch CPU threads per process while training; 0: cores / local processes."""
    measure_threads: int = 0
    """Threads for the latency measurements on rank 0 (PyTorch and onnxruntime alike);
    0: every core of the node (the other ranks wait meanwhile)."""
    latency_repeats: int = 50
    """Timed forward passes per latency (the median is reported)."""
    latency_rounds: int = 3
    """At the end, every row's latencies are measured again side by side, this many rounds of
    every artifact in turn, and the median round is reported; 0: each stage's own timing."""

    def __post_init__(self) -> None:
        s = self.SECTION
        check_order(tuple(self.stages))
        _choice(s, "device", self.device, ("auto", "cpu", "cuda"))
        _at_least(s, "threads", self.threads, 0)
        _at_least(s, "measure_threads", self.measure_threads, 0)
        _at_least(s, "latency_repeats", self.latency_repeats, 1)
        _at_least(s, "latency_rounds", self.latency_rounds, 0)
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise UserError(f"pipeline.name must be a plain directory name, got {self.name!r}")


@dataclass
class _TrainingStage:
    config: str = ""
    """The stage's own job config (TOML); empty: that job's defaults."""
    set: tuple[str, ...] = ()
    """Keys of that config to set, as ``"section.key=value"`` (e.g. ``"run.epochs=5"``)."""


@dataclass
class DistillStage(_TrainingStage):
    """``[distill]``: a ``dtrain.distill`` run whose teacher is the pipeline's input."""

    SECTION: ClassVar[str] = "distill"


@dataclass
class PruneStage(_TrainingStage):
    """``[prune]``: a ``dtrain.prune`` run (prune + fine-tune) of the stage's input."""

    SECTION: ClassVar[str] = "prune"


@dataclass
class LowRankStage(_TrainingStage):
    """``[lowrank]``: truncated SVD of Linear layers and 1x1 convolutions, then an optional
    ``dtrain.train`` fine-tune (``finetune = true``: ``config`` and ``set`` are its job's)."""

    SECTION: ClassVar[str] = "lowrank"

    rank: int = 0
    """The rank every factorised layer keeps (>= 1); 0: ``energy`` decides."""
    energy: float = 0.0
    """The smallest rank per layer whose singular values hold this fraction of Σ s², in (0, 1];
    0: ``rank`` decides."""
    layers: tuple[str, ...] = ()
    """Layers to factorise (module names); empty: every Linear and 1x1 convolution."""
    skip: tuple[str, ...] = ()
    """Layers left whole (e.g. the output layer)."""
    finetune: bool = True
    """Fine-tune the factorised model (a ``dtrain.train`` run from it) before the next stage."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise UserError(f"lowrank.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.energy <= 1.0:
            raise UserError(f"lowrank.energy must be in (0, 1], got {self.energy}")
        if (self.rank > 0) == (self.energy > 0):
            raise UserError(
                f"[lowrank] needs exactly one of rank (>= 1) and energy (in (0, 1]), got "
                f"rank = {self.rank}, energy = {self.energy}"
            )


@dataclass
class QuantizeStage(_TrainingStage):
    """``[quantize]``: torchao on the CPU (``config``/``set``: the QAT training's job)."""

    SECTION: ClassVar[str] = "quantize"

    method: str = "int8_dynamic"
    """``int8_weight_only``, ``int8_dynamic`` (int8 activations per token at run time),
    ``int8_static`` (activation scales from ``calibration_batches``) or ``qat`` (a fake-quantized
    ``dtrain.train`` fine-tune, then converted to int8 weights with int8 dynamic
    activations)."""
    skip: tuple[str, ...] = ()
    """Layers left float."""
    calibration_batches: int = 8
    """``int8_static``: training batches whose inputs set the activation scales."""

    def __post_init__(self) -> None:
        _choice(self.SECTION, "method", self.method, QUANT_METHODS)
        _at_least(self.SECTION, "calibration_batches", self.calibration_batches, 1)


@dataclass
class ExportStage:
    """``[export]``: ``torch.export`` and ONNX, checked with onnxruntime."""

    SECTION: ClassVar[str] = "export"

    formats: tuple[str, ...] = EXPORT_FORMATS
    """``pt2`` (``torch.export``) and/or ``onnx`` (the dynamo exporter)."""
    onnx_quantize: str = "auto"
    """int8 ONNX by onnxruntime's own quantization of the float model: ``dynamic``,
    ``static`` (``calibration_batches`` of training inputs), ``none``; ``auto``: when the
    quantize stage's model has no ONNX translation (torchao's int8 activations), the
    matching onnxruntime method (``int8_dynamic`` → dynamic, ``int8_static`` → static)."""
    atol: float = 1e-4
    rtol: float = 1e-4
    """A float export matches PyTorch when max |Δ| <= atol + rtol · max |PyTorch's output| over
    the held-out inputs."""
    quantized_rtol: float = 0.25
    """The same bound (atol + quantized_rtol · max |output|) for an int8 ONNX model made by
    onnxruntime, against the PyTorch model it stands for: two int8 schemes, not one (where
    torchao left the convolutions float, onnxruntime quantizes them too)."""
    quantized_agreement: float = 0.97
    """And the int8 ONNX model's top-1 predictions agree with PyTorch's on at least this
    fraction of the compared inputs."""
    check_samples: int = 512
    """Held-out inputs compared (the first ones)."""
    calibration_batches: int = 8
    """``onnx_quantize = "static"``: training batches for onnxruntime's calibration."""

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.formats:
            raise UserError("export.formats is empty: name pt2 and/or onnx")
        for f in self.formats:
            _choice(s, "formats", f, EXPORT_FORMATS)
        _choice(s, "onnx_quantize", self.onnx_quantize, ONNX_QUANTIZE)
        if self.onnx_quantize in ("dynamic", "static") and "onnx" not in self.formats:
            raise UserError(
                f"export.onnx_quantize = {self.onnx_quantize!r} needs 'onnx' in export.formats"
            )
        _at_least(s, "atol", self.atol, 0.0)
        _at_least(s, "rtol", self.rtol, 0.0)
        _at_least(s, "quantized_rtol", self.quantized_rtol, 0.0)
        if not 0.0 <= self.quantized_agreement <= 1.0:
            raise UserError(
                f"export.quantized_agreement must be in [0, 1], got {self.quantized_agreement}"
            )
        _positive(s, "check_samples", self.check_samples)
        _at_least(s, "calibration_batches", self.calibration_batches, 1)


@dataclass
class PipelineFile:
    """A whole pipeline config: ``[pipeline]`` and one section per stage."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    distill: DistillStage = field(default_factory=DistillStage)
    prune: PruneStage = field(default_factory=PruneStage)
    lowrank: LowRankStage = field(default_factory=lambda: LowRankStage(energy=0.9))
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    export: ExportStage = field(default_factory=ExportStage)

    def __post_init__(self) -> None:
        if not self.pipeline.source:
            raise UserError("pipeline.source is empty: give the trained run to compress")
