"""The Lightning example under torchrun (2 gloo processes on CPU): DGCStrategy registers the
hook where Lightning's own DDPStrategy would not (CPU), and its per-rank state survives a
checkpoint and a resume."""

import re
import subprocess
import sys

import pytest
import torch

from tests.integration.cli import REPO, env, free_port

pytestmark = pytest.mark.integration
pytest.importorskip("lightning")

SUMMARY = re.compile(
    r"final test accuracy ([\d.]+)% \| compression ratio (\d+)x \| dgc steps (\d+) \| "
    r"parameters sha256 ([0-9a-f]{64})"
)


def run(*args: str) -> tuple[float, int, int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dtrain.examples.lightning_digits", "--density", "0.01", *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout
    return float(m[1]), int(m[2]), int(m[3]), m[4]


def test_dgc_under_lightning_on_cpu_resumes_bit_for_bit(tmp_path):
    accuracy, ratio, steps, sha = run("--epochs", "3")
    assert accuracy > 75 and ratio > 5 and steps > 0  # the hook ran, on CPU
    ckpt = tmp_path / "ckpt"
    _, _, cut_steps, _ = run("--epochs", "2", "--checkpoint-dir", str(ckpt))
    assert cut_steps == 2 * steps // 3
    ranks = [torch.load(ckpt / f"last.ckpt.dgc/dgc_state_rank{r}.pt", weights_only=True)
             for r in (0, 1)]  # fmt: skip
    assert [s["iter"] for s in ranks] == [cut_steps, cut_steps]
    assert not torch.equal(ranks[0]["params"]["net.fc1.weight"]["v"],
                           ranks[1]["params"]["net.fc1.weight"]["v"])  # fmt: skip
    assert run("--epochs", "3", "--checkpoint-dir", str(ckpt), "--resume") == (
        accuracy, ratio, steps, sha,
    )  # fmt: skip
