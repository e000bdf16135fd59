"""``dtrain.train`` with ``engine.name = "deepspeed"`` under torchrun (2 gloo processes on CPU):
ZeRO-1 with DGC against DDP with DGC, its checkpoint (the engine's ZeRO partitions inside
dtrain's) resumed bit for bit, ZeRO-2 with DeepSpeed's own reduction and its bytes counted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.cli import REPO, env, free_port, read_metrics, torchrun

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")

DS_ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".venv/torch_extensions")}  # its C++ op, once
BASE = ["--config", "configs/digits.toml", "--logging.progress=false", "--logging.every_steps=5",
        "--checkpoint.every_steps=10", "--comm.density=0.01"]  # fmt: skip


def train(out: Path, name: str, *args: str) -> None:
    r = torchrun(2, *BASE, f"--run.out_dir={out}", f"--run.name={name}", *args, **DS_ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "final test accuracy" in r.stdout


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    shared = torch.load(run / f"checkpoints/step_{step:08d}/shared.pt", weights_only=True)
    return shared["state"]["model"]


def test_zero1_with_dgc_matches_ddp_and_resumes_bit_for_bit(tmp_path):
    zero1 = ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero1.json"]
    train(tmp_path, "ds", *zero1, "--run.max_steps=20")
    train(tmp_path, "ddp", "--run.max_steps=20")
    ds, ddp = weights(tmp_path / "ds", 20), weights(tmp_path / "ddp", 20)
    for k in ddp:  # the same hook on the same gradients; bucket layouts differ (sum order)
        torch.testing.assert_close(ds[k], ddp[k], rtol=1e-5, atol=1e-6)
    line, ref = ([m for m in read_metrics(tmp_path / r) if m["kind"] == "train"][-1]
                 for r in ("ds", "ddp"))  # fmt: skip
    assert line["step"] == 20
    # DGC's bytes, plus ZeRO-1's all-gather of the updated weights (this rank's half)
    gather = 20 * line["dense_bytes"] // 2
    assert line["bytes_sent_total"] - gather == pytest.approx(ref["bytes_sent_total"], rel=0.02)
    files = sorted(p.name for p in (tmp_path / "ds/checkpoints/step_00000020/deepspeed/state")
                   .iterdir())  # fmt: skip
    assert "mp_rank_00_model_states.pt" in files and len(
        [f for f in files if f.startswith("zero_pp_rank_")]) == 2, files  # fmt: skip

    # the distillation job on the same engine, from that run as its teacher
    r = torchrun(
        2, "--config", "configs/distill/digits_kd.toml", "--logging.progress=false",
        "--logging.every_steps=5", f"--distill.teacher={tmp_path / 'ds'}", *zero1,
        f"--run.out_dir={tmp_path}", "--run.name=kd", "--run.max_steps=10",
        module="dtrain.distill", **DS_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    kd = [m for m in read_metrics(tmp_path / "kd") if m["kind"] == "distill"]
    assert [m["step"] for m in kd] == [5, 10] and all(m["kd_loss"] > 0 for m in kd)

    # the same run, interrupted after its step-10 checkpoint: drop what came later, resume
    shutil.copytree(tmp_path / "ds", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/checkpoints/step_00000020")
    train(tmp_path, "cut", *zero1, "--run.max_steps=20", "--resume")
    resumed = weights(tmp_path / "cut", 20)
    assert all(torch.equal(resumed[k], ds[k]) for k in ds)


def test_zero2_with_deepspeeds_reduction_counts_its_bytes(tmp_path):
    zero2 = ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero2.json",
             "--comm.hook=allreduce", "--run.max_steps=10"]  # fmt: skip
    train(tmp_path, "z2", *zero2)
    line = [m for m in read_metrics(tmp_path / "z2") if m["kind"] == "train"][-1]
    # the whole gradient reduced, and this rank's half of the weights all-gathered
    assert line["bytes_sent"] == pytest.approx(1.5 * line["dense_bytes"], rel=1e-3)
    assert line["dense_bytes"] > 250_000  # the digits CNN's 71,754 fp32 gradients


def test_the_deepspeed_launcher_starts_the_job(tmp_path):
    """``deepspeed --num_accelerators 2 --module dtrain.train ...``: it passes --local_rank and
    sets the ranks in the environment, as torchrun does."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2",
           "--master_port", str(free_port()), "--module", "dtrain.train", *BASE,
           "--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero1.json",
           "--run.max_steps=10", f"--run.out_dir={tmp_path}", "--run.name=launched"]  # fmt: skip
    e = env(DS_ACCELERATOR="cpu", **DS_ENV)
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "final test accuracy" in r.stdout and "10 steps in" in r.stdout
    summary = read_metrics(tmp_path / "launched")[-1]
    assert (summary["kind"], summary["world_size"], summary["steps"]) == ("summary", 2, 10)
    assert (tmp_path / "launched/checkpoints/step_00000010/deepspeed/state").is_dir()
