"""Reading the launcher's environment: torchrun, srun, single process."""

import pytest
import torch
import torch.distributed as dist

from dtrain import distributed
from dtrain.distributed import DistInfo, first_slurm_host, launch_env, slurm_tasks_per_node
from dtrain.errors import RankError, UserError


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
        "node_ranks": (),
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
        "node_ranks": (),
    }


@pytest.mark.parametrize(
    "value,counts",
    [
        ("4", [4]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("1,2(x2)", [1, 2, 2]),
        ("8(x1)", [8]),
        ("3, 1", [3, 1]),
    ],
)
def test_slurm_tasks_per_node(value, counts):
    assert slurm_tasks_per_node(value) == counts


@pytest.mark.parametrize(
    "value", ["", "x", "2(x)", "2(x0)", "0", "-1", "2(3)", "2(x3", "2,,1", "2.5", "(x2)"]
)
def test_slurm_tasks_per_node_rejects_malformed(value):
    with pytest.raises(ValueError, match="per-node task list"):
        slurm_tasks_per_node(value)


def _srun(rank: int, node: int, local: int, ntasks: int, **extra: str) -> dict[str, str]:
    """A task's environment as srun sets it without --ntasks-per-node."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_NODEID": str(node),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_JOB_NODELIST": "n[1-4]",
        **extra,
    }


def test_srun_with_plain_ntasks_reads_this_nodes_task_count():
    # sbatch --nodes=4 --ntasks=7: no SLURM_NTASKS_PER_NODE, nodes 0-2 run 2 tasks, node 3 one.
    tasks = {"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    last = launch_env(_srun(6, 3, 0, 7, **tasks))
    assert last["local_world_size"] == 1 and last["node_ranks"] == (2, 2, 2, 1)
    assert launch_env(_srun(3, 1, 1, 7, **tasks))["local_world_size"] == 2
    # Older srun: only SLURM_TASKS_PER_NODE.
    assert launch_env(_srun(6, 3, 0, 7, SLURM_TASKS_PER_NODE="2(x3),1"))["local_world_size"] == 1


def test_srun_task_counts_prefer_the_step_and_must_add_up_to_the_world():
    # A 2-task step inside a 2x4-task allocation whose SLURM_TASKS_PER_NODE survived
    # (srun --preserve-env): the step's counts win; without them, fall back.
    step = _srun(1, 0, 1, 2, SLURM_TASKS_PER_NODE="4(x2)", SLURM_STEP_TASKS_PER_NODE="2")
    assert launch_env(step)["local_world_size"] == 2
    stale = _srun(1, 0, 1, 2, SLURM_TASKS_PER_NODE="4(x2)")
    assert launch_env(stale)["local_world_size"] == 2 and launch_env(stale)["node_ranks"] == ()
    per_node = {**stale, "SLURM_NTASKS_PER_NODE": "1"}
    assert launch_env(per_node)["local_world_size"] == 1


def test_srun_equal_task_counts_need_no_node_id():
    env = _srun(5, 0, 1, 8, SLURM_TASKS_PER_NODE="2(x4)")
    del env["SLURM_NODEID"]
    assert launch_env(env)["local_world_size"] == 2


def test_srun_malformed_task_counts_are_one_clear_error():
    with pytest.raises(UserError, match=r"SLURM_TASKS_PER_NODE: '2\(x3' is not a per-node"):
        launch_env(_srun(0, 0, 0, 7, SLURM_TASKS_PER_NODE="2(x3"))


def _info(rank: int, local_rank: int, local: int, node_ranks: tuple[int, ...] = ()) -> DistInfo:
    cpu = torch.device("cpu")
    return DistInfo(rank, sum(node_ranks) or 4, local_rank, local, cpu, "gloo", "slurm", node_ranks)


def test_hierarchical_local_size_needs_equal_consecutive_nodes():
    assert _info(3, 1, 2, (2, 2)).hierarchical_local_size() == 2
    assert _info(3, 1, 2).hierarchical_local_size() == 2  # torchrun: no per-node counts
    with pytest.raises(UserError, match=r"same number of ranks on every node.*2,2,2,1"):
        _info(6, 0, 1, (2, 2, 2, 1)).hierarchical_local_size()
    with pytest.raises(UserError, match="same number"):  # every node's ranks see it
        _info(0, 0, 2, (2, 2, 2, 1)).hierarchical_local_size()
    # srun --distribution=cyclic: rank 1 is node 1's local rank 0.
    with pytest.raises(UserError, match=r"consecutive ranks.*rank 1 is local rank 0"):
        _info(1, 0, 2, (2, 2)).hierarchical_local_size()


def test_gpus_per_task_local_rank_takes_the_only_visible_gpu(monkeypatch):
    # srun --ntasks-per-node=2 --gpus-per-task=1: local rank 1 sees one GPU, its own, as cuda:0.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _srun(1, 0, 1, 2, SLURM_TASKS_PER_NODE="2", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    chosen, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: groups.append((a, kw)))
    info = distributed.init_distributed(device="cuda", threads=torch.get_num_threads())
    assert info.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    assert info.local_rank == 1 and info.local_world_size == 2 and info.backend == "nccl"
    assert groups[0][0] == ("nccl",) and groups[0][1]["rank"] == 1


def test_gpu_index_own_gpu_or_the_only_visible_one_never_shared():
    assert distributed._gpu_index(3, 8) == 3
    assert distributed._gpu_index(3, 1) == 0  # --gpus-per-task=1: the task's own GPU
    with pytest.raises(RankError, match=r"local rank 4 has no GPU \(4 visible\)"):
        distributed._gpu_index(4, 4)  # would share cuda:0 with local rank 0
