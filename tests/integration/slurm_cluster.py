"""A real Slurm on this host for integration tests: slurmctld and two slurmd "nodes", n1 and n2.

Both nodes are this machine (``NodeHostname=localhost``, one slurmd per node on its own port),
so a two-node job really goes through sbatch, the scheduler, srun and slurmstepd on each node,
while every byte stays on loopback. Use the fixture factory in a test module::

    cluster = slurm_cluster_fixture()  # module-scoped: the cluster starts once

    def test_job(cluster):
        result = cluster.sbatch("slurm/train.sbatch", "--nodes=2")
        assert result.returncode == 0, cluster.describe(result)

What it needs, and what it does when that is missing:

* ``sbatch``, ``slurmctld``, ``slurmd`` and ``munged``; if one is missing and we are root with
  ``apt-get``, it installs Debian's ``slurm-wlm`` and ``munge`` (``apt-get update`` once), else
  the tests are skipped with the reason;
* root (slurmd runs job steps as the submitting user); skipped otherwise;
* a working munge: an already running ``munged`` is used as it is; otherwise the key
  ``/etc/munge/munge.key`` is created if missing and ``munged`` is started as the munge user,
  and stopped again at teardown.

All state, spool directories, logs and ``slurm.conf`` live in a temporary directory; the daemons
read that ``slurm.conf`` through ``SLURM_CONF``, which :attr:`SlurmCluster.env` also sets for
the clients. Teardown cancels the jobs and stops every daemon it started, by PID, even when a
test failed.
"""

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "slurm_cluster", "slurm_cluster_fixture"]

NODES = ("n1", "n2")
PARTITION = "debug"
_TOOLS = ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged", "munge")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_MUNGE_KEY = Path("/etc/munge/munge.key")


@dataclass
class SlurmCluster:
    """A running cluster: its directory, the environment for clients and the daemons' logs."""

    root: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``sinfo``, ``scontrol`` ...) against this cluster, with
        :attr:`env` updated by ``env``; sbatch hands that environment on to the job."""
        return subprocess.run(
            args,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    def sbatch(
        self, script: str, *args: str, job_args: tuple[str, ...] = (), timeout: float = 300, **kw
    ) -> subprocess.CompletedProcess:
        """``sbatch --wait --parsable`` ``script`` with sbatch options ``args``; its exit code is
        the job's. The job's output goes to ``root/job-<id>.out`` (see :meth:`job_output`)."""
        out = self.root / "job-%j.out"
        cmd = ["sbatch", "--wait", "--parsable", f"--output={out}", *args, script, *job_args]
        return self.run(*cmd, timeout=timeout, **kw)

    def job_output(self, job_id: str) -> str:
        path = self.root / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else f"(no {path})"

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, NumNodes ...); accounting is
        off, but slurmctld keeps finished jobs here (``MinJobAge=0``)."""
        # slurmctld on a loaded 2-core host sometimes misses scontrol's request ("Socket timed
        # out"): ask again for a while before giving up.
        deadline = time.monotonic() + 30
        while True:
            r = self.run("scontrol", "show", "job", "--oneliner", job_id)
            state = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
            if "JobState" in state or time.monotonic() > deadline:
                if "JobState" not in state:
                    state["scontrol_error"] = r.stderr.strip()
                return state
            time.sleep(1)

    def logs(self, pattern: str = "*", tail: int = 40) -> str:
        """The last lines of the daemons' logs (``*.log``, and ``*.out`` their stdout and stderr,
        which alone has errors from before the log file was opened), for failure messages."""
        parts = []
        for path in sorted(self.root.glob(f"log/{pattern}")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def describe(self, result: subprocess.CompletedProcess) -> str:
        """Everything useful when a job failed: sbatch's output, the job's state and output."""
        job_id = result.stdout.strip().split(";")[0]
        text = f"sbatch rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        if job_id.isdigit():
            text += f"\nstate: {self.job_state(job_id)}\n--- job output ---\n"
            text += self.job_output(job_id)
        return text + "\n" + self.logs("*.log")


def _which(tool: str) -> str | None:
    """``tool`` on PATH or in the sbin directories (daemons live there; not always on PATH)."""
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


_install_failed: str | None = None  # why installing failed, so later modules skip at once


def _skip_unless_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get when they are missing; skip if we cannot."""
    global _install_failed
    if all(_which(t) for t in _TOOLS):
        return
    if _install_failed:
        pytest.skip(_install_failed)
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and we are not root to install it")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "slurm-wlm", "munge"],
    ):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]
            why = f"exit code {r.returncode}: {' '.join(last)}" if r.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if why:
            _install_failed = f"installing Slurm failed: {' '.join(cmd)}: {why}"
            pytest.skip(_install_failed)
    missing = [t for t in _TOOLS if not _which(t)]
    if missing:
        _install_failed = f"installed slurm-wlm and munge, but {', '.join(missing)} still missing"
        pytest.skip(_install_failed)


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge(log_dir: Path) -> subprocess.Popen | None:
    """Use a running munged, or start one as the munge user; None when it was running."""
    if _munge_works():
        return None
    munge = pwd.getpwnam("munge")
    if not _MUNGE_KEY.exists():
        # munged refuses a key that others can read; 1024 random bytes is mungekey's default.
        _MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(_MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(_MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    # Without systemd nobody makes munged's socket directory; it must belong to munge.
    run_dir = Path("/run/munge")
    run_dir.mkdir(mode=0o755, exist_ok=True)
    os.chown(run_dir, munge.pw_uid, munge.pw_gid)
    with open(log_dir / "munged.out", "w") as out:  # the child keeps its copy
        proc = subprocess.Popen(
            [_which("munged") or "munged", "--foreground"],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 15
    while not _munge_works():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            msg = (log_dir / "munged.out").read_text(errors="replace")
            pytest.fail(f"munged did not start (`munge -n | unmunge` fails):\n{msg}")
        time.sleep(0.2)
    return proc


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int], cpus: int) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
        f"CPUs={cpus} State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
ClusterName=dtraintest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
MpiDefault=none
ReturnToService=2
# Both "nodes" are this machine: take CPUs from here rather than from what slurmd detects.
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
# 0: keep finished jobs (for job_state()). sbatch --wait then polls every 2 s, rather than
# after 2, 8, 32, 32 ... s, which it does while 2 s is under MinJobAge / 2.
MinJobAge=0
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cancel_jobs(cluster: SlurmCluster, timeout: float = 20) -> None:
    """scancel every job, and wait until none is left running (their steps stop with it)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        cluster.run("scancel", f"--partition={PARTITION}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and cluster.run("squeue", "-h").stdout.strip():
            time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(root: Path, *, start_timeout: float = 60) -> Iterator[SlurmCluster]:
    """Bring up slurmctld and slurmd n1, n2 with their state in ``root``; tear down on exit."""
    _skip_unless_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs jobs as their user)")
    for d in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
        (root / d).mkdir(parents=True, exist_ok=True)
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, ctld_port, node_ports, cpus=len(os.sched_getaffinity(0))))
    # A SLURM_* variable from an enclosing job would leak into our sbatch calls.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    cluster = SlurmCluster(root=root, env={**env, "SLURM_CONF": str(conf)})

    munged = _start_munge(root / "log")
    try:
        commands = {
            "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
            **{f"slurmd-{n}": [_which("slurmd"), "-D", "-N", n, "-f", str(conf)] for n in NODES},
        }
        for name, cmd in commands.items():
            with open(root / "log" / f"{name}.out", "w") as out:  # the child keeps its copy
                cluster.daemons[name] = subprocess.Popen(
                    cmd,
                    env=cluster.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        _wait_idle(cluster, start_timeout)
        yield cluster
    finally:
        if cluster.daemons.get("slurmctld") and cluster.daemons["slurmctld"].poll() is None:
            _cancel_jobs(cluster)
        for proc in reversed(cluster.daemons.values()):
            _stop(proc)
        if munged is not None:
            _stop(munged)


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    """Wait until sinfo shows every node idle; fail with the daemons' logs otherwise."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.daemons.items() if p.poll() is not None]
        if dead:
            pytest.fail(f"{', '.join(dead)} exited while starting:\n{cluster.logs()}")
        r = cluster.run("sinfo", "-h", "-N", "-o", "%N %t")
        states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        if r.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
            return
        time.sleep(0.5)
    pytest.fail(f"nodes not idle after {timeout:.0f} s (sinfo: {states}):\n{cluster.logs()}")


def slurm_cluster_fixture(*, scope: str = "module", name: str = "cluster"):
    """A pytest fixture, named ``name``, that yields a :class:`SlurmCluster` for ``scope``."""

    @pytest.fixture(scope=scope, name=name)
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
        with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster

    return _fixture
