"""``dtrain.distill`` as a user runs it: under torchrun from a trained teacher, and every mistake
as one line with exit code 2, nothing written."""

import pytest

from dtrain import distill, train
from tests.integration.cli import REPO, torchrun

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


def test_distill_under_torchrun_with_dgc_and_feature_hints(teacher):
    r = torchrun(
        2,
        *DISTILL, f"--distill.teacher={teacher}/teacher", f"--run.out_dir={teacher}",
        "--run.name=kd", "--run.max_steps=20", "--distill.features=conv2:conv2",
        module="dtrain.distill",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in r.stdout and "compression ratio" in r.stdout
    assert (teacher / "kd/checkpoints/step_00000020/shared.pt").is_file()


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
