"""Every mistake a user can make gives one line naming it, exit code 2, and writes nothing."""

import os
import sys

import pytest

from dtrain import train
from dtrain.errors import UserError
from tests.integration.cli import single

DIGITS = ["--config", "configs/digits.toml", "--logging.progress=false"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


def snapshot(root):
    if not root.exists():
        return None
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def fails(capsys, argv, message, out_dir):
    before = snapshot(out_dir)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dtrain.train: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(out_dir) == before  # nothing written


def run_ok(argv):
    assert train.main(argv) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "configs/nope.toml"], "config file configs/nope.toml not found"),
        (["--optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["--optim.lr=fast"], "optim.lr must be float"),
        (["--comm.density=2"], "comm.density must be in (0, 1]"),
        (["--engine.name=horovod"], "engine.name must be one of ddp, deepspeed"),
        (
            ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/nope.json"],
            "engine.deepspeed_config = 'configs/nope.json': no such file",
        ),
        (
            ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero2.json"],
            "comm.hook = 'dgc' under DeepSpeed needs ZeRO stage 0 or 1",
        ),
        (["--data.name=cifar10", "--data.path=/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--data.name=text", "--data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["--data.batch_size=64", "--run.grad_accum=3"], "not divisible"),
        (["--data.batch_size=4096"], "lower data.batch_size"),
        (["--run.precision=fp16", "--run.device=cpu"], "needs a GPU"),
        (["--model.name=lstm_lm"], "lstm_lm"),
        (["--comm.hook=powersgd", "--comm.powersgd_start_iter=1"], "powersgd_start_iter must be"),
        (["--checkpoint.resume=/nonexistent/step_00000001"], "/nonexistent/step_00000001"),
    ],
)
def test_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    fails(capsys, [*DIGITS, f"--run.out_dir={out}", *args], message, out)


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1\n")
    fails(capsys, ["--config", str(bad)], "is not valid TOML", tmp_path / "runs")


def test_run_directory_that_cannot_be_made(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails(capsys, [*DIGITS, f"--run.out_dir={blocker}/runs"], "is a file", tmp_path)


def test_checkpoints_from_another_model_world_size_or_run(tmp_path, capsys):
    out = tmp_path / "runs"
    base = [*DIGITS, f"--run.out_dir={out}", "--run.name=a", "--run.max_steps=3"]
    run_ok(base)
    capsys.readouterr()
    # The run directory already holds a run: starting afresh would mix two runs.
    fails(capsys, base, "already holds a run", out)
    # Another model cannot load these weights.
    fails(capsys, [*base, "--resume", "--model.width=32"], "model.width", out)
    # Nor another layout of the optimizer's or the hook's state.
    fails(capsys, [*base, "--resume", "--optim.decay_norm_and_bias=true"], "decay_norm", out)
    fails(capsys, [*base, "--resume", "--comm.hierarchical=true"], "comm.hierarchical", out)
    # Residuals belong to ranks: another world size is refused (checked as a launcher does).
    os.environ["WORLD_SIZE"] = "2"
    try:
        fails(capsys, [*base, "--resume", "--check"], "saved with 1 ranks, this job has 2", out)
    finally:
        del os.environ["WORLD_SIZE"]


def test_the_cli_itself_exits_2_with_one_line(tmp_path):
    r = single("--config", "configs/digits.toml", "--optim.lrr=1", f"--run.out_dir={tmp_path}/r")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "dtrain.train: error: unknown key optim.lrr (did you mean 'optim.lr'?)"
    ]
    assert not (tmp_path / "r").exists()


def test_malformed_launcher_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails(capsys, [*DIGITS, f"--run.out_dir={tmp_path}/runs"], "RANK='zero'", tmp_path / "runs")


def test_check_accepts_fp16_where_a_gpu_would_run_it(tmp_path, capsys, monkeypatch):
    # Launchers run --check before torchrun; fp16 must pass it on a GPU machine (simulated:
    # only the device choice asks CUDA) and still be refused where the job would run on CPU.
    argv = [*DIGITS, f"--run.out_dir={tmp_path}/runs", "--run.precision=fp16", "--check"]
    fails(capsys, argv, "needs a GPU", tmp_path / "runs")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    run_ok(argv)
    assert not (tmp_path / "runs").exists()


def test_wandb_that_cannot_start_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    def cannot_start(cfg, *args, **kwargs):
        raise UserError(f"logging.wandb = {cfg.wandb!r} could not start (no API key): use ...")

    monkeypatch.setattr("dtrain.metrics._start_wandb", cannot_start)
    out = tmp_path / "runs"
    argv = [*DIGITS, f"--run.out_dir={out}", "--logging.wandb=online", "--run.max_steps=2"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err  # the set-up's INFO lines come first: wandb starts last
    errors = [ln for ln in err.splitlines() if ln.startswith("dtrain.train: error: ")]
    assert len(errors) == 1 and "could not start" in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()  # the run directory it had made is gone again


def test_missing_wandb_is_caught_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "runs"
    fails(capsys, [*DIGITS, f"--run.out_dir={out}", "--logging.wandb=offline"], "needs wandb", out)


def test_network_slimming_without_batch_norm_is_one_line(tmp_path, capsys):
    fails(
        capsys,
        [*DIGITS, f"--run.out_dir={tmp_path}", "--optim.bn_l1=1e-4"],
        "optim.bn_l1 = 0.0001 (Network Slimming) needs batch norm layers, and digits_cnn has none",
        tmp_path,
    )
