"""``dtrain.pipeline`` as a user runs it: under torchrun from a trained run through every stage
to an int8 ONNX file, and every mistake as one line with exit code 2."""

import json

import pytest

from dtrain import pipeline
from tests.integration.cli import REPO, torchrun

pytestmark = pytest.mark.integration

SHORT = "logging.progress=false,logging.every_steps=10,run.max_steps=10"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short dtrain.train run of a width-8 digits CNN (allreduce, 40 steps)."""
    out = tmp_path_factory.mktemp("pipeline_cli")
    r = torchrun(
        2,
        "--config", "configs/digits.toml", "--logging.progress=false", "--run.max_steps=40",
        "--model.width=8", "--comm.hook=allreduce", f"--run.out_dir={out}", "--run.name=src",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _argv(out, *extra):
    return [
        "--config", "configs/pipeline/digits.toml", f"--pipeline.source={out}/src",
        f"--pipeline.out_dir={out}", "--pipeline.latency_repeats=2",
        f"--distill.set={SHORT}", f"--prune.set={SHORT},prune.sweep=0.8",
        f"--lowrank.set={SHORT}", "--export.check_samples=64", *extra,
    ]  # fmt: skip


def test_the_whole_pipeline_under_torchrun(source):
    r = torchrun(2, *_argv(source, "--pipeline.name=p"), module="dtrain.pipeline", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| export (onnx int8 static) | onnxruntime |" in r.stdout
    assert "smaller, " in r.stdout and "faster at batch 64" in r.stdout
    p = source / "p"
    report = json.loads((p / "pipeline_report.json").read_text())
    stages = [row["stage"] for row in report["rows"]]
    assert stages[:6] == ["source", "source (onnx)", "distill", "prune", "lowrank", "quantize"]
    rows = report["rows"]
    assert report["final_vs_source"]["smaller"] == rows[0]["bytes"] / rows[-1]["bytes"] > 2
    assert (p / "accuracy_vs_size.png").stat().st_size > 10_000
    assert (p / "export/model.int8.onnx").is_file() and (p / "export/model.pt2").is_file()
    assert "| distill | pytorch |" in (p / "pipeline_report.md").read_text()
    # started again: nothing is run again, the same report
    r = torchrun(2, *_argv(source, "--pipeline.name=p"), module="dtrain.pipeline")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("finished before, skipped") == 6  # source and five stages
    again = json.loads((p / "pipeline_report.json").read_text())["rows"]

    def measured(row):  # the latencies are measured again, side by side, at every end
        return {k: v for k, v in row.items() if not k.startswith("latency")}

    assert [measured(r) for r in again] == [measured(r) for r in report["rows"]]


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pipeline.stages=distill,prnue"], "unknown stage 'prnue' (did you mean 'prune'?)"),
        (["--pipeline.stages=quantize,prune"], "'prune' after 'quantize' is impossible"),
        (["--pipeline.stages=export,lowrank"], "(the export is the last stage)"),
        (["--pipeline.stages=prune,prune"], "pipeline.stages names 'prune' twice"),
        (["--lowrank.energy=1.5"], "lowrank.energy must be in (0, 1], got 1.5"),
        (["--lowrank.energy=0"], "[lowrank] needs exactly one of rank (>= 1) and energy"),
        (["--lowrank.energy=0", "--lowrank.rank=-2"], "lowrank.rank must be >= 1, got -2"),
        (["--pipeline.source=/nonexistent"], "/nonexistent is neither a run directory"),
        (["--prune.config=configs/prune/nope.toml"], "prune.config: configs/prune/nope.toml is"),
        (["--prune.set=prune.sparsty=0.5"], "unknown key prune.sparsty (did you mean"),
        (["--quantize.method=int4"], "quantize.method must be one of"),
        (["--export.formats=pt2", "--export.onnx_quantize=static"], "needs 'onnx' in export"),
    ],
)
@pytest.mark.usefixtures("_repo_root")
def test_bad_input_is_one_line_exit_2_nothing_written(source, capsys, args, message):
    before = _snapshot(source)
    assert pipeline.main(_argv(source, "--pipeline.name=bad", *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain.pipeline: error: "), err
    assert message in err[0], err[0]
    assert _snapshot(source) == before


@pytest.mark.usefixtures("_repo_root")
def test_check_validates_without_writing(source, capsys):
    before = _snapshot(source)
    assert pipeline.main([*_argv(source, "--pipeline.name=c"), "--check"]) == 0
    assert "dtrain.pipeline: ok: " in capsys.readouterr().out
    assert _snapshot(source) == before


@pytest.mark.usefixtures("_repo_root")
def test_an_export_that_does_not_match_onnxruntime_stops_naming_the_difference(source, capsys):
    argv = _argv(source, "--pipeline.name=tol", "--pipeline.stages=export",
                 "--export.formats=onnx", "--export.atol=0", "--export.rtol=0")  # fmt: skip
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the stages' log lines, then it
    assert [line for line in err if "error" in line] == err[-1:], err
    assert err[-1].startswith(
        "dtrain.pipeline: error: export: model.onnx does not match "
        "PyTorch: the largest difference is"
    )
    assert "raise export.atol / rtol" in err[-1]
    assert not (source / "tol/export/stage.json").exists()  # not marked finished


@pytest.mark.usefixtures("_repo_root")
def test_quantization_aware_training_trains_then_converts(source, capsys):
    qat = ["--quantize.method=qat", "--quantize.config=configs/digits.toml"]
    argv = _argv(
        source,
        "--pipeline.name=qat",
        "--pipeline.stages=quantize,export",
        *qat,
        f"--quantize.set={SHORT},comm.hook=allreduce",
        "--export.formats=onnx",
    )
    assert pipeline.main(argv) == 0, capsys.readouterr().err[-3000:]
    q = source / "qat/quantize"
    lines = (q / "qat/metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["steps"] == 10  # the fake-quantized fine-tune ran
    record = json.loads((q / "stage.json").read_text())
    assert record["details"]["quantized"] == ["fc1", "fc2"]
    assert record["output"]["quantized"].endswith("model.pt")
    # the QAT model's int8 activations have no ONNX translation: onnxruntime's int8 instead
    checks = json.loads((source / "qat/export/stage.json").read_text())["details"]
    assert "onnxruntime's dynamic int8" in checks["onnx_int8"]["why"]
