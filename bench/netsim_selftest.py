"""Measure the shaped rate between two namespaces of a netsim cluster (``bench/netsim.py``).

As root, from the repository root::

    .venv/bin/python bench/netsim_selftest.py --rate 100mbit     # measured Mbit/s, 2 nodes

A receiver in one namespace counts the bytes a sender in the other pushes through the shaped
veths for a few seconds (one way, then both ways at once). The sender and receiver run as this
file's hidden subcommands inside the namespaces::

    python bench/netsim_selftest.py _recv --port P --seconds S
    python bench/netsim_selftest.py _send --addr A --port P --seconds S

This file builds on netsim's :class:`Cluster`; netsim.py imports nothing from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from netsim import Cluster, _stop, run_guarded

__all__ = ["selftest"]


def _recv(port: int, seconds: float) -> None:
    """Hidden subcommand: accept one connection, count bytes for ``seconds``, print JSON."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            total, first = 0, None
            while True:
                got = conn.recv_into(buf)
                if not got:
                    break
                first = first or time.monotonic()
                total += got
                if time.monotonic() - first >= seconds:
                    break
            dt = time.monotonic() - (first or time.monotonic())
    print(json.dumps({"bytes": total, "seconds": dt}), flush=True)


def _send(addr: str, port: int, seconds: float) -> None:
    """Hidden subcommand: send as fast as possible to ``addr:port`` until the peer closes."""
    payload = os.urandom(1 << 20)
    end = time.monotonic() + seconds + 5.0
    with socket.create_connection((addr, port), timeout=10) as s, contextlib.suppress(OSError):
        while time.monotonic() < end:
            s.sendall(payload)


def _measure(cluster: Cluster, pairs: Sequence[tuple[int, int]], seconds: float) -> list[float]:
    """Run a receiver in b and a sender in a for every (a, b), concurrently; Mbit/s of each."""
    me = [sys.executable, os.path.abspath(__file__)]
    recvs, sends = [], []
    try:
        for k, (_, b) in enumerate(pairs):
            p = subprocess.Popen(
                cluster.exec_argv(b, [*me, "_recv", "--port", str(5201 + k), "--seconds",
                                      str(seconds)]),
                stdout=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("selftest receiver did not start")
            recvs.append(p)
        for k, (a, b) in enumerate(pairs):
            argv = [*me, "_send", "--addr", cluster.addr(b), "--port", str(5201 + k)]
            sends.append(
                subprocess.Popen(
                    cluster.exec_argv(a, [*argv, "--seconds", str(seconds)]),
                    start_new_session=True,
                )
            )
        results = []
        for p in recvs:
            out, _ = p.communicate(timeout=seconds + 30)
            r = json.loads(out.strip().splitlines()[-1])
            results.append(8 * r["bytes"] / r["seconds"] / 1e6)
        return results
    finally:
        for p in recvs + sends:
            _stop(p)


def selftest(rate: str, seconds: float = 2.0) -> dict[str, float]:
    """Measure the shaped rate between two namespaces: one way, then both ways at once."""
    with Cluster(2, rate) as c:
        (one_way,) = _measure(c, [(0, 1)], seconds)
        both = _measure(c, [(0, 1), (1, 0)], seconds)
    return {"one_way_mbit": one_way, "ns0_to_ns1_mbit": both[0], "ns1_to_ns0_mbit": both[1]}


def _hidden(argv: Sequence[str]) -> int:
    """``_recv``/``_send``: the two ends of a measurement, run inside the namespaces."""
    ap = argparse.ArgumentParser(prog="netsim_selftest.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("_recv", "_send"):
        h = sub.add_parser(name)
        h.add_argument("--addr", default="")
        h.add_argument("--port", type=int, required=True)
        h.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    if args.cmd == "_recv":
        _recv(args.port, args.seconds)
    else:
        _send(args.addr, args.port, args.seconds)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["_recv"], ["_send"]):
        return _hidden(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit", help="unlimited, 10gbit, 1gbit, 100mbit, ...")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    args = ap.parse_args(argv)
    code, res = run_guarded(lambda: selftest(args.rate, args.seconds))
    if res is None:
        return code
    print(
        f"rate {args.rate}: one way {res['one_way_mbit']:.1f} Mbit/s; both ways at once "
        f"{res['ns0_to_ns1_mbit']:.1f} and {res['ns1_to_ns0_mbit']:.1f} Mbit/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
