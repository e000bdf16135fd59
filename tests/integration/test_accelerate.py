"""The Accelerate example under ``accelerate launch`` (2 gloo processes on CPU): DGC registered
on Accelerate's DDP model, its per-rank state saved and restored with save_state/load_state."""

import re
import subprocess
import sys

import pytest
import torch

from tests.integration.cli import REPO, env, free_port

pytestmark = pytest.mark.integration
pytest.importorskip("accelerate")

SUMMARY = re.compile(
    r"final test accuracy ([\d.]+)% \| compression ratio (\d+)x \| epochs (\d+) \| "
    r"parameters sha256 ([0-9a-f]{64})"
)


def launch(tmp_path, *args: str, launcher: str = "accelerate") -> subprocess.CompletedProcess:
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_port())]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    cmd += ["-m", "dtrain.examples.accelerate_digits", "--density", "0.01", *args]
    e = env(HF_HOME=str(tmp_path / "hf"), ACCELERATE_USE_CPU="true")
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def summary(r: subprocess.CompletedProcess) -> tuple[float, int, int, str]:
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout
    return float(m[1]), int(m[2]), int(m[3]), m[4]


def test_resumed_from_save_state_it_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path):
    whole = summary(launch(tmp_path, "--epochs", "4"))
    assert whole[0] > 80 and whole[1] > 5  # accuracy %, compression ratio
    # plain torchrun with Accelerator(cpu=True): the same processes, the same result
    assert summary(launch(tmp_path, "--epochs", "4", launcher="torchrun")) == whole
    ckpt = tmp_path / "ckpt"
    cut = launch(tmp_path, "--epochs", "4", "--stop-after", "2", "--checkpoint-dir", str(ckpt))
    assert summary(cut)[2] == 2
    saved = ckpt / "epoch_2"
    files = {p.name for p in saved.iterdir()}
    assert {"dgc_state_rank0.pt", "dgc_state_rank1.pt"} <= files, files
    r0, r1 = (torch.load(saved / f"dgc_state_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    fc1_0, fc1_1 = r0["params"]["fc1.weight"], r1["params"]["fc1.weight"]  # compressed
    assert not torch.equal(fc1_0["v"], fc1_1["v"])  # each rank's residual is its own
    assert r0["iter"] > 0 and r0["bytes_sent_total"] > 0

    resumed = launch(tmp_path, "--epochs", "4", "--resume", str(saved))
    assert "resumed from" in resumed.stdout and "after epoch 2" in resumed.stdout
    accuracy, ratio, epochs, sha = summary(resumed)
    assert epochs == 4 and ratio > 5 and accuracy > 80
    assert sha == whole[3]  # the residuals, momenta and counters came back on every rank

    # Without the DGC files the run cannot continue as it was: one clear error, not a silent
    # restart of the residuals.
    (saved / "dgc_state_rank1.pt").unlink()
    cmd_fail = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         "-m", "dtrain.examples.accelerate_digits", "--density", "0.01", "--epochs", "4",
         "--resume", str(saved)],
        cwd=REPO, env=env(HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert cmd_fail.returncode != 0
    assert "dgc_state_rank1.pt not found" in cmd_fail.stderr
