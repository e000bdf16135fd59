"""Quantization with torchao (int8 weight-only, dynamic, static with calibration, QAT); knows
nothing of jobs. Needs ``pip install 'dtrain[deploy]'``."""

from dtrain.quantize.ao import (
    METHODS,
    QuantReport,
    calibrate_scales,
    import_torchao,
    load_quantized,
    qat_convert,
    qat_prepare,
    quantize_model,
)

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
