"""The distillation job on 2 gloo ranks in-process: the teacher frozen, outside DDP and bitwise
unchanged; the adapters trained by the reduced gradients, saved with the student and left behind
by a later job; a resumed run equals the uninterrupted one."""

import shutil

import pytest
import torch

from dtrain.checkpoint import TRAINING_ONLY, load_shared
from dtrain.config import load_config
from dtrain.distributed import DistInfo
from dtrain.jobs.distill import DistillJobConfig, make_trainer
from dtrain.trainer import Trainer
from tests.distributed.harness import run_ranks


def _info(rank, world):
    return DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t")


def _train(rank, world, out_dir, args):
    cfg = load_config(
        "configs/digits.toml",
        ["--logging.progress=false", f"--run.out_dir={out_dir}", "--comm.hook=allreduce", *args],
    )
    trainer = Trainer(cfg, _info(rank, world))
    summary = trainer.train()
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    return summary, model


def _distill(rank, world, out_dir, args):
    cfg = load_config(
        "configs/distill/digits_kd.toml",
        [
            "--logging.progress=false",
            f"--run.out_dir={out_dir}",
            f"--distill.teacher={out_dir}/teacher",
            "--logging.every_steps=5",
            "--distill.features=conv2:conv2",
            *args,
        ],
        DistillJobConfig,
    )
    trainer = make_trainer(cfg, _info(rank, world))
    ext = trainer.extensions[0]
    teacher = ext.teacher
    forwards = []  # the batch size of every teacher forward
    teacher.register_forward_hook(lambda m, args, out: forwards.append(len(args[0])))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    adapters = {
        k: v.clone()
        for k, v in trainer.model.state_dict().items()
        if k.startswith(f"{TRAINING_ONLY}.")
    }
    summary = trainer.train()
    ddp_params = {id(p) for p in trainer.ddp.parameters()}
    out = {
        "summary": summary,
        "teacher_unchanged": all(
            torch.equal(v, before[k]) for k, v in teacher.state_dict().items()
        ),
        "teacher_grads": [n for n, p in teacher.named_parameters() if p.grad is not None],
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_in_ddp": any(id(p) in ddp_params for p in teacher.parameters()),
        "teacher_training": teacher.training,
        "adapters_in_ddp": all(
            id(p) in ddp_params
            for n, p in trainer.model.named_parameters()
            if n.startswith(f"{TRAINING_ONLY}.")
        ),
        "adapters_before": adapters,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "forwards": list(forwards),  # (before the reference forward below)
        "table": ext.table,
        "reference": teacher(trainer.data.x_train).detach() if ext.d.cache else None,
    }
    trainer.close()
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A wide digits CNN (width 8) trained 40 steps with allreduce on 2 ranks."""
    out = tmp_path_factory.mktemp("distill")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(__file__.rsplit("/tests/", 1)[0])
        run_ranks(_train, 2, str(out), ["--run.name=teacher", "--run.max_steps=40",
                                        "--model.width=8"])  # fmt: skip
    return out


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])


def test_the_teacher_stays_frozen_and_the_adapters_train_with_the_student(teacher):
    args = ["--run.name=kd", "--run.max_steps=12", "--checkpoint.every_steps=12"]
    results = run_ranks(_distill, 2, str(teacher), args)
    for r in results:
        assert r["teacher_unchanged"] and not r["teacher_grads"]
        assert not r["teacher_requires_grad"] and not r["teacher_in_ddp"]
        assert not r["teacher_training"]
        assert r["adapters_in_ddp"]
    a, b = results[0]["model"], results[1]["model"]
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    adapter_keys = [k for k in a if k.startswith(f"{TRAINING_ONLY}.")]
    assert adapter_keys  # the 1x1 conv adapting conv2's 8 channels to the teacher's 16
    moved = [k for k in adapter_keys if not torch.equal(a[k], results[0]["adapters_before"][k])]
    assert moved, "the hint loss did not train the adapter"
    # saved with the student ...
    _, shared = load_shared(teacher / "kd")
    for k in adapter_keys:
        assert torch.equal(shared["model"][k], a[k]), k
    # ... and left behind when a later job starts from it
    _, model = run_ranks(
        _train, 2, str(teacher),
        ["--run.name=after", "--run.max_steps=2", "--model.width=4",
         f"--model.init_from={teacher}/kd"],
    )[0]  # fmt: skip
    assert not any(k.startswith(TRAINING_ONLY) for k in model)


def test_logit_only_distillation_changes_the_student_and_alpha_zero_is_training_alone(teacher):
    steps = ["--run.max_steps=6", "--distill.features="]
    kd = run_ranks(_distill, 2, str(teacher), [*steps, "--run.name=logit"])[0]
    alone = run_ranks(_distill, 2, str(teacher), [*steps, "--run.name=a0", "--distill.alpha=0"])
    plain = run_ranks(
        _train, 2, str(teacher),
        [*steps[:1], "--run.name=plain", "--model.width=4", "--optim.lr=0.02", "--comm.hook=dgc",
         "--comm.density=0.001", "--comm.warmup_epochs=1.0", "--data.batch_size=64",
         "--optim.weight_decay=5e-4", "--run.epochs=30"],
    )[0][1]  # fmt: skip
    assert not any(k.startswith(TRAINING_ONLY) for k in kd["model"])
    assert alone[0]["forwards"] == [] and len(kd["forwards"]) == 6  # alone: no teacher runs
    for k, v in plain.items():  # alpha = 0: exactly the training job's student
        assert torch.equal(v, alone[0]["model"][k]), k
    assert any(not torch.equal(v, kd["model"][k]) for k, v in plain.items())


def test_a_resumed_distillation_equals_the_uninterrupted_one(teacher):
    base = ["--run.max_steps=12", "--checkpoint.every_steps=6", "--checkpoint.keep=5"]
    full = run_ranks(_distill, 2, str(teacher), [*base, "--run.name=full"])[0]
    shutil.copytree(teacher / "full", teacher / "cut")
    shutil.rmtree(teacher / "cut/checkpoints/step_00000012")
    cut = run_ranks(
        _distill, 2, str(teacher), [*base, "--run.name=cut", "--checkpoint.resume=auto"]
    )[0]
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    assert cut["summary"]["test_accuracy"] == full["summary"]["test_accuracy"]


CACHE = ["--distill.features=", "--distill.cache=true", "--data.eval_batch_size=256"]


def test_the_logit_cache_is_the_teachers_outputs_and_steps_run_no_teacher_forward(teacher):
    base = ["--run.max_steps=12", "--checkpoint.every_steps=6", "--checkpoint.keep=5", *CACHE]
    full = run_ranks(_distill, 2, str(teacher), [*base, "--run.name=cached"])
    for r in full:
        # one forward per batch of this rank's shard (750 samples of 1500): none in the steps
        assert r["forwards"] == [256, 256, 238]
        assert torch.allclose(r["table"], r["reference"], atol=1e-5)
    assert torch.equal(full[0]["table"], full[1]["table"])  # gathered: the same on every rank
    assert sorted(p.name for p in (teacher / "cached/teacher_cache").iterdir()) == [
        "rank00000-of-00002.pt", "rank00001-of-00002.pt"
    ]  # fmt: skip
    uncached = run_ranks(_distill, 2, str(teacher), [*base[:1], "--distill.features=",
                                                     "--run.name=uncached"])[0]  # fmt: skip
    assert len(uncached["forwards"]) == 12  # a teacher forward per step
    for k, v in uncached["model"].items():
        assert torch.allclose(v, full[0]["model"][k], atol=1e-4), k

    # A resume reads the shards back (no teacher forward at all) and equals the full run.
    shutil.copytree(teacher / "cached", teacher / "cached_cut")
    shutil.rmtree(teacher / "cached_cut/checkpoints/step_00000012")
    cut = run_ranks(
        _distill, 2, str(teacher), [*base, "--run.name=cached_cut", "--checkpoint.resume=auto"]
    )
    assert cut[0]["forwards"] == cut[1]["forwards"] == []
    for k, v in full[0]["model"].items():
        assert torch.equal(v, cut[0]["model"][k]), k

    # A shard built for other teacher weights is rebuilt (in the run directory's cache).
    shutil.rmtree(teacher / "cached_cut")
    shutil.copytree(teacher / "cached", teacher / "cached_cut")
    shutil.rmtree(teacher / "cached_cut/checkpoints/step_00000012")
    shard = teacher / "cached_cut/teacher_cache/rank00001-of-00002.pt"
    saved = torch.load(shard, weights_only=True)
    saved["key"]["teacher"] = "0" * 64
    torch.save(saved, shard)
    stale = run_ranks(
        _distill, 2, str(teacher), [*base, "--run.name=cached_cut", "--checkpoint.resume=auto"]
    )
    assert stale[0]["forwards"] == [] and stale[1]["forwards"] == [256, 256, 238]
    assert torch.load(shard, weights_only=True)["key"]["teacher"] != "0" * 64
    for k, v in full[0]["model"].items():
        assert torch.equal(v, stale[0]["model"][k]), k
