"""``dtrain.prune`` as a user runs it: under torchrun from a trained run, its report and plot,
the pruned checkpoint in a fresh process, and every mistake as one line with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from dtrain import prune, train
from tests.integration.cli import REPO, env, read_metrics, torchrun

pytestmark = pytest.mark.integration

SHORT = ["--logging.progress=false", "--logging.every_steps=10"]
PRUNE = ["--config", "configs/prune/digits_global90.toml", *SHORT]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short dtrain.train run of the digits CNN (allreduce, 60 steps)."""
    out = tmp_path_factory.mktemp("prune_cli")
    r = torchrun(
        2,
        "--config", "configs/digits.toml", *SHORT, "--run.max_steps=60",
        "--comm.hook=allreduce", f"--run.out_dir={out}", "--run.name=src",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_prune_under_torchrun_writes_report_plot_and_a_loadable_checkpoint(source):
    r = torchrun(
        2,
        *PRUNE, f"--prune.source={source}/src", f"--run.out_dir={source}", "--run.name=p",
        "--run.max_steps=30",
        module="dtrain.prune",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in r.stdout
    run = source / "p"
    report = json.loads((run / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert set(report["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert report["nonzero_macs"] < report["macs"] and report["latency_ms_batch64"] > 0
    assert report["pairs_last_step_unmasked"] > 5 * report["pairs_last_step"]
    assert {"test_accuracy_before", "test_accuracy_pruned", "test_accuracy_final"} <= set(report)
    assert len(report["sweep"]) == 6
    assert (run / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    pruned = [m for m in read_metrics(run) if m["kind"] == "prune"]  # wandb: prune/sparsity
    assert [m["step"] for m in pruned] == [10, 20, 30]
    assert pruned[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4) == pruned[-1]["target"]
    # A fresh process: plain torch.load(weights_only=True), the model rebuilt from the config
    # saved beside the weights; its accuracy and sparsity are the report's.
    code = f"""
import json, torch
from dtrain.config import from_dict
from dtrain.data import load_data
from dtrain.models import build_model
s = torch.load("{run}/checkpoints/step_00000030/shared.pt", weights_only=True)["state"]
cfg = from_dict({{k: v for k, v in s["config"].items() if k != "prune"}})
data = load_data(cfg.data, seed=0)
model = build_model(cfg.model, data.info)
model.load_state_dict(s["model"])
model.eval()
with torch.no_grad():
    acc = 100.0 * (model(data.x_test).argmax(1) == data.y_test).sum().item() / len(data.y_test)
masks = s["extensions"]["prune"]["masks"]
zero = all(bool((s["model"][n][~m] == 0).all()) for n, m in masks.items())
print(json.dumps({{"acc": acc, "zero": zero}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout)
    assert fresh["zero"]
    assert fresh["acc"] == pytest.approx(report["test_accuracy_final"], abs=1e-9)


def test_channel_pruning_under_torchrun_reloads_from_its_history_in_a_fresh_process(source):
    r = torchrun(
        2,
        *PRUNE, f"--prune.source={source}/src", f"--run.out_dir={source}", "--run.name=ch",
        "--run.max_steps=20", "--prune.granularity=channels", "--prune.sparsity=0.3",
        "--prune.importance=taylor", "--prune.sweep=0.2",
        module="dtrain.prune",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run = source / "ch"
    report = json.loads((run / "prune_report.json").read_text())
    assert report["parameters"] < report["parameters_before"]
    assert report["macs"] < report["macs_before"]
    assert report["widths"]["fc2"] == 10 and report["widths_before"]["conv2"] == 32
    code = f"""
import json, torch
from dtrain.config import from_dict
from dtrain.data import load_data
from dtrain.models import build_model
from dtrain.pruning.structured import rebuild
s = torch.load("{run}/checkpoints/step_00000020/shared.pt", weights_only=True)["state"]
cfg = from_dict({{k: v for k, v in s["config"].items() if k != "prune"}})
data = load_data(cfg.data, seed=0)
model = rebuild(build_model(cfg.model, data.info), s["extensions"]["prune"]["history"],
                data.x_test[:2])
model.load_state_dict(s["model"])
model.eval()
with torch.no_grad():
    acc = 100.0 * (model(data.x_test).argmax(1) == data.y_test).sum().item() / len(data.y_test)
print(json.dumps({{"acc": acc, "conv2": model.conv2.out_channels}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout)
    assert fresh["conv2"] == report["widths"]["conv2"]
    assert fresh["acc"] == pytest.approx(report["test_accuracy_final"], abs=1e-9)


@pytest.fixture
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prune.sparsity=1.0"], "prune.sparsity must be in [0, 1), got 1.0"),
        (["--prune.sparsity=-0.1"], "prune.sparsity must be in [0, 1)"),
        (["--prune.ignore=fc9"], "prune.ignore: no layer named 'fc9' in digits_cnn"),
        (["--model.width=8"], "was trained with model.width = 0 (this job: 8)"),
        (["--model.name=mlp"], "was trained with model.name = 'digits_cnn'"),
        (["--prune.scope=layer", "--prune.sparsity=0.9999"], "would remove every weight"),
        (["--prune.method=gradual", "--prune.end_step=999"], "must satisfy start < end"),
        (["--prune.source=/nonexistent/run"], "/nonexistent/run is neither a run directory"),
        (["--prune.modules=linear", "--prune.ignore=fc1,fc2"], "has no linear layer left"),
        (
            ["--prune.method=lottery", "--prune.rewind=step", "--prune.rewind_step=7"],
            "has no complete checkpoint at that step",
        ),
        (
            ["--prune.granularity=channels", "--prune.importance=bn_scale"],
            "'bn_scale' (Network Slimming) needs batch norm layers, and digits_cnn has none",
        ),
        (
            ["--prune.granularity=channels", "--prune.method=gradual"],
            "prunes once or in rounds: set prune.method = 'oneshot' or 'iterative'",
        ),
        (["--prune.granularity=channels", "--prune.ignore=fc7"], "no layer named 'fc7'"),
        (
            [
                "--engine.name=deepspeed",
                "--engine.deepspeed_config=configs/deepspeed/zero3.json",
                "--comm.hook=allreduce",
            ],
            "dtrain.prune under ZeRO-3 (configs/deepspeed/zero3.json): ZeRO-3 partitions",
        ),
        (
            ["--prune.granularity=channels", "--prune.groups=stage"],
            "prune.groups must be one of all, blocks, stages",
        ),
    ],
)
@pytest.mark.usefixtures("_repo_root")
def test_bad_input_is_one_line_exit_2_nothing_written(source, capsys, args, message):
    before = _snapshot(source)
    argv = [*PRUNE, f"--prune.source={source}/src", f"--run.out_dir={source}", "--run.name=bad"]
    assert train.main([*argv, "--run.max_steps=20", *args], job=prune.PRUNE) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain.prune: error: "), err
    assert message in err[0], err[0]
    assert _snapshot(source) == before


@pytest.mark.usefixtures("_repo_root")
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(source, capsys, tmp_path):
    import torch

    ckpt = tmp_path / "ckpt"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(next((source / "src/checkpoints").iterdir()), ckpt)
    obj = torch.load(ckpt / "shared.pt", weights_only=True)
    obj["state"]["model"]["fc1.weight"] = obj["state"]["model"]["fc1.weight"][:, :100]
    del obj["state"]["config"]  # a foreign or older checkpoint: only the weights to go by
    torch.save(obj, ckpt / "shared.pt")
    argv = [*PRUNE, f"--prune.source={ckpt}", f"--run.out_dir={tmp_path}", "--run.name=bad"]
    assert train.main(argv, job=prune.PRUNE) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit the model (DigitsCNN): fc1.weight of shape" in err, err
    assert not (tmp_path / "bad").exists()
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.usefixtures("_repo_root")
def test_pruning_a_channel_pruned_run_again_keeps_the_whole_history(source):
    import torch

    from dtrain.config import from_dict
    from dtrain.data import load_data
    from dtrain.models import build_model
    from dtrain.pruning.structured import rebuild

    first = source / "ch2a"
    argv = [*PRUNE, f"--run.out_dir={source}", "--run.max_steps=4", "--prune.granularity=channels",
            "--prune.sweep=0.1"]  # fmt: skip
    assert train.main([*argv, f"--prune.source={source}/src", "--run.name=ch2a",
                       "--prune.sparsity=0.25"], job=prune.PRUNE) == 0  # fmt: skip
    assert train.main([*argv, f"--prune.source={first}", "--run.name=ch2b",
                       "--prune.sparsity=0.25"], job=prune.PRUNE) == 0  # fmt: skip
    a = torch.load(first / "checkpoints/step_00000004/shared.pt", weights_only=True)["state"]
    b = torch.load(source / "ch2b/checkpoints/step_00000004/shared.pt", weights_only=True)["state"]
    ha, hb = a["extensions"]["prune"]["history"], b["extensions"]["prune"]["history"]
    assert hb[: len(ha)] == ha and len(hb) > len(ha)
    cfg = from_dict({k: v for k, v in b["config"].items() if k != "prune"})
    data = load_data(cfg.data, seed=0)
    model = rebuild(build_model(cfg.model, data.info), hb, data.x_test[:2])
    model.load_state_dict(b["model"])  # strict: the twice-pruned architecture
    assert model.conv2.out_channels < a["model"]["conv2.weight"].shape[0]


@pytest.mark.usefixtures("_repo_root")
def test_train_starts_from_a_channel_pruned_model_and_passes_its_architecture_on(source):
    import shutil

    import torch

    pruned = source / "chsrc"
    argv = [*PRUNE, f"--run.out_dir={source}", "--run.max_steps=4", "--prune.granularity=channels",
            "--prune.sweep=0.1", "--prune.sparsity=0.3"]  # fmt: skip
    assert train.main([*argv, f"--prune.source={source}/src", "--run.name=chsrc"],
                      job=prune.PRUNE) == 0  # fmt: skip
    small = torch.load(pruned / "checkpoints/step_00000004/shared.pt", weights_only=True)["state"]
    tuned = [
        "--config", "configs/digits.toml", "--logging.progress=false", f"--run.out_dir={source}",
        "--run.name=tuned", "--run.max_steps=4", "--checkpoint.every_steps=2",
        "--checkpoint.keep=5", f"--model.init_from={pruned}",
    ]  # fmt: skip
    assert train.main(tuned) == 0
    out = torch.load(source / "tuned/checkpoints/step_00000004/shared.pt", weights_only=True)
    state = out["state"]
    assert state["model"]["conv2.weight"].shape == small["model"]["conv2.weight"].shape
    assert state["architecture"] == small["extensions"]["prune"]["history"]
    # resumed: the architecture rebuilt from model.init_from, the same weights
    shutil.copytree(source / "tuned", source / "tuned_cut")
    shutil.rmtree(source / "tuned_cut/checkpoints/step_00000004")
    assert train.main([*tuned, "--run.name=tuned_cut", "--resume"]) == 0
    cut = torch.load(source / "tuned_cut/checkpoints/step_00000004/shared.pt", weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(v, cut["state"]["model"][k]), k
    # and the pruning job starts from the dtrain.train run (its "architecture")
    assert train.main([*argv, f"--prune.source={source}/tuned", "--run.name=again2",
                       "--prune.granularity=weights", "--prune.sweep=0.5"],
                      job=prune.PRUNE) == 0  # fmt: skip


@pytest.mark.usefixtures("_repo_root")
def test_distill_from_and_into_a_channel_pruned_model(source):
    import torch

    from dtrain import distill

    pruned = source / "chkd"
    argv = [*PRUNE, f"--run.out_dir={source}", "--run.max_steps=4", "--prune.granularity=channels",
            "--prune.sweep=0.1", "--prune.sparsity=0.3"]  # fmt: skip
    assert train.main([*argv, f"--prune.source={source}/src", "--run.name=chkd"],
                      job=prune.PRUNE) == 0  # fmt: skip
    small = torch.load(pruned / "checkpoints/step_00000004/shared.pt", weights_only=True)["state"]
    kd = ["--config", "configs/distill/digits_kd.toml", "--logging.progress=false",
          f"--run.out_dir={source}", "--run.name=kd_pruned", "--run.max_steps=3",
          f"--distill.teacher={pruned}", f"--model.init_from={pruned}", "--model.width=16",
          "--distill.features=conv2:conv2"]  # fmt: skip
    assert train.main(kd, job=distill.DISTILL) == 0
    out = torch.load(source / "kd_pruned/checkpoints/step_00000003/shared.pt", weights_only=True)
    state = out["state"]
    # the student is the pruned architecture (rebuilt from its history), and so is the teacher
    assert state["model"]["conv2.weight"].shape == small["model"]["conv2.weight"].shape
    assert state["model"]["conv1.weight"].shape[0] < 16  # of the width-16 source's 16
    assert state["architecture"] == small["extensions"]["prune"]["history"]
    assert out["state"]["extensions"]["distill"]["teacher"].startswith(str(pruned))
    assert not any(k.startswith("distill_adapters") for k in state["model"])  # same shapes
