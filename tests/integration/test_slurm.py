"""dtrain.train under a real Slurm: both batch scripts, two nodes, a short digits run.

The cluster (:mod:`tests.integration.slurm_cluster`) is slurmctld and two slurmd "nodes" on this
host, started once for the module; the tests are skipped where Slurm cannot be installed or run.
"""

import json
import re
import socket
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, slurm_cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
STEPS = 20

cluster = slurm_cluster_fixture(scope="module")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON for the scripts that logs where and how it was started, then runs this one."""
    log, wrapper = tmp_path / "python-calls.log", tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$SLURMD_NODENAME ${{SLURM_PROCID:--}} $*" >> {log}\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper, log


def _run(
    cluster: SlurmCluster,
    script: str,
    sbatch_opts: list[str],
    tmp_path: Path,
    *,
    job: str = "dtrain.train",
    job_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """Submit ``script`` from the repo root, wait for it, check that it completed on both nodes
    with a world of 2, and return how the scripts started Python: ``"node procid args"``."""
    python, calls = _recording_python(tmp_path)
    run_dir = tmp_path / "run"
    result = cluster.sbatch(
        script,
        *sbatch_opts,
        "--time=3",  # minutes: a hung rendezvous ends the job, not the test session
        job_args=(
            f"--run.out_dir={tmp_path}",
            f"--run.name={run_dir.name}",
            f"--run.max_steps={STEPS}",
            "--run.threads=1",  # two processes share this host's cores
            "--logging.progress=false",
            *job_args,
        ),
        cwd=REPO,
        env={
            "PYTHON": str(python),
            "NPROC": "1",
            "MASTER_PORT": str(_free_port()),
            "GLOO_SOCKET_IFNAME": "lo",
            **(extra_env or {}),
        },
        timeout=240,
    )
    assert result.returncode == 0, cluster.describe(result)
    job_id = result.stdout.strip().split(";")[0]
    state = cluster.job_state(job_id)
    assert (state.get("JobState"), state.get("ExitCode")) == ("COMPLETED", "0:0"), (
        state,
        cluster.describe(result),
    )
    assert state["NumNodes"] == "2", state
    output = cluster.job_output(job_id)
    assert "for 2 process(es)" in output, output  # the --check before the launch
    assert re.search(rf"^final test accuracy .* {STEPS} steps in ", output, re.M), output

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    summary = json.loads(lines[-1])
    assert summary["kind"] == "summary", lines[-1]
    assert (summary["world_size"], summary["steps"]) == (2, STEPS), summary
    assert f"max_steps = {STEPS}" in (run_dir / "config.toml").read_text()

    started = calls.read_text().splitlines()
    checks = [c for c in started if " --check " in c]
    assert len(checks) == 1 and f"-m {job}" in checks[0], started
    return sorted(c for c in started if " --check " not in c)


def test_train_sbatch_torchrun_per_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Two nodes, one torchrun each, c10d rendezvous on the first: a world of 2."""
    started = _run(cluster, "slurm/train.sbatch", ["--nodes=2"], tmp_path)
    assert [c.split()[0] for c in started] == ["n1", "n2"], started
    for c in started:
        assert "-m torch.distributed.run --nnodes=2 --nproc_per_node=1" in c, c
        assert "--rdzv_backend=c10d" in c and "-m dtrain.train" in c, c


def test_train_srun_sbatch_one_task_per_process(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Two tasks on two nodes, ranks from SLURM_PROCID, no torchrun: a world of 2."""
    # As the README has it: nodes x tasks per node, replacing the script's #SBATCH lines.
    opts = ["--nodes=2", "--ntasks-per-node=1"]
    started = _run(cluster, "slurm/train_srun.sbatch", opts, tmp_path)
    assert [c.split()[:2] for c in started] == [["n1", "0"], ["n2", "1"]], started
    for c in started:
        assert c.split()[2:5] == ["-m", "dtrain.train", "--config"], c


def test_prune_sbatch_prunes_a_trained_run_on_two_nodes(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """dtrain.prune under Slurm from a trained run: slurm/train_srun.sbatch with JOB=dtrain.prune
    (srun only). slurm/prune.sbatch (train.sbatch's torchrun-per-node path with that JOB) passed
    here too, but its c10d rendezvous once timed out on this 2-core host under CI load."""
    from tests.integration.cli import torchrun

    src = torchrun(
        1, "--config", "configs/digits.toml", "--run.max_steps=20", "--comm.hook=allreduce",
        f"--run.out_dir={tmp_path}", "--run.name=src", "--logging.progress=false",
    )  # fmt: skip
    assert src.returncode == 0, src.stderr[-2000:]
    started = _run(
        cluster,
        "slurm/train_srun.sbatch",
        ["--nodes=2", "--ntasks-per-node=1"],
        tmp_path,
        job="dtrain.prune",
        job_args=(f"--prune.source={tmp_path}/src",),
        extra_env={"JOB": "dtrain.prune", "CONFIG": "configs/prune/digits_global90.toml"},
    )
    assert [c.split()[:2] for c in started] == [["n1", "0"], ["n2", "1"]], started
    assert all("-m dtrain.prune" in c for c in started), started
    report = json.loads((tmp_path / "run" / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_bad_input_fails_before_launch(cluster: SlurmCluster, tmp_path: Path) -> None:
    """A config mistake ends the job with one line and exit code 2, before srun starts anything."""
    python, calls = _recording_python(tmp_path)
    result = cluster.sbatch(
        "slurm/train.sbatch",
        "--nodes=2",
        job_args=(f"--run.out_dir={tmp_path}", "--run.max_step=20"),
        cwd=REPO,
        env={"PYTHON": str(python), "NPROC": "1"},
        timeout=120,
    )
    assert result.returncode == 2, cluster.describe(result)
    job_id = result.stdout.strip().split(";")[0]
    assert cluster.job_state(job_id)["ExitCode"] == "2:0"
    output = cluster.job_output(job_id).strip().splitlines()
    assert len(output) == 1 and "max_steps" in output[0], output
    assert [" --check " in c for c in calls.read_text().splitlines()] == [True]


def test_pipeline_under_srun_on_two_nodes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """dtrain.pipeline under Slurm (train_srun.sbatch with JOB=dtrain.pipeline): the low-rank
    fine-tune trains on both nodes, rank 0 quantizes and exports while the other waits."""
    from tests.integration.cli import torchrun

    src = torchrun(
        1, "--config", "configs/digits.toml", "--run.max_steps=20", "--comm.hook=allreduce",
        f"--run.out_dir={tmp_path}", "--run.name=src", "--logging.progress=false",
    )  # fmt: skip
    assert src.returncode == 0, src.stderr[-2000:]
    python, calls = _recording_python(tmp_path)
    result = cluster.sbatch(
        "slurm/train_srun.sbatch",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=4",
        job_args=(
            f"--pipeline.source={tmp_path}/src",
            f"--pipeline.out_dir={tmp_path}",
            "--pipeline.name=p",
            "--pipeline.stages=lowrank,quantize,export",
            "--pipeline.threads=1",
            "--pipeline.latency_repeats=2",
            "--lowrank.set=run.max_steps=10,logging.progress=false",
        ),
        cwd=REPO,
        env={
            "PYTHON": str(python),
            "JOB": "dtrain.pipeline",
            "CONFIG": "configs/pipeline/digits.toml",
            "MASTER_PORT": str(_free_port()),
            "GLOO_SOCKET_IFNAME": "lo",
        },
        timeout=300,
    )
    assert result.returncode == 0, cluster.describe(result)
    job_id = result.stdout.strip().split(";")[0]
    state = cluster.job_state(job_id)
    assert (state.get("JobState"), state.get("ExitCode")) == ("COMPLETED", "0:0"), state
    started = sorted(c for c in calls.read_text().splitlines() if " --check " not in c)
    assert [c.split()[:2] for c in started] == [["n1", "0"], ["n2", "1"]], started
    finetune = (tmp_path / "p/lowrank/finetune/metrics.jsonl").read_text().splitlines()
    assert json.loads(finetune[-1])["world_size"] == 2
    report = json.loads((tmp_path / "p/pipeline_report.json").read_text())
    assert report["rows"][-1]["stage"].startswith("export (onnx")


def test_deepspeed_engine_with_dgc_under_srun_on_two_nodes(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """engine.name = "deepspeed" (ZeRO-1, DGC) launched by srun without torchrun: the ranks from
    SLURM_*, the engine's files in the final checkpoint."""
    _run(
        cluster,
        "slurm/train_srun.sbatch",
        ["--nodes=2", "--ntasks-per-node=1"],
        tmp_path,
        job_args=(
            "--engine.name=deepspeed",
            "--engine.deepspeed_config=configs/deepspeed/zero1.json",
        ),
        extra_env={"TORCH_EXTENSIONS_DIR": str(REPO / ".venv/torch_extensions")},
    )
    state = tmp_path / f"run/checkpoints/step_{STEPS:08d}/deepspeed/state"
    names = sorted(p.name for p in state.iterdir())
    assert [n for n in names if n.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ], names
