"""The compression pipeline on 2 gloo ranks in-process, end to end on the digits: every stage
runs and is measured, the exports match PyTorch; a restarted pipeline skips what finished and
gives the same final model; an unfinished training stage needs --resume and then ends the
same."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtrain.config import load_config
from dtrain.distributed import DistInfo
from dtrain.errors import UserError
from dtrain.jobs.pipeline import Pipeline
from dtrain.jobs.pipeline_config import PipelineFile
from dtrain.trainer import Trainer
from tests.distributed.harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
QUIET = ["logging.progress=false", "logging.every_steps=6", "checkpoint.every_steps=6"]


def _info(rank, world):
    return DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t")


def _source(rank, world, out_dir):
    cfg = load_config(
        "configs/digits.toml",
        ["--logging.progress=false", f"--run.out_dir={out_dir}", "--run.name=source",
         "--run.max_steps=40", "--comm.hook=allreduce", "--model.width=8"],
    )  # fmt: skip
    trainer = Trainer(cfg, _info(rank, world))
    trainer.train()
    trainer.close()


def _config(tmp, name, stages, **sections):
    sets = {k: [*QUIET, "run.max_steps=12"] for k in ("distill", "prune", "lowrank")}
    text = f"""
[pipeline]
source = "{tmp}/source"
stages = {json.dumps(stages)}
name = "{name}"
out_dir = "{tmp}"
latency_repeats = 2
[distill]
config = "configs/distill/digits_kd.toml"
set = {json.dumps(sets["distill"])}
[prune]
config = "configs/prune/digits_global90.toml"
set = {json.dumps([*sets["prune"], "prune.sparsity=0.5", "prune.sweep=0.5"])}
[lowrank]
energy = 0.9
config = "configs/digits.toml"
set = {json.dumps(sets["lowrank"])}
[quantize]
method = "int8_static"
[export]
check_samples = 64
"""
    path = Path(tmp) / f"{name}.toml"
    path.write_text(text)
    return str(path)


def _pipeline(rank, world, config, overrides=(), resume=False):
    from dtrain.distill import DISTILL
    from dtrain.prune import PRUNE
    from dtrain.train import TRAIN, run

    jobs = {"distill": DISTILL, "prune": PRUNE, "train": TRAIN}
    cfg = load_config(config, list(overrides), PipelineFile)
    try:
        p = Pipeline(cfg, _info(rank, world), resume=resume,
                     runner=lambda c, i, kind: run(c, i, jobs[kind]))  # fmt: skip
        rows = p.run()
    except UserError as e:
        return f"{type(e).__name__}: {e}"
    return rows


def _final(directory):
    """The int8 weights and what the int8 ONNX model computes on fixed inputs."""
    from dtrain.export import ort_run, ort_session

    state = torch.load(directory / "quantize/model.pt", weights_only=False)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    onnx = ort_run(ort_session(directory / "export/model.int8.onnx"), x)
    return state, onnx


def _same(a, b):
    sa, oa = a
    sb, ob = b
    assert sa.keys() == sb.keys()

    def plain(t):
        return t.dequantize() if hasattr(t, "dequantize") else t

    for k in sa:
        assert torch.equal(plain(sa[k]), plain(sb[k])), k
    assert torch.equal(oa, ob)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)
    run_ranks(_source, 2, str(tmp))
    yield tmp
    mp.undo()


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def test_two_ranks_end_to_end_then_a_restart_skips_finished_stages(source):
    tmp = source
    stages = ["distill", "prune", "lowrank", "quantize", "export"]
    rows = run_ranks(_pipeline, 2, _config(tmp, "a", stages), timeout=400)
    assert rows[0] == rows[1]  # every rank learns rank 0's measurements
    names = [r["stage"] for r in rows[0]]
    assert names == ["source", "source (onnx)", *stages[:4], "export (pt2)",
                     "export (onnx float)", "export (onnx int8 static)"]  # fmt: skip
    by = {r["stage"]: r for r in rows[0]}
    assert by["distill"]["params"] < by["source"]["params"] / 3  # a width-4 student of width 8
    assert by["lowrank"]["params"] < by["prune"]["params"]
    assert by["quantize"]["bytes"] < by["lowrank"]["bytes"]
    assert by["export (onnx int8 static)"]["bytes"] < by["export (onnx float)"]["bytes"]
    for r in rows[0]:
        assert r["latency_b1_ms"] > 0 and r["latency_b64_ms"] > 0 and r["macs"] > 0
        assert 0.1 < r["accuracy"] <= 1.0
    # the float ONNX model computes what PyTorch does: the same held-out accuracy
    assert by["export (onnx float)"]["accuracy"] == by["lowrank"]["accuracy"]
    a = tmp / "a"
    checks = json.loads((a / "export/stage.json").read_text())["details"]
    assert checks["onnx_float"]["max_abs_diff"] <= checks["onnx_float"]["allowed"]
    assert checks["pt2"]["max_abs_diff"] <= checks["pt2"]["allowed"]
    assert checks["onnx_int8"]["max_abs_diff"] <= checks["onnx_int8"]["allowed"]
    # the prune stage trained the distilled student, the low-rank fine-tune the pruned model
    prune_cfg = json.loads((a / "prune/stage.json").read_text())
    assert prune_cfg["spec"]["input"]["checkpoint"].startswith(str(a / "distill/run"))
    final_a = _final(a)

    # half a pipeline, then the whole: the first three stages are not run again
    run_ranks(_pipeline, 2, _config(tmp, "b", stages[:3]), timeout=400)
    b = tmp / "b"
    marks = {s: (b / s / "stage.json").stat().st_mtime_ns for s in stages[:3]}
    ckpts = sorted((b / "prune/run/checkpoints").iterdir())
    run_ranks(_pipeline, 2, _config(tmp, "b", stages), timeout=400)
    assert {s: (b / s / "stage.json").stat().st_mtime_ns for s in stages[:3]} == marks
    assert sorted((b / "prune/run/checkpoints").iterdir()) == ckpts
    _same(_final(b), final_a)

    # the low-rank fine-tune cut short after its step-6 checkpoint: --resume continues it
    for s in ("quantize", "export"):
        shutil.rmtree(b / s)
    (b / "lowrank/stage.json").unlink()
    shutil.rmtree(b / "lowrank/finetune/checkpoints/step_00000012")
    out = run_ranks(_pipeline, 2, _config(tmp, "b", stages), timeout=400)
    assert out[0] == out[1]  # every rank sees it (rank 0 prints it)
    assert out[0].startswith("UserError: stage lowrank was started in")
    assert "pass --resume to continue it" in out[0]
    run_ranks(_pipeline, 2, _config(tmp, "b", stages), resume=True, timeout=400)
    _same(_final(b), final_a)

    # a finished stage whose section changed is refused, not silently reused
    out = run_ranks(_pipeline, 2, _config(tmp, "b", stages), ["--quantize.method=int8_dynamic"])
    assert "stage quantize in" in out[0] and "was finished with another section" in out[0]
