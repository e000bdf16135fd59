"""The jobs with ``engine.name = "deepspeed"`` under torchrun (2 gloo processes on CPU): ZeRO-1
with DGC against DDP with DGC, its checkpoint (the engine's ZeRO partitions inside dtrain's)
resumed bit for bit, with CPU offload; ZeRO-2 and ZeRO-3 with DeepSpeed's own reduction and
their bytes counted, ZeRO-3 against DDP and resumed; dtrain.prune's masks and channel removal
under ZeRO-1 against DDP's."""

import json
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

    resume_cut(tmp_path, "ds", *zero1)

    # CPU offload of ZeRO-1's optimizer partition (dtrain's torch SGD steps on it): the same
    zero1_offload = ["--engine.deepspeed_config=configs/deepspeed/zero1_offload.json"]
    train(tmp_path, "offload", *zero1, *zero1_offload, "--run.max_steps=20")
    offloaded = weights(tmp_path / "offload", 20)
    assert all(torch.equal(offloaded[k], ds[k]) for k in ds)


def resume_cut(tmp: Path, run: str, *args: str) -> None:
    """``run`` (20 steps, checkpoints at 10 and 20) interrupted after its step-10 checkpoint:
    what came later dropped and resumed; it ends with the uninterrupted run's weights."""
    shutil.copytree(tmp / run, tmp / "cut")
    shutil.rmtree(tmp / "cut/checkpoints/step_00000020")
    train(tmp, "cut", *args, "--run.max_steps=20", "--resume")
    resumed, whole = weights(tmp / "cut", 20), weights(tmp / run, 20)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    shutil.rmtree(tmp / "cut")


def test_zero2_with_deepspeeds_reduction_counts_its_bytes(tmp_path):
    zero2 = ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero2.json",
             "--comm.hook=allreduce", "--run.max_steps=10"]  # fmt: skip
    train(tmp_path, "z2", *zero2)
    line = [m for m in read_metrics(tmp_path / "z2") if m["kind"] == "train"][-1]
    # the whole gradient reduced, and this rank's half of the weights all-gathered
    assert line["bytes_sent"] == pytest.approx(1.5 * line["dense_bytes"], rel=1e-3)
    assert line["dense_bytes"] > 250_000  # the digits CNN's 71,754 fp32 gradients


def test_zero3_matches_ddp_counts_its_gathers_and_resumes(tmp_path):
    # every parameter partitioned (by default ZeRO-3 keeps those under 100k entries whole,
    # which is all of the digits CNN's)
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}))  # fmt: skip
    zero3 = ["--engine.name=deepspeed", f"--engine.deepspeed_config={config}",
             "--comm.hook=allreduce", "--run.max_steps=20"]  # fmt: skip
    train(tmp_path, "z3", *zero3)
    train(tmp_path, "ddp", "--comm.hook=allreduce", "--run.max_steps=20")
    z3, ddp = weights(tmp_path / "z3", 20), weights(tmp_path / "ddp", 20)
    assert {k: v.shape for k, v in z3.items()} == {k: v.shape for k, v in ddp.items()}
    for k in ddp:  # the whole model in the checkpoint, gathered from the partitions
        torch.testing.assert_close(z3[k], ddp[k], rtol=1e-5, atol=1e-6)
    line = [m for m in read_metrics(tmp_path / "z3") if m["kind"] == "train"][-1]
    # measured: the gradients reduce-scattered, and the parameters this rank holds (half)
    # all-gathered for the layers' forward and backward at least once
    assert 1.5 <= line["bytes_sent"] / line["dense_bytes"] < 3.0, line
    resume_cut(tmp_path, "z3", *zero3)

    # ZeRO-3 with the optimizer state and the parameters offloaded to the CPU: the same
    train(tmp_path, "z3off", *zero3[:-1], "--engine.deepspeed_config=configs/deepspeed/"
          "zero3_offload.json", "--run.max_steps=20")  # fmt: skip
    z3off = weights(tmp_path / "z3off", 20)
    for k in ddp:
        torch.testing.assert_close(z3off[k], ddp[k], rtol=1e-5, atol=1e-6)


def test_prune_under_zero1_with_dgc_matches_ddp(tmp_path):
    """Lottery-ticket masks with rewinds (the weights changed in place: ZeRO-1's master copy
    follows, else its next step undoes the rewind) and channel removal (a new engine on the
    smaller model, the old one released) give DDP's weights."""
    train(tmp_path, "src", "--comm.hook=allreduce", "--run.max_steps=20")
    zero1 = ["--engine.name=deepspeed", "--engine.deepspeed_config=configs/deepspeed/zero1.json"]
    prune = ["--config", "configs/prune/digits_global90.toml", "--logging.progress=false",
             "--logging.every_steps=5", f"--prune.source={tmp_path / 'src'}",
             "--comm.density=0.05", "--run.max_steps=10", f"--run.out_dir={tmp_path}"]  # fmt: skip
    lottery = ["--prune.method=lottery", "--prune.rewind=init", "--prune.rounds=2"]
    channels = ["--prune.granularity=channels", "--prune.sparsity=0.5"]
    for name, args in {"ds": [*zero1, *lottery], "ddp": lottery, "ds_ch": [*zero1, *channels],
                       "ddp_ch": channels}.items():  # fmt: skip
        r = torchrun(2, *prune, f"--run.name={name}", *args, module="dtrain.prune", **DS_ENV)
        assert r.returncode == 0, r.stderr[-4000:]
    ds, ddp = weights(tmp_path / "ds", 10), weights(tmp_path / "ddp", 10)
    report = json.loads((tmp_path / "ds/prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)
    for k in ddp:  # the pruned weights stay exactly zero (ZeRO-1's master copy does not undo)
        torch.testing.assert_close(ds[k], ddp[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(ds[k] == 0, ddp[k] == 0)
    ds_ch, ddp_ch = weights(tmp_path / "ds_ch", 10), weights(tmp_path / "ddp_ch", 10)
    assert sum(v.numel() for v in ds_ch.values()) < 0.6 * sum(v.numel() for v in ds.values())
    for k in ddp_ch:  # the smaller model, trained alike
        torch.testing.assert_close(ds_ch[k], ddp_ch[k], rtol=1e-5, atol=1e-6)


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
