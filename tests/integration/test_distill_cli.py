"""``dtrain.distill`` as a user runs it: under torchrun from a trained teacher, and every mistake
as one line with exit code 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from dtrain import distill, train
from tests.integration.cli import REPO, env, read_metrics, torchrun, wandb_env

pytestmark = pytest.mark.integration

SHORT = ["--logging.progress=false", "--logging.every_steps=10"]
DISTILL = ["--config", "configs/distill/digits_kd.toml", *SHORT]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A short dtrain.train run of a wide digits CNN (allreduce, 40 steps)."""
    out = tmp_path_factory.mktemp("distill_cli")
    r = torchrun(
        2,
        "--config", "configs/digits.toml", *SHORT, "--run.max_steps=40", "--model.width=8",
        "--comm.hook=allreduce", f"--run.out_dir={out}", "--run.name=teacher",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


def test_distill_under_torchrun_with_dgc_and_feature_hints_logged_to_wandb(teacher):
    r = torchrun(
        2,
        *DISTILL, f"--distill.teacher={teacher}/teacher", f"--run.out_dir={teacher}",
        "--run.name=kd", "--run.max_steps=20", "--distill.features=conv2:conv2",
        "--logging.wandb=offline", "--logging.wandb_name=kd-named",
        module="dtrain.distill", WANDB_RUN_GROUP="group-from-env", **wandb_env(teacher),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in r.stdout and "compression ratio" in r.stdout
    run = teacher / "kd"
    assert (run / "checkpoints/step_00000020/shared.pt").is_file()
    lines = [m for m in read_metrics(run) if m["kind"] == "distill"]
    assert [m["step"] for m in lines] == [10, 20]
    assert all(m["kd_loss"] > 0 and m["feature_loss"] > 0 for m in lines)
    # the offline wandb run: grouped metrics, the report plots as images, the identity
    (wb,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = wb.read_bytes()
    for key in (
        "train/loss",
        "comm/ratio",
        "eval/test_accuracy",
        "distill/kd_loss",
        "distill/feature_loss",
        "report/loss_vs_step",
        "group-from-env",
        "kd-named",
    ):
        assert key.encode() in data, key  # fmt: skip
    assert b"train/ratio" not in data  # the counters are under comm/
    images = sorted(p.name for p in wb.parent.glob("files/media/images/report/*.png"))
    assert any(n.startswith("metric_vs_step") for n in images), images
    assert (run / "plots/loss_vs_step.png").is_file()
    sync = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(run / "wandb")],
        env=env(**wandb_env(teacher)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Would sync 1 run" in sync.stdout + sync.stderr, sync.stdout + sync.stderr


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--distill.temperature=0"], "distill.temperature must be > 0, got 0.0"),
        (["--distill.alpha=1.5"], "distill.alpha must be in [0, 1], got 1.5"),
        (["--distill.teacher=/nonexistent/run"], "distill.teacher: /nonexistent/run is neither"),
        (
            ["--distill.features=conv2:conv3"],
            "the teacher has no layer named 'conv3' (did you mean 'conv2'?)",
        ),
        (["--distill.features=fc:fc1"], "the student has no layer named 'fc' (did you mean"),
        (["--distill.features=conv2"], "'conv2' is not 'student_layer:teacher_layer'"),
        (["--model.name=mlp", "--distill.features=conv2:fc1"], "the student has no layer"),
        (
            ["--data.name=synthetic", "--data.synthetic_shape=1,8,8", "--data.synthetic_classes=5"],
            "predicts 10 classes, the student's data has 5: distill between models of the same",
        ),
        (
            ["--distill.cache=true", "--data.name=cifar10", "--data.path=/x"],
            "distill.cache needs fixed training inputs, and data.augment = true",
        ),
        (
            ["--distill.cache=true", "--distill.features=conv2:conv2"],
            "distill.cache keeps the teacher's logits only",
        ),
    ],
)
@pytest.mark.usefixtures("_repo_root")
def test_bad_input_is_one_line_exit_2_nothing_written(teacher, capsys, args, message):
    before = _snapshot(teacher)
    argv = [*DISTILL, f"--distill.teacher={teacher}/teacher", f"--run.out_dir={teacher}"]
    assert (
        train.main([*argv, "--run.name=bad", "--run.max_steps=5", *args], job=distill.DISTILL) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain.distill: error: "), err
    assert message in err[0], err[0]
    assert _snapshot(teacher) == before


def _digits_teacher(out, name, seed):
    argv = ["--config", "configs/digits.toml", *SHORT, "--run.max_steps=3", "--model.width=8",
            "--comm.hook=allreduce", f"--run.out_dir={out}", f"--run.name={name}",
            f"--run.seed={seed}"]  # fmt: skip
    assert train.main(argv) == 0


@pytest.mark.usefixtures("_repo_root")
def test_a_stale_shared_cache_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    _digits_teacher(tmp_path, "a", 0)
    _digits_teacher(tmp_path, "b", 1)  # other weights
    argv = [*DISTILL, f"--run.out_dir={tmp_path}", "--run.max_steps=2", "--distill.features=",
            "--distill.cache=true", f"--distill.cache_dir={tmp_path}/cache"]  # fmt: skip
    main = distill.DISTILL
    assert train.main([*argv, f"--distill.teacher={tmp_path}/a", "--run.name=s1"], job=main) == 0
    assert (tmp_path / "cache/rank00000-of-00001.pt").is_file()
    # another student of the same teacher reuses the shared cache
    assert train.main([*argv, f"--distill.teacher={tmp_path}/a", "--run.name=s2"], job=main) == 0
    assert "read back" in capsys.readouterr().err
    before = _snapshot(tmp_path)
    assert train.main([*argv, f"--distill.teacher={tmp_path}/b", "--run.name=s3"], job=main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is stale (built for another teacher (other weights))" in err[0], err
    assert f"delete {tmp_path}/cache to rebuild it" in err[0]
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("_repo_root")
def test_a_teacher_of_another_vocabulary_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world, said the model. " * 100)
    (tmp_path / "b.txt").write_text("hello xorld, said the model. " * 100)  # as many chars
    text = ["--logging.progress=false", "--model.width=16", "--model.depth=1",
            "--data.seq_len=16", "--data.batch_size=8", "--data.eval_batch_size=8",
            f"--run.out_dir={tmp_path}"]  # fmt: skip
    lm = ["--config", "configs/transformer_text.toml", *text, "--comm.hook=allreduce"]
    assert train.main([*lm, f"--data.path={tmp_path}/a.txt", "--run.max_steps=2",
                       "--run.name=t"]) == 0  # fmt: skip
    kd = ["--config", "configs/distill/transformer_text_kd.toml", *text, "--run.max_steps=2",
          f"--distill.teacher={tmp_path}/t"]  # fmt: skip
    assert train.main([*kd, f"--data.path={tmp_path}/a.txt", "--run.name=ok"],
                      job=distill.DISTILL) == 0  # fmt: skip
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert train.main([*kd, f"--data.path={tmp_path}/b.txt", "--run.name=bad"],
                      job=distill.DISTILL) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on another vocabulary" in err[0], err
    assert _snapshot(tmp_path) == before
