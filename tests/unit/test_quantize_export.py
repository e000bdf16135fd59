"""torchao quantization and the exporters on real models: quantized and exported models run and
match PyTorch within the stated tolerances; what cannot be quantized or exported says why."""

import copy

import pytest
import torch
from torch import nn

from dtrain.export import (
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
)
from dtrain.lowrank import eligible_layers, factorize
from dtrain.models.vision import DigitsCNN
from dtrain.quantize import (
    calibrate_scales,
    load_quantized,
    qat_prepare,
    quantize_model,
)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return DigitsCNN(in_channels=1, num_classes=10).eval()


def _x(n=64):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float(((a - b).abs().max() / a.abs().max()).detach())


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic", "int8_static"])
def test_quantized_model_runs_close_to_float_and_reloads(method, cnn, tmp_path):
    x = _x()
    ref = cnn(x)
    q = copy.deepcopy(cnn)
    report = quantize_model(q, method, x[:2], calibration=[x[:32], x[32:]])
    assert report.quantized == ["fc1", "fc2"]
    assert set(report.skipped) == {"conv1", "conv2"}
    assert "nn.Linear only" in report.skipped["conv1"]
    assert type(q.fc1.weight).__name__ != "Parameter"  # a torchao tensor, not float
    out = q(x)
    assert 0 < _rel(ref, out) < 0.05
    torch.save(q.state_dict(), tmp_path / "q.pt")
    assert (tmp_path / "q.pt").stat().st_size < 0.45 * _float_bytes(cnn, tmp_path)
    back = load_quantized(DigitsCNN(in_channels=1, num_classes=10), tmp_path / "q.pt")
    assert torch.equal(back(x), out)


def _float_bytes(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "f.pt")
    return (tmp_path / "f.pt").stat().st_size


def test_static_scales_are_the_calibrated_input_peaks(cnn):
    x = _x()
    scales = calibrate_scales(cnn, [x[:32], x[32:]], ["fc1", "fc2"])
    seen = []
    h = cnn.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    cnn(x)
    h.remove()
    assert scales["fc1"] == (pytest.approx(float(seen[0]) / 127, rel=1e-6), 2)


def test_a_layer_torchao_refuses_is_skipped_with_its_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8)
            self.b = nn.Linear(8, 4).double()

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).double())

    m = Mixed()
    report = quantize_model(m, "int8_dynamic", torch.randn(2, 16))
    assert report.quantized == ["a"]
    assert "float64" in report.skipped["b"]
    assert isinstance(m.b.weight, nn.Parameter)  # put back as it was
    m(torch.randn(3, 16))


def test_qat_trains_with_the_float_names_then_converts(cnn):
    x = _x()
    names = list(cnn.state_dict())
    q = qat_prepare(copy.deepcopy(cnn).train())
    assert type(q.fc1).__name__ == "FakeQuantizedLinear"
    assert list(q.state_dict()) == names  # checkpoints restore into the float model
    q(x).sum().backward()
    assert q.fc1.weight.grad is not None and q.fc1.weight.grad.abs().sum() > 0
    report = quantize_model(q, "qat", x[:2])
    assert report.quantized == ["fc1", "fc2"]
    assert _rel(cnn(x), q(x)) < 0.05


def test_pt2_round_trip_with_a_dynamic_batch(cnn, tmp_path):
    factorize(cnn, eligible_layers(cnn), energy=0.9)
    path = export_pt2(cnn, _x(2), tmp_path / "m.pt2")
    loaded = load_pt2(path)
    for n in (1, 64):
        assert torch.equal(loaded(_x(n)), cnn(_x(n)))


def test_onnx_matches_pytorch_for_float_and_weight_only_models(cnn, tmp_path):
    x = _x()
    for name, model in [("f", cnn), ("w8", copy.deepcopy(cnn))]:
        if name == "w8":
            quantize_model(model, "int8_weight_only", x[:2])
        path = export_onnx(model, x[:2], tmp_path / f"{name}.onnx")
        assert not (tmp_path / f"{name}.onnx.data").exists()
        session = ort_session(path)
        diff, allowed = max_difference(model(x), ort_run(session, x), atol=1e-5, rtol=1e-5)
        assert diff <= allowed
        assert ort_run(session, x[:1]).shape == (1, 10)


def test_int8_activations_have_no_onnx_translation_and_onnxruntime_quantizes(cnn, tmp_path):
    x = _x()
    q = copy.deepcopy(cnn)
    quantize_model(q, "int8_dynamic", x[:2])
    with pytest.raises(ExportFailed, match=r"aten\._int_mm"):
        export_onnx(q, x[:2], tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    fp = export_onnx(cnn, x[:2], tmp_path / "f.onnx")
    dyn = ort_quantize_dynamic(fp, tmp_path / "d.onnx")
    static = ort_quantize_static(fp, tmp_path / "s.onnx", [x[:32], x[32:]])
    ref = cnn(x)
    for path in (dyn, static):
        assert artifact_bytes(path) < 0.4 * artifact_bytes(fp)
        diff, allowed = max_difference(ref, ort_run(ort_session(path), x), atol=0, rtol=0.1)
        assert 0 < diff <= allowed


def test_max_difference_is_relative_to_the_output_scale():
    a = torch.tensor([[10.0, -20.0]])
    assert max_difference(a, a + 0.01, atol=0.0, rtol=1e-3) == pytest.approx((0.01, 0.02), rel=1e-4)
    assert max_difference(a, a[:, :1], atol=1, rtol=1)[0] == float("inf")


def test_the_onnx_file_keeps_no_per_node_debug_records(cnn, tmp_path):
    import onnx

    x = _x(2)
    lean = export_onnx(cnn, x, tmp_path / "lean.onnx")
    full = export_onnx(cnn, x, tmp_path / "full.onnx", debug_info=True)
    assert any(n.metadata_props for n in onnx.load(str(full)).graph.node)
    assert not any(n.metadata_props for n in onnx.load(str(lean)).graph.node)
    assert artifact_bytes(lean) < artifact_bytes(full)
    assert torch.equal(ort_run(ort_session(lean), _x()), ort_run(ort_session(full), _x()))
