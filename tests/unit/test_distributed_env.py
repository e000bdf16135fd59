"""Reading the launcher's environment: torchrun, srun, single process."""

import pytest

from dtrain.distributed import first_slurm_host, launch_env
from dtrain.errors import UserError


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node1", "node1"),
        ("gpu[07-09,12],login1", "gpu07"),
        ("n[1-2]", "n1"),
        ("a-b[003,5]", "a-b003"),
        ("x1,x2", "x1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_first_slurm_host_rejects_empty():
    with pytest.raises(UserError):
        first_slurm_host("")


def test_torchrun_env_wins_over_slurm():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
    }
    le = launch_env(env)
    assert le == {
        "launcher": "torchrun",
        "rank": 3,
        "world_size": 8,
        "local_rank": 1,
        "local_world_size": 2,
    }


def test_srun_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS_PER_NODE": "2(x4)",
    }
    le = launch_env(env)
    assert le["launcher"] == "slurm" and le["rank"] == 5 and le["world_size"] == 8
    assert le["local_rank"] == 1 and le["local_world_size"] == 2
    assert le["master_addr"] == "gpu07" and le["master_port"] == str(10000 + 1234)
    le = launch_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1111"})
    assert le["master_addr"] == "10.0.0.1" and le["master_port"] == "1111"


def test_single_process():
    assert launch_env({}) == {
        "launcher": "single",
        "rank": 0,
        "world_size": 1,
        "local_rank": 0,
        "local_world_size": 1,
    }
