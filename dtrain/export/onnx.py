"""Export to ``torch.export`` programs (``.pt2``) and ONNX, and check ONNX against PyTorch.

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``: the model is
captured with ``torch.export`` and translated by onnxscript); the batch dimension stays dynamic
in both formats. TorchScript (``torch.jit.trace`` / ``script``), which older tutorials use, is
deprecated in PyTorch 2 and not used. A model whose operators have no ONNX function (torchao's
int8 dynamic activations run ``aten._int_mm``) can be exported in float and quantized by
onnxruntime instead (:func:`ort_quantize_dynamic`).
"""

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ExportFailed",
    "artifact_bytes",
    "export_onnx",
    "export_pt2",
    "load_pt2",
    "max_difference",
    "ort_quantize_dynamic",
    "ort_quantize_static",
    "ort_run",
    "ort_session",
    "strip_debug_info",
]

logger = logging.getLogger(__name__)

# The exporter's and onnxruntime's quantizer's progress messages are INFO on their own (or the
# root) loggers; a job's log keeps its own lines.
_QUIET = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in (*_QUIET, "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ExportFailed(RuntimeError):
    """The exporter could not capture or translate the model (the message says where)."""


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 16)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP = re.compile(r"\b(aten|torchao|quant|prims)(::|\.)\w+(\.\w+)?")


def _first_line(e: BaseException) -> str:
    """The exception's type and first line, plus the first operator its chain names (the
    exporters' messages bury the one that has no translation)."""
    chain: list[str] = []
    cause: BaseException | None = e
    while cause is not None and len(chain) < 8:
        chain.append(_ANSI.sub("", str(cause)))
        cause = cause.__cause__ or cause.__context__
    lines = [ln.strip() for ln in chain[0].splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"[:240]
    op = next((m.group(0) for c in chain for m in [_OP.search(c)] if m), "")
    return f"{text} (operator {op})" if op and op not in text else text


def export_pt2(model: nn.Module, example: Tensor, path: Path | str) -> Path:
    """``model`` (eval mode) captured by ``torch.export`` with a dynamic batch dimension and
    saved to ``path`` (``.pt2``; :func:`load_pt2` reads it back).

    Raises:
        ExportFailed: the model could not be captured or saved.
    """
    path = Path(path)
    model.eval()
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
        torch.export.save(program, path)
    except Exception as e:
        raise ExportFailed(f"torch.export: {_first_line(e)}") from e
    return path


def load_pt2(path: Path | str) -> nn.Module:
    """The callable module of a saved ``torch.export`` program."""
    return torch.export.load(str(path)).module()


def strip_debug_info(path: Path | str) -> None:
    """Drop what the dynamo exporter records per node for debugging (``metadata_props``: the
    Python stack trace, FX node, module path; ``doc_string``), in place: nothing a runtime
    reads, and a third of a small model's file."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph, *(f for f in model.functions)]
    for g in graphs:
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(model, str(path))


def export_onnx(
    model: nn.Module, example: Tensor, path: Path | str, *, debug_info: bool = False
) -> Path:
    """``model`` (eval mode) exported to ONNX by the dynamo exporter, weights inside the one
    file (no ``.onnx.data`` beside it), with a dynamic batch dimension; without the per-node
    debugging records unless ``debug_info`` (:func:`strip_debug_info`).

    Raises:
        ExportFailed: an operator has no ONNX function, or capture failed.
    """
    path = Path(path)
    model.eval()
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: _batch_dim()},),
                external_data=False,
                verbose=False,
            )
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportFailed(f"ONNX: {_first_line(e)}") from e
    if not debug_info:
        strip_debug_info(path)
    return path


def ort_session(path: Path | str, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of the ONNX file (``threads``: intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session: Any, x: Tensor) -> Tensor:
    """The session's first output for input ``x``, as a tensor."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.asarray(session.run(None, {name: x.numpy()})[0]))


def max_difference(
    reference: Tensor, other: Tensor, *, atol: float, rtol: float
) -> tuple[float, float]:
    """``(max |reference − other|, allowed)`` with ``allowed = atol + rtol · max |reference|``:
    a tolerance relative to the outputs' scale (logits differ in scale between models)."""
    ref, got = reference.detach().double(), other.detach().double()
    if ref.shape != got.shape:
        return float("inf"), 0.0
    return float((ref - got).abs().max()), atol + rtol * float(ref.abs().max())


def ort_quantize_dynamic(source: Path | str, target: Path | str) -> Path:
    """onnxruntime's own dynamic int8 quantization of a float ONNX model (int8 weights,
    activations quantized at run time): the path to int8 ONNX for models whose torchao
    quantization has no ONNX translation."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return Path(target)


def ort_quantize_static(source: Path | str, target: Path | str, batches: list[Tensor]) -> Path:
    """onnxruntime's static int8 quantization (QDQ format, int8 weights per channel, uint8
    activations at scales calibrated on ``batches``): int8 convolutions and matrix products
    where onnxruntime has them (``QLinearConv``), also for convolutional models."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = ort_session(source).get_inputs()[0].name

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: x.numpy()} for x in batches])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    with _quiet():
        quantize_static(
            str(source),
            str(target),
            _Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
    return Path(target)


def artifact_bytes(path: Path | str) -> int:
    """Bytes on disk of an exported file, with its external data file if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.is_file() else 0)
