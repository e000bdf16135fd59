"""Post-training quantization and quantization-aware training with torchao, on CPU.

Methods (``METHODS``), each applied to the model's ``nn.Linear`` layers (torchao's int8 CPU
paths are for linear layers; convolutions stay float and are reported as skipped):

- ``int8_weight_only``: int8 weights per output row, float activations (``Int8WeightOnlyConfig``:
  4x smaller linear weights, no speed-up on CPU);
- ``int8_dynamic``: int8 weights and int8 activations quantized per token at run time
  (``Int8DynamicActivationInt8WeightConfig``: int8 matrix products);
- ``int8_static``: int8 weights, and activations at a fixed per-tensor scale measured by a
  calibration pass (``Int8StaticActivationInt8WeightConfig``);
- ``qat``: fake-quantized training (``QATConfig(base, step="prepare")``) of int8 weights per
  row with int8 dynamic activations (``Int8DynamicActivationIntxWeightConfig``), then
  ``step="convert"``.

PyTorch's older ``torch.ao.quantization`` (eager and FX modes) is deprecated and not used.
"""

import copy
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "QuantReport",
    "calibrate_scales",
    "import_torchao",
    "load_quantized",
    "qat_convert",
    "qat_prepare",
    "quantize_model",
]

logger = logging.getLogger(__name__)

METHODS = ("int8_weight_only", "int8_dynamic", "int8_static", "qat")


def import_torchao() -> Any:
    """``torchao``, imported without its two harmless library-load messages on CPU.

    Raises:
        ImportError: torchao is not installed (``pip install 'dtrain[deploy]'``).
    """
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import torchao.quantization

    return torchao.quantization


@dataclass
class QuantReport:
    """Which layers a method quantized, and why the others stayed float."""

    method: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    """``int8_static``: each layer's activation scale (max |x| / 127 over the calibration)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "quantized": list(self.quantized),
            "skipped": dict(self.skipped),
            "scales": dict(self.scales),
        }


def _weight_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: linear}, {name: why not})`` over the layers that hold a weight."""
    linear: dict[str, nn.Module] = {}
    other: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            linear[name] = m
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and not list(m.children()):
            kind = type(m).__name__
            if "Norm" not in kind:  # a norm's scale is not a matrix product's weight
                other[name] = f"{kind}: torchao's int8 CPU configs quantize nn.Linear only"
    return linear, other


@torch.no_grad()
def calibrate_scales(
    model: nn.Module, batches: Iterable[Tensor], names: Iterable[str]
) -> dict[str, tuple[float, int]]:
    """``{layer: (max |input| / 127, input dims)}`` of the named linear layers over
    ``batches`` (eval mode): the symmetric per-tensor int8 scale of each one's input."""
    names = list(names)
    peak = dict.fromkeys(names, 0.0)
    dims = dict.fromkeys(names, 2)

    def observe(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            peak[name] = max(peak[name], float(args[0].detach().abs().max()))
            dims[name] = args[0].dim()

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(observe(n)) for n in names]
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: (max(peak[n], 1e-8) / 127.0, dims[n]) for n in names}


def _config(method: str, tq: Any, scale: tuple[float, int] | None = None) -> Any:
    if method == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if method == "int8_static":
        assert scale is not None
        from torchao.quantization.granularity import PerRow, PerTensor

        value, dims = scale
        return tq.Int8StaticActivationInt8WeightConfig(
            act_quant_scale=torch.full((1,) * dims, value),
            granularity=[PerTensor(), PerRow()],
        )
    if method == "qat":  # the base config that QAT's convert step applies
        from torchao.quantization.granularity import PerAxis

        return tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0)
        )
    raise ValueError(f"unknown quantization method {method!r} (one of {', '.join(METHODS)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    example: Tensor,
    *,
    calibration: Iterable[Tensor] | None = None,
    skip: Iterable[str] = (),
) -> QuantReport:
    """Quantize ``model``'s linear layers in place with ``method`` (eval mode; ``qat``: a model
    that :func:`qat_prepare` prepared and that trained, converted here). Each layer is quantized
    alone and ``model(example)`` runs after it; a layer torchao refuses, or whose quantized
    forward fails, is put back as it was and reported as skipped with the reason (logged).

    Args:
        method: One of :data:`METHODS`.
        example: An input the model accepts (shape checks of the quantized forward).
        calibration: ``int8_static``: the batches whose inputs set each layer's scale.
        skip: Layer names left float on purpose (e.g. the output layer).
    """
    tq = import_torchao()
    model.eval()
    report = QuantReport(method)
    linear, report.skipped = _weight_layers(model)
    for name in skip:
        if name in linear:
            del linear[name]
            report.skipped[name] = "left float (quantize.skip)"
    if method == "qat":  # the fake-quantized layers, all at once (they trained so)
        from torchao.quantization.qat import FakeQuantizedLinear

        report.quantized = [n for n, m in linear.items() if isinstance(m, FakeQuantizedLinear)]
        for n in linear:
            if n not in report.quantized:
                report.skipped.setdefault(n, "not fake-quantized in training")
        qat_convert(model)
        model(example)
        return report
    scales: dict[str, tuple[float, int]] = {}
    if method == "int8_static":
        if calibration is None:
            raise ValueError("int8_static needs calibration batches")
        scales = calibrate_scales(model, calibration, linear)
        report.scales = {n: s for n, (s, _) in scales.items()}
    for name, layer in linear.items():
        kept = copy.deepcopy(layer)
        config = _config(method, tq, scales.get(name))
        try:
            tq.quantize_(model, config, filter_fn=lambda _m, fqn, n=name: fqn == n)
            model(example)
        except Exception as e:  # torchao's refusals are assertions, type and value errors
            _put(model, name, kept)
            report.skipped[name] = _first_line(e)
            logger.info("quantize %s: %s skipped: %s", method, name, report.skipped[name])
            continue
        report.quantized.append(name)
    for name, why in report.skipped.items():
        logger.info("quantize %s: %s stays float: %s", method, name, why)
    return report


def _put(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def qat_prepare(model: nn.Module, *, skip: Iterable[str] = ()) -> nn.Module:
    """``model`` with fake quantization on its linear layers (but ``skip``), in place: trains
    like the float model (the same parameter names), learning weights that survive int8."""
    tq = import_torchao()
    from torchao.quantization.qat import QATConfig

    skip = set(skip)
    config = QATConfig(_config("qat", tq), step="prepare")
    tq.quantize_(
        model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in skip
    )
    return model


def qat_convert(model: nn.Module) -> nn.Module:
    """The fake-quantized layers of a :func:`qat_prepare` model made int8, in place."""
    tq = import_torchao()
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    config = QATConfig(_config("qat", tq), step="convert")
    tq.quantize_(model, config, filter_fn=lambda m, _fqn: isinstance(m, FakeQuantizedLinear))
    return model


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``model`` (the float model the state was quantized from) with a quantized
    ``state_dict()`` file loaded (``weights_only``: torchao registers its tensor classes as
    safe on import): torchao's tensors replace the float parameters (``assign``)."""
    import_torchao()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.eval()
