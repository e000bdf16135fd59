"""Checkpointer on 2 gloo ranks: one file per rank, each rank loads back its own state."""

from pathlib import Path

import torch

import dtrain.checkpoint as ckpt_mod
from dtrain.checkpoint import Checkpointer, rng_state, set_rng_state
from dtrain.config import CheckpointConfig
from dtrain.errors import UserError, should_print
from tests.distributed.harness import run_ranks


def _save_and_load(rank: int, world: int, run_dir: str) -> dict:
    ck = Checkpointer(CheckpointConfig(keep=1), Path(run_dir), rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # RNG streams differ by rank, like the data augmentation
    complete_on_return = []
    for step in (10, 20):
        shared = {"w": torch.full((2,), float(step)), "step": step} if rank == 0 else {}
        per_rank = {"residual": torch.full((3,), float(rank + step)), "rng": rng_state()}
        path = ck.save(step, shared, per_rank)
        complete_on_return.append((path / "COMPLETE").is_file())
    expected_next = torch.rand(4)  # what this rank draws after the step-20 checkpoint
    torch.manual_seed(999)
    shared, mine = Checkpointer(
        CheckpointConfig(resume="auto"), Path(run_dir), rank=rank, world_size=world
    ).load(ck.latest())
    set_rng_state(mine["rng"])
    torch.distributed.barrier()  # both have loaded before rank 0 damages the checkpoint
    # Each rank reads only its own file: rank 1's missing file is refused on rank 1 alone.
    if rank == 0:
        (ck.latest() / "rank_00001.pt").rename(ck.latest() / "moved.pt")
    torch.distributed.barrier()
    refused = ""
    try:
        ck.load(ck.latest())
    except UserError as e:
        refused = str(e)
    return {
        "complete_on_return": complete_on_return,
        "dirs": sorted(p.name for p in ck.dir.iterdir()),
        "shared_step": shared["step"],
        "residual": mine["residual"],
        "rng_matches": torch.equal(torch.rand(4), expected_next),
        "refused": refused,
    }


def test_each_rank_saves_and_loads_its_own_state(tmp_path):
    r0, r1 = run_ranks(_save_and_load, 2, str(tmp_path / "run"), timeout=120)
    for rank, r in enumerate((r0, r1)):
        assert r["complete_on_return"] == [True, True]  # no rank returns before COMPLETE
        assert r["dirs"] == ["step_00000020"]  # keep=1, no tmp left
        assert r["shared_step"] == 20
        assert torch.equal(r["residual"], torch.full((3,), float(rank + 20)))
        assert r["rng_matches"]
    files = sorted(p.name for p in (tmp_path / "run/checkpoints/step_00000020").iterdir())
    assert files == ["COMPLETE", "moved.pt", "rank_00000.pt", "shared.pt"]
    assert r0["refused"] == ""
    assert "lacks rank_00001.pt" in r1["refused"]


def _one_rank_fails(rank: int, world: int, run_dir: str) -> dict:
    ck = Checkpointer(CheckpointConfig(), Path(run_dir), rank=rank, world_size=world)
    ck.save(10, {"step": 10}, {})
    real_save = torch.save

    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    if rank == 1:
        ckpt_mod.torch.save = disk_full
    try:
        ck.save(20, {"step": 20}, {})
        error, printed = "", False
    except UserError as e:
        error, printed = str(e), should_print(e, rank)
    finally:
        ckpt_mod.torch.save = real_save
    return {"error": error, "printed": printed, "latest": ck.latest().name}


def test_a_rank_that_cannot_write_fails_every_rank_without_hanging(tmp_path):
    r0, r1 = run_ranks(_one_rank_fails, 2, str(tmp_path / "run"), timeout=120)
    assert "failed on another rank" in r0["error"]
    assert "No space left on device" in r1["error"]
    # One line for the job: the rank that failed prints it (not rank 0, which only exits 2).
    assert (r0["printed"], r1["printed"]) == (False, True)
    assert r0["latest"] == r1["latest"] == "step_00000010"
