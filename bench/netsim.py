"""A simulated slow cluster on one machine: network namespaces, a bridge, ``tc tbf`` shaping.

Each "node" is a network namespace ``dtrain-ns<i>`` with one veth interface ``dtrain-v<i>``
(address ``10.77.0.<i+1>/24``) whose peer ``dtrain-h<i>`` is a port of the bridge ``dtrain-br``.
The bridge lives in its own namespace ``dtrain-hub``, so nothing is added to the root namespace
and the 10.77.0.0/24 addresses exist only inside namespaces this module made. One
``torchrun`` node runs in every namespace; gloo talks over the veths, so its bytes cross the
shaped links and show up in the interfaces' counters.

Commands (as root; from the repository root)::

    .venv/bin/python bench/netsim.py run --nodes 2 --rate 1gbit --nproc-per-node 1 \\
        --threads 1 --timeout 600 -- -m dtrain.train --config configs/digits.toml
    .venv/bin/python bench/netsim.py cleanup                          # remove dtrain-* leftovers

``run`` starts in namespace i (the part after ``--`` is torchrun's script or ``-m module``)::

    ip netns exec dtrain-ns<i> env GLOO_SOCKET_IFNAME=dtrain-v<i> OMP_NUM_THREADS=<threads> \\
        python -m torch.distributed.run --nnodes=N --node_rank=i --nproc_per_node=P \\
        --master_addr=10.77.0.1 --master_port=29500 <script or -m module> <args>

waits for every node (``--timeout``; after the first failure the others get ``--grace`` seconds),
prints each node's exit code and the bytes its interface sent and received (counter deltas of
``dtrain-v<i>`` over the run, Ethernet/IP/TCP headers included) and always removes everything it
made: on success, on failure, on Ctrl-C, SIGTERM or SIGHUP. A ``SIGKILL`` cannot be caught;
``cleanup`` (or the next run, which removes leftovers of its own names first) cleans up then.
``bench/netsim_selftest.py --rate 100mbit`` measures what the shaping delivers; it builds on
this module (which needs only the standard library and imports nothing else of ``bench/``).
Only one netsim cluster can exist at a time (the names are fixed): a lock file
``/run/lock/dtrain-netsim.lock`` makes a second run fail with one line instead of tearing down
the first one's namespaces.

Shaping. ``--rate`` is ``unlimited`` (no qdisc), ``10gbit``, ``1gbit``, ``100mbit`` (or any
``<n>kbit|mbit|gbit``). Each namespace's interface gets
``tc qdisc add dev dtrain-v<i> root tbf rate <R> burst <B> latency 100ms``: a token bucket on the
node's *egress*. A transfer from node a to node b leaves through a's shaped interface and arrives
on b's unshaped ingress, so shaping egress only limits both directions of every pair, each by its
sender: every node has a full-duplex NIC of rate R, as on a switch. The burst B is 10 ms of
traffic at the rate (R/8/100 bytes) but at least 128 KiB: large enough that the kernel's
segmentation-offload packets (up to 64 KiB) and timer granularity do not throttle the link below
R, small enough that the bucket does not hand out a noticeable free burst per step. ``latency``
bounds the tbf queue (100 ms of traffic plus the burst), not the propagation delay.

Latency is not simulated: the ``netem`` qdisc is not available in this machine's kernel
(``tc qdisc add ... netem`` answers "Specified qdisc kind is unknown"), so the links have the
veth's microseconds of delay. A real network adds a round-trip time per message round of every
collective (a ring allreduce of W ranks has 2(W-1) rounds per bucket); that cost has to be
modelled on paper, it is not measured here.

Processes run as the caller (root); ``OMP_NUM_THREADS`` is set explicitly because torchrun sets
it to 1 only when it starts several processes on a node. ``GLOO_SOCKET_IFNAME`` is required:
without it gloo picks an address by hostname and fails after ~60 s with "connectFullMesh ...
Connection refused".
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "RATES",
    "Cluster",
    "NodeResult",
    "burst_bytes",
    "cleanup",
    "parse_rate",
    "read_counters",
    "run_guarded",
    "run_torchrun",
]

PREFIX = "dtrain-"
HUB = "dtrain-hub"
BRIDGE = "dtrain-br"
SUBNET = "10.77.0"
LATENCY = "100ms"
MIN_BURST = 128 * 1024
LOCK_FILE = Path("/run/lock/dtrain-netsim.lock")
RATES = ("unlimited", "10gbit", "1gbit", "100mbit")
ROOT_MESSAGE = "netsim needs root (network namespaces and tc): run as root"
_OWN_NETNS = re.compile(r"^dtrain-(hub|ns\d+)$")
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class NetsimError(RuntimeError):
    """A problem the user can fix (not root, a busy lock, a bad rate): one line, exit code 2."""


# ---------------------------------------------------------------------------------- shaping


def parse_rate(rate: str) -> float | None:
    """``"100mbit"`` -> 1e8 bits/s; ``"unlimited"`` -> None."""
    if rate == "unlimited":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if not m or float(m.group(1)) <= 0:
        raise NetsimError(f"bad rate {rate!r}: use unlimited or <n>kbit|mbit|gbit, e.g. 100mbit")
    return float(m.group(1)) * _UNITS[m.group(2)]


def burst_bytes(bits_per_s: float) -> int:
    """tbf burst: 10 ms of traffic at the rate, at least 128 KiB (see the module docstring)."""
    return max(int(bits_per_s / 8 / 100), MIN_BURST)


# ---------------------------------------------------------------------------------- commands


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetsimError(ROOT_MESSAGE)
    if _sh("ip", "netns", "list", check=False).returncode != 0:
        raise NetsimError("netsim needs `ip netns` (iproute2) and network namespaces")


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_root_links() -> list[str]:
    """Interface names in the root namespace."""
    out = _sh("ip", "-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL what is still running inside ``ns`` (processes netsim started there)."""
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove(namespaces: Sequence[str], links: Sequence[str]) -> list[str]:
    for ns in namespaces:
        _kill_netns_pids(ns)
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)
    for link in links:
        _sh("ip", "link", "del", link, check=False)
    return [*namespaces, *links]


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise NetsimError(
                f"another netsim cluster is up (pid {holder}, lock {LOCK_FILE}); wait for it "
                "to finish, or stop that process"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def cleanup() -> list[str]:
    """Remove every ``dtrain-*`` namespace and root-namespace link; returns what was removed.

    Refuses (NetsimError) while a netsim cluster is up, so that it cannot pull the namespaces
    from under a running benchmark.
    """
    require_root()
    with _lock():
        namespaces = [n for n in list_netns() if n.startswith(PREFIX)]
        links = [link for link in list_root_links() if link.startswith(PREFIX)]
        return _remove(namespaces, links)


# ---------------------------------------------------------------------------------- cluster


def read_counters(ns: str, iface: str) -> tuple[int, int]:
    """``(tx_bytes, rx_bytes)`` of ``iface`` inside namespace ``ns``."""
    out = _sh("ip", "-n", ns, "-j", "-s", "link", "show", "dev", iface).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


@dataclass
class Cluster:
    """N namespaces on a bridge, egress shaped at ``rate``; a context manager.

    ``with Cluster(2, "100mbit") as c:`` builds it (removing leftovers of an earlier run that
    was killed) and tears it down on exit, whatever happened inside.
    """

    nodes: int
    rate: str = "unlimited"
    latency: str = LATENCY
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 200:
            raise NetsimError(f"--nodes must be in [1, 200], got {self.nodes}")
        self.bits_per_s = parse_rate(self.rate)

    # names and addresses
    @staticmethod
    def ns(i: int) -> str:
        return f"dtrain-ns{i}"

    @staticmethod
    def iface(i: int) -> str:
        return f"dtrain-v{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def counters(self, i: int) -> tuple[int, int]:
        return read_counters(self.ns(i), self.iface(i))

    def exec_argv(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None) -> list:
        """``ip netns exec dtrain-ns<i> env K=V ... argv``."""
        pairs = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", self.ns(i), "env", *pairs, *argv]

    # life cycle
    def __enter__(self) -> Cluster:
        require_root()
        self._stack.enter_context(_lock())
        try:
            stale = [n for n in list_netns() if _OWN_NETNS.match(n)]
            if stale:
                print(f"netsim: removing leftovers of an earlier run: {stale}", file=sys.stderr)
                _remove(stale, [])
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self) -> None:
        self._stack.callback(self._teardown)
        _sh("ip", "netns", "add", HUB)
        _sh("ip", "-n", HUB, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0")
        _sh("ip", "-n", HUB, "link", "set", BRIDGE, "up")
        for i in range(self.nodes):
            ns, v, h = self.ns(i), self.iface(i), f"dtrain-h{i}"
            _sh("ip", "netns", "add", ns)
            # Both ends are created directly inside their namespaces: nothing in the root one.
            _sh("ip", "link", "add", v, "netns", ns, "type", "veth", "peer", "name", h,
                "netns", HUB)  # fmt: skip
            _sh("ip", "-n", HUB, "link", "set", h, "master", BRIDGE, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", v)
            _sh("ip", "-n", ns, "link", "set", v, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.bits_per_s is not None:
                _sh("tc", "-n", ns, "qdisc", "add", "dev", v, "root", "tbf",
                    "rate", f"{int(self.bits_per_s)}bit",
                    "burst", f"{burst_bytes(self.bits_per_s)}b",
                    "latency", self.latency)  # fmt: skip

    def _teardown(self) -> None:
        names = [self.ns(i) for i in range(self.nodes)] + [HUB]
        with _signals_ignored():
            _remove([n for n in names if n in set(list_netns())], [])

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Tear-down must not be interrupted half-way by a second Ctrl-C or SIGTERM."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise SystemExit, so that ``finally`` blocks tear the cluster down."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def run_guarded(work: Callable[[], T]) -> tuple[int, T | None]:
    """``(0, work())``, or a command line's exit code for what a user can cause: a NetsimError
    (its one line, 2) or Ctrl-C (130); signal handlers installed first."""
    install_signal_handlers()
    try:
        return 0, work()
    except NetsimError as e:
        print(e, file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("netsim: interrupted; namespaces removed", file=sys.stderr)
        return 130, None


# ---------------------------------------------------------------------------------- torchrun


@dataclass
class NodeResult:
    """One torchrun node: its exit code, interface bytes over the run, and its output."""

    node: int
    returncode: int | None  # None: still running at the timeout (or after --grace), stopped
    tx_bytes: int
    rx_bytes: int
    seconds: float
    log: str


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group (torchrun then stops its workers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def run_torchrun(
    cluster: Cluster,
    target: Sequence[str],
    *,
    nproc_per_node: int = 1,
    threads: int = 1,
    timeout: float = 600.0,
    grace: float = 30.0,
    master_port: int = 29500,
    env: dict[str, str] | None = None,
    log_dir: str | Path | None = None,
) -> list[NodeResult]:
    """Start one torchrun node per namespace of ``cluster``, wait for all, return their results.

    Args:
        cluster: an entered :class:`Cluster`.
        target: torchrun's training script and its arguments, or ``["-m", module, ...]``.
        nproc_per_node: processes per namespace (they talk to each other over ``lo``, unshaped).
        threads: ``OMP_NUM_THREADS`` of every process.
        timeout: seconds for the whole run; nodes still running then are stopped.
        grace: seconds the other nodes get after one node failed (then they are stopped).
        master_port: TCP port of the rendezvous store on node 0 (the namespaces are fresh).
        env: extra environment for every node.
        log_dir: where ``node<i>.log`` (stdout and stderr) goes; a temporary directory if None.
    """
    n = cluster.nodes
    logs = Path(log_dir or tempfile.mkdtemp(prefix="dtrain-netsim-"))
    logs.mkdir(parents=True, exist_ok=True)
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    before = [cluster.counters(i) for i in range(n)]
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    ends: list[float | None] = [None] * n
    try:
        for i in range(n):
            node_env = {
                "GLOO_SOCKET_IFNAME": cluster.iface(i),
                "OMP_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
            argv = cluster.exec_argv(
                i,
                [
                    sys.executable, "-m", "torch.distributed.run",
                    f"--nnodes={n}", f"--node_rank={i}", f"--nproc_per_node={nproc_per_node}",
                    f"--master_addr={cluster.addr(0)}", f"--master_port={master_port}",
                    *target,
                ],
                node_env,
            )  # fmt: skip
            with open(logs / f"node{i}.log", "w") as f:
                f.write("$ " + " ".join(argv) + "\n")
                f.flush()
                procs.append(
                    subprocess.Popen(
                        argv, stdout=f, stderr=subprocess.STDOUT, env=base, start_new_session=True
                    )
                )
        deadline = t0 + timeout
        while any(e is None for e in ends) and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic()
                    if p.returncode != 0:
                        deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.1)
    finally:
        for p in procs:
            _stop(p)
    after = [cluster.counters(i) for i in range(n)]
    return [
        NodeResult(
            node=i,
            returncode=p.returncode if ends[i] is not None else None,
            tx_bytes=after[i][0] - before[i][0],
            rx_bytes=after[i][1] - before[i][1],
            seconds=(ends[i] or time.monotonic()) - t0,
            log=str(logs / f"node{i}.log"),
        )
        for i, p in enumerate(procs)
    ]


# ---------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="torchrun one node per namespace: run [options] -- target")
    r.add_argument("--nodes", type=int, default=2)
    r.add_argument("--rate", default="unlimited", help="unlimited, 10gbit, 1gbit, 100mbit, ...")
    r.add_argument("--nproc-per-node", type=int, default=1)
    r.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("--grace", type=float, default=30.0)
    r.add_argument("--master-port", type=int, default=29500)
    r.add_argument("--log-dir", help="node<i>.log files (default: a temporary directory)")
    r.add_argument("--json", help="write the per-node results here")
    r.add_argument("target", nargs=argparse.REMAINDER, help="-- script.py args | -- -m mod args")
    sub.add_parser("cleanup", help="remove leftover dtrain-* namespaces and links")
    args = ap.parse_args(argv)

    if args.cmd == "cleanup":
        code, removed = run_guarded(cleanup)
        if not code:
            print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
        return code

    def run() -> list[NodeResult]:
        target = args.target[1:] if args.target[:1] == ["--"] else args.target
        if not target:
            raise NetsimError("run needs a target after --: a script and its arguments, or -m mod")
        with Cluster(args.nodes, args.rate) as c:
            return run_torchrun(
                c,
                target,
                nproc_per_node=args.nproc_per_node,
                threads=args.threads,
                timeout=args.timeout,
                grace=args.grace,
                master_port=args.master_port,
                log_dir=args.log_dir,
            )

    code, results = run_guarded(run)
    if results is None:
        return code
    for res in results:
        code = "stopped" if res.returncode is None else res.returncode
        print(
            f"node {res.node}: exit {code}, {res.seconds:.1f} s, sent {res.tx_bytes:,} B, "
            f"received {res.rx_bytes:,} B, log {res.log}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([vars(x) for x in results], indent=2) + "\n")
    return 0 if all(x.returncode == 0 for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
