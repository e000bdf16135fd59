"""Run a function on several gloo ranks in spawned processes and collect what each returns.

For tests and benchmarks on one machine: each rank is a fresh process (``spawn``) that joins a
gloo group through a file in a temporary directory, runs ``fn(rank, world, *args, **kwargs)``
and hands its result back through ``torch.save``.
"""

import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks"]


def _worker(
    rank: int,
    world: int,
    init_file: str,
    out_dir: str,
    threads: int,
    fn: Callable,
    args: tuple,
    kwargs: dict,
) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        result = fn(rank, world, *args, **kwargs)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    # Every collective has completed once fn returns; leaving with os._exit skips the
    # interpreter teardown in which gloo sometimes aborts ("terminate called without an active
    # exception").
    os._exit(0)


def run_ranks(
    fn: Callable,
    world: int,
    *args: Any,
    threads: int = 1,
    timeout: float = 180.0,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(rank, world, *args, **kwargs) for rank in range(world)]``, each in its own process.

    Args:
        fn: a module-level function (it is pickled into the spawned processes).
        world: number of ranks.
        *args: passed to ``fn`` after rank and world size.
        threads: ``torch.set_num_threads`` in every rank.
        timeout: seconds to wait for the ranks; ranks still running then (a deadlock) are killed.
        **kwargs: passed to ``fn``.

    Returns:
        What each rank's ``fn`` returned, by rank.

    Raises:
        RuntimeError: a rank raised (with its traceback), hung, or exited abnormally.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world, init_file, tmp, threads, fn, args, kwargs))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [
            Path(tmp, f"{r}.err").read_text()
            for r in range(world)
            if Path(tmp, f"{r}.err").exists()
        ]
        if errors:
            raise RuntimeError("rank failed:\n" + "\n".join(errors))
        if hung:
            raise RuntimeError(f"ranks {hung} still running after {timeout}s (deadlock?)")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} exited with {[procs[r].exitcode for r in bad]}")
        return [torch.load(Path(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]
