"""Export (``torch.export`` ``.pt2``, ONNX through the dynamo exporter) and the onnxruntime
check against PyTorch; knows nothing of jobs. Needs ``pip install 'dtrain[deploy]'``."""

from dtrain.export.onnx import (
    ExportFailed,
    artifact_bytes,
    export_onnx,
    export_pt2,
    load_pt2,
    max_difference,
    ort_quantize_dynamic,
    ort_quantize_static,
    ort_run,
    ort_session,
    strip_debug_info,
)

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
