"""The pipeline's config (stage order, ranges) and its report's comparison, without processes."""

import pytest

from dtrain.config import load_config
from dtrain.errors import UserError
from dtrain.jobs.pipeline_config import ORDER, PipelineFile, check_order
from dtrain.jobs.pipeline_report import compare, table


@pytest.mark.parametrize(
    "stages",
    [ORDER, ("export",), ("prune", "quantize"), ("distill", "lowrank", "export")],
)
def test_every_subsequence_of_the_order_is_accepted(stages):
    check_order(stages)


@pytest.mark.parametrize(
    "stages,message",
    [
        ((), "pipeline.stages is empty"),
        (("quantise",), "unknown stage 'quantise' (did you mean 'quantize'?)"),
        (("prune", "distill"), "'distill' after 'prune' is impossible (the student would"),
        (("lowrank", "prune"), "the channel plan would not see the factorised layers"),
        (("quantize", "prune"), "a quantized model is not pruned again"),
        (("export", "quantize"), "the export is the last stage"),
        (("prune", "prune"), "names 'prune' twice"),
    ],
)
def test_impossible_stage_lists_say_why(stages, message):
    with pytest.raises(UserError) as e:
        check_order(stages)
    assert message in str(e.value)


def test_overrides_and_defaults(tmp_path):
    cfg = load_config(
        None,
        ["--pipeline.source=runs/x", "--pipeline.stages=lowrank,export", "--lowrank.energy=0.5",
         "--prune.set=run.epochs=2,optim.lr=0.01"],
        PipelineFile,
    )  # fmt: skip
    assert cfg.pipeline.stages == ("lowrank", "export")
    assert cfg.prune.set == ("run.epochs=2", "optim.lr=0.01")
    assert cfg.export.formats == ("pt2", "onnx") and cfg.export.onnx_quantize == "auto"
    with pytest.raises(UserError, match=r"pipeline\.source is empty"):
        load_config(None, [], PipelineFile)
    with pytest.raises(UserError, match=r"export\.atol must be >= 0"):
        load_config(None, ["--pipeline.source=x", "--export.atol=-1"], PipelineFile)


def _row(stage, runtime, nbytes, b64, acc):
    return {"stage": stage, "runtime": runtime, "params": 10, "bytes": nbytes, "macs": 1e6,
            "latency_b1_ms": 0.1, "latency_b64_ms": b64, "accuracy": acc}  # fmt: skip


def test_the_final_artifact_is_compared_with_the_source():
    rows = [
        _row("source", "pytorch", 8000, 4.0, 0.98),
        _row("source (onnx)", "onnxruntime", 8100, 2.0, 0.98),
        _row("export (onnx int8 static)", "onnxruntime", 1000, 1.0, 0.97),
    ]
    c = compare(rows)
    assert c["smaller"] == 8.0
    assert c["faster_b64"] == 4.0 and c["faster_b64_than_best_source"] == 2.0
    assert c["accuracy_change_points"] == pytest.approx(-1.0)
    assert "| export (onnx int8 static) | onnxruntime | 10 | 1.0 |" in table(rows)
