"""Checkpointer on one rank without a process group: atomicity, resume rules, refusals, RNG."""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dtrain.checkpoint as ckpt_mod
from dtrain.checkpoint import (
    Checkpointer,
    atomic_write_text,
    check_compatible,
    rng_state,
    set_rng_state,
)
from dtrain.config import CheckpointConfig, JobConfig, to_dict
from dtrain.errors import UserError


def make(tmp_path: Path, *, keep: int = 2, resume: str = "", rank: int = 0, world: int = 1):
    cfg = CheckpointConfig(keep=keep, resume=resume)
    return Checkpointer(cfg, tmp_path / "run", rank=rank, world_size=world)


def shared_state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3,), float(step))},
        "step": step,
        "config": to_dict(JobConfig()),
    }


def steps(ck: Checkpointer) -> list[str]:
    return sorted(p.name for p in ck.dir.iterdir())


def test_save_writes_layout_and_loads_back(tmp_path):
    ck = make(tmp_path)
    path = ck.save(300, shared_state(300), {"residual": torch.ones(4)})
    assert path == tmp_path / "run/checkpoints/step_00000300"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "rank_00000.pt", "shared.pt"]
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 300, "world_size": 1}
    shared, mine = ck.load(path)
    assert torch.equal(shared["model"]["w"], torch.full((3,), 300.0))
    assert shared["config"] == to_dict(JobConfig())
    assert torch.equal(mine["residual"], torch.ones(4))
    assert not [p for p in path.parent.rglob("*") if ".tmp" in p.name]  # no temp files left


def test_files_load_with_weights_only(tmp_path):
    path = make(tmp_path).save(1, shared_state(1), {"rng": rng_state()})
    for f in ("shared.pt", "rank_00000.pt"):
        torch.load(path / f, weights_only=True)  # raises on anything but plain data


def test_keep_deletes_older_complete_checkpoints(tmp_path):
    ck = make(tmp_path, keep=2)
    for s in (100, 200, 300):
        ck.save(s, shared_state(s), {})
    assert steps(ck) == ["step_00000200", "step_00000300"]
    assert ck.latest() == ck.dir / "step_00000300"


def test_latest_ignores_partial_checkpoints_and_save_cleans_tmp(tmp_path):
    ck = make(tmp_path, keep=5)
    ck.save(100, shared_state(100), {})
    # Crash remains: a half-written tmp dir (even with a marker) and a dir without COMPLETE.
    tmp = ck.dir / "step_00000200.tmp"
    shutil.copytree(ck.dir / "step_00000100", tmp)
    (ck.dir / "step_00000300").mkdir()
    (ck.dir / "step_00000300" / "shared.pt").write_bytes(b"half")
    assert ck.latest() == ck.dir / "step_00000100"
    assert make(tmp_path, resume="auto").resolve_resume() == ck.dir / "step_00000100"
    ck.save(150, shared_state(150), {})
    assert not tmp.exists()  # stale tmp removed
    assert ck.latest() == ck.dir / "step_00000150"


def test_crash_before_rename_leaves_previous_set(tmp_path, monkeypatch):
    ck = make(tmp_path)
    ck.save(100, shared_state(100), {})
    real = os.replace

    def crash_on_dir_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt  # the process dies between COMPLETE and the rename
        real(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_dir_rename)
    with pytest.raises(KeyboardInterrupt):
        ck.save(200, shared_state(200), {})
    monkeypatch.setattr(ckpt_mod.os, "replace", real)
    assert ck.latest() == ck.dir / "step_00000100"
    assert (ck.dir / "step_00000200.tmp").exists()
    ck.save(300, shared_state(300), {})
    assert steps(ck) == ["step_00000100", "step_00000300"]


def test_crash_while_writing_a_file_leaves_no_partial_file(tmp_path, monkeypatch):
    ck = make(tmp_path)
    ck.save(100, shared_state(100), {})

    def boom(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(UserError, match=r"cannot write checkpoint step 200.*No space left"):
        ck.save(200, shared_state(200), {})
    assert ck.latest() == ck.dir / "step_00000100"
    assert not list((ck.dir / "step_00000200.tmp").iterdir())  # temp file removed


def test_saving_the_same_step_replaces_it(tmp_path):
    ck = make(tmp_path)
    ck.save(100, shared_state(100), {"v": torch.zeros(1)})
    ck.save(100, shared_state(100), {"v": torch.ones(1)})
    assert steps(ck) == ["step_00000100"]
    assert torch.equal(ck.load(ck.latest())[1]["v"], torch.ones(1))


def test_replace_cut_short_keeps_the_old_copy(tmp_path):
    ck = make(tmp_path)
    ck.save(100, shared_state(100), {})
    os.replace(ck.dir / "step_00000100", ck.dir / "step_00000100.old")  # crash mid-replace
    assert ck.latest() == ck.dir / "step_00000100.old"
    ck.save(100, shared_state(100), {})
    assert steps(ck) == ["step_00000100"]


def test_saving_an_earlier_step_drops_the_abandoned_future(tmp_path):
    ck = make(tmp_path, keep=3)
    for s in (100, 200, 300):
        ck.save(s, shared_state(s), {})
    ck.save(150, shared_state(150), {})  # resumed from step 100
    assert steps(ck) == ["step_00000100", "step_00000150"]


def test_resolve_resume(tmp_path):
    assert make(tmp_path).resolve_resume() is None
    assert make(tmp_path, resume="auto").resolve_resume() is None
    ck = make(tmp_path)
    first = ck.save(100, shared_state(100), {})
    ck.save(200, shared_state(200), {})
    with pytest.raises(
        UserError, match=r"run already holds a run \(checkpoint at step 200\): pass --resume to"
    ):
        make(tmp_path).resolve_resume()
    assert make(tmp_path, resume="auto").resolve_resume() == ck.dir / "step_00000200"
    assert make(tmp_path, resume=str(first)).resolve_resume() == first
    with pytest.raises(UserError, match="no such checkpoint directory"):
        make(tmp_path, resume=str(tmp_path / "nope")).resolve_resume()
    (first / "COMPLETE").unlink()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        make(tmp_path, resume=str(first)).resolve_resume()


def test_load_refuses_another_world_size(tmp_path):
    path = make(tmp_path).save(5, shared_state(5), {})
    with pytest.raises(UserError, match=r"saved with 1 ranks, this job has 2: DGC residuals"):
        make(tmp_path, rank=1, world=2).load(path)


def test_load_refuses_a_missing_rank_file(tmp_path):
    path = make(tmp_path).save(5, shared_state(5), {})
    (path / "rank_00000.pt").unlink()
    with pytest.raises(UserError, match=r"lacks rank_00000\.pt"):
        make(tmp_path).load(path)


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", None])
def test_load_refuses_corrupt_or_foreign_files(tmp_path, content):
    path = make(tmp_path).save(5, shared_state(5), {})
    f = path / "shared.pt"
    if content is None:
        torch.save({"state_dict": {}}, f)  # a valid torch file, not a dtrain checkpoint
    else:
        f.write_bytes(content)
    with pytest.raises(UserError, match=r"not a (readable )?dtrain checkpoint"):
        make(tmp_path).load(path)


def test_load_refuses_pickled_objects(tmp_path):
    path = make(tmp_path).save(5, shared_state(5), {})
    torch.save({"format": "dtrain-checkpoint", "state": {"x": Path("/")}}, path / "shared.pt")
    with pytest.raises(UserError, match="not a readable dtrain checkpoint"):
        make(tmp_path).load(path)


def test_check_compatible():
    a = to_dict(JobConfig())
    b = to_dict(JobConfig())
    b["run"]["max_steps"] = 1000
    b["optim"]["lr"] = 0.01
    b["data"]["path"] = "/moved"
    check_compatible(a, b)  # hyperparameters and paths may change
    b["model"]["width"] = 64
    with pytest.raises(UserError, match=r"saved with model.width = 0, this job has .* = 64"):
        check_compatible(a, b)
    c = to_dict(JobConfig())
    c["data"]["synthetic_shape"] = [1, 8, 8]
    with pytest.raises(UserError, match=r"data.synthetic_shape = \[3, 32, 32\]"):
        check_compatible(a, c)
    d = to_dict(JobConfig())
    d["data"]["synthetic_shape"] = (3, 32, 32)  # tuples and lists compare equal
    check_compatible(a, d)
    e = to_dict(JobConfig())
    e["engine"]["name"] = "deepspeed"  # the optimizer state lives elsewhere
    with pytest.raises(UserError, match=r"saved with engine.name = 'ddp', this job has"):
        check_compatible(a, e)


def _draw() -> tuple:
    return (
        torch.rand(3).tolist(),
        np.random.randn(3).tolist(),  # randn uses numpy's cached gaussian
        [random.random(), random.gauss(0, 1), random.getrandbits(64)],
    )


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in random's
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draw()
    _draw()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


def test_atomic_write_text(tmp_path):
    f = tmp_path / "config.toml"
    atomic_write_text(f, "a = 1\n")
    atomic_write_text(f, "a = 2\n")
    assert f.read_text() == "a = 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]
