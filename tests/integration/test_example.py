"""The README's plain-DDP example (two lines of dtrain in a DDP script) under torchrun."""

import re
import subprocess
import sys

import pytest

from tests.integration.cli import REPO, env, free_port

pytestmark = pytest.mark.integration


def test_the_two_line_recipe_trains_and_reports_its_ratio():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dtrain.examples.digits", "--epochs", "5", "--warmup-epochs", "1",
           "--density", "0.01"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"final test accuracy ([\d.]+)% \| compression ratio (\d+)x", r.stdout)
    assert m, r.stdout
    accuracy, ratio = float(m.group(1)), int(m.group(2))
    assert accuracy > 80  # 10 classes: chance is 10%
    assert ratio > 5  # DGC's bytes, warm-up included, against DDP's allreduce
    assert "moved SGD momentum 0.9" in r.stderr  # register_dgc said what it did
