"""bench/netsim.py: namespaces, shaping, torchrun per namespace, and a tear-down that always runs.

Needs root and ``ip netns``; skipped with the reason otherwise, and skipped when another netsim
cluster is up (the namespace names are fixed, so two clusters cannot coexist).
"""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.cli import REPO, env

pytestmark = pytest.mark.integration

NETSIM = str(REPO / "bench" / "netsim.py")
SELFTEST = str(REPO / "bench" / "netsim_selftest.py")
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
BUSY = "another netsim cluster is up"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "netsim needs root (network namespaces and tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable"
    return None


needs_netns = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _dtrain_names() -> set[str]:
    """Every dtrain-* network namespace and root-namespace link."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in ns.splitlines() if line.strip()}
    names |= {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    return {n for n in names if n.startswith("dtrain-")}


def _skip_if_busy(r: subprocess.CompletedProcess) -> None:
    if r.returncode == 2 and BUSY in r.stderr:
        pytest.skip(r.stderr.strip())


@needs_netns
def test_tiny_run_on_two_shaped_namespaces_measures_bytes_and_leaves_nothing(tmp_path):
    before = _dtrain_names()
    out = tmp_path / "r.json"
    cmd = [
        sys.executable, "bench/bench_netsim.py", "--worlds", "2", "--rates", "100mbit",
        "--hooks", "compute,allreduce,dgc32", "--widths", "256,64,10", "--warmup", "1",
        "--block-warmup", "0", "--steps", "2", "--rounds", "1", "--json", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    _skip_if_busy(r)
    after = _dtrain_names()
    assert r.returncode == 0, r.stderr[-3000:]
    assert after <= before and not any(n.startswith(("dtrain-ns", "dtrain-hub")) for n in after)

    res = json.loads(out.read_text())
    (launch,) = res["launches"]
    assert launch["ok"] and [n["returncode"] for n in launch["nodes"]] == [0, 0]
    assert all(n["tx_bytes"] > 0 and n["rx_bytes"] > 0 for n in launch["nodes"])
    s = res["summary"]["2x100mbit"]
    dense = (256 * 64 + 64 + 64 * 10 + 10) * 4  # fp32 gradient bytes of the MLP
    assert len(s["allreduce"]["step_seconds"]) == 2
    # The wire carries at least the allreduce payload (plus headers); the hook reports it.
    assert all(dense <= tx < 2 * dense for tx in s["allreduce"]["tx_per_step"])
    assert all(dense <= rx < 2 * dense for rx in s["allreduce"]["rx_per_step"])
    assert s["allreduce"]["hook_sent_per_step"] == [dense, dense]
    # DGC sends less than allreduce, measured on the interfaces; no-op hook sends ~nothing.
    assert max(s["dgc32"]["tx_per_step"]) < 0.5 * min(s["allreduce"]["tx_per_step"])
    assert max(s["compute"]["tx_per_step"]) < 0.1 * dense
    assert "| 2 | 100mbit | dgc32 |" in r.stdout


@needs_netns
def test_failing_target_still_tears_down():
    before = _dtrain_names()
    r = subprocess.run(
        [sys.executable, NETSIM, "run", "--nodes", "2", "--rate", "100mbit", "--grace", "5",
         "--", "--no-python", "false"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _skip_if_busy(r)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node 0: exit 1" in r.stdout and "node 1: exit" in r.stdout
    assert _dtrain_names() <= before


@needs_netns
def test_sigterm_tears_down_and_ends_the_nodes():
    before = _dtrain_names()
    if any(n.startswith("dtrain-ns") for n in before):  # its nodes would look like ours
        pytest.skip(f"{BUSY}: {sorted(before)}")
    p = subprocess.Popen(
        [sys.executable, NETSIM, "run", "--nodes", "2", "--rate", "1gbit",
         "--", "--no-python", "sleep", "60"],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and p.poll() is None:
            pids = subprocess.run(["ip", "netns", "pids", "dtrain-ns1"], capture_output=True)
            if pids.stdout.split():
                break
            time.sleep(0.2)
        else:
            _, err = p.communicate(timeout=10)
            if BUSY in err:
                pytest.skip(err.strip())
            pytest.fail(f"nodes did not start: {err[-2000:]}")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert _dtrain_names() <= before


@needs_netns
def test_selftest_measures_the_shaped_rate_and_leaves_nothing():
    before = _dtrain_names()
    r = subprocess.run(
        [sys.executable, SELFTEST, "--rate", "100mbit", "--seconds", "1"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _skip_if_busy(r)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.fullmatch(
        r"rate 100mbit: one way ([\d.]+) Mbit/s; both ways at once ([\d.]+) and ([\d.]+) Mbit/s\n",
        r.stdout,
    )
    assert m and all(30 < float(x) < 110 for x in m.groups()), r.stdout
    assert _dtrain_names() <= before


def test_netsim_imports_only_the_standard_library():
    # netsim.py is what the other bench/ network tools build on (the self-test among them), so
    # it imports none of them; that is also why a lone copy of it runs (the test below).
    tree = ast.parse(Path(NETSIM).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    top = {name.split(".")[0] for name in names}
    assert top <= sys.stdlib_module_names, sorted(top - sys.stdlib_module_names)


def _python_for_nobody(script: str) -> str:
    """A Python that user nobody can start and that can read ``script``: this one, unless its
    venv sits in a folder nobody cannot enter (a clone under /root or a mktemp -d folder);
    else the system's python3 (netsim.py needs only the standard library)."""
    probe = "import sys; open(sys.argv[1]).close()"
    for exe in (sys.executable, shutil.which("python3", path=os.defpath)):
        if exe is None:
            continue
        r = subprocess.run([*AS_NOBODY, exe, "-c", probe, script], cwd="/", capture_output=True)
        if r.returncode == 0:
            return exe
    pytest.skip(f"user nobody can run no Python here that reads {script}")


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="needs root and setpriv (to run as nobody)",
)
def test_without_root_one_line_and_exit_2():
    # Wherever the clone is, nobody may not be able to read it: run a copy of netsim.py from a
    # folder anyone can read.
    with tempfile.TemporaryDirectory(prefix="netsim-nobody-") as tmp:
        os.chmod(tmp, 0o755)
        script = shutil.copy(NETSIM, tmp)
        os.chmod(script, 0o644)
        r = subprocess.run(
            [*AS_NOBODY, _python_for_nobody(script), script, "cleanup"],
            cwd=tmp, env=env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == "netsim needs root (network namespaces and tc): run as root\n"
    assert r.stdout == ""
