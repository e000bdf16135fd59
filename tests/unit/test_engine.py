"""The DeepSpeed config a job runs with (dtrain.engine.deepspeed_config): merged, and refused."""

import json
from pathlib import Path

import pytest

from dtrain.config import CommConfig, DataConfig, EngineConfig, JobConfig, OptimConfig, RunConfig
from dtrain.engine import deepspeed_config
from dtrain.errors import UserError


def job(
    tmp_path, ds: dict | str | None, *, hook: str = "dgc", bn_l1: float = 0.0, **run
) -> JobConfig:
    path = ""
    if ds is not None:
        f = tmp_path / "ds.json"
        f.write_text(ds if isinstance(ds, str) else json.dumps(ds))
        path = str(f)
    return JobConfig(
        run=RunConfig(**run),
        data=DataConfig(batch_size=64),
        comm=CommConfig(hook=hook),
        optim=OptimConfig(bn_l1=bn_l1),
        engine=EngineConfig(name="deepspeed", deepspeed_config=path),
    )


def test_the_job_fills_in_batches_and_clipping(tmp_path):
    out = deepspeed_config(job(tmp_path, {"zero_optimization": {"stage": 1}}, grad_accum=2),
                           micro_batch=16)  # fmt: skip
    assert out["zero_optimization"] == {"stage": 1}
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"], out["gradient_clipping"]) == (16, 2, 64, 0.0)  # fmt: skip
    assert deepspeed_config(job(tmp_path, None), micro_batch=32)["train_batch_size"] == 64


@pytest.mark.parametrize(
    "ds,hook,message",
    [
        ("{not json", "dgc", "is not valid JSON"),
        ("[1, 2]", "dgc", "must hold a JSON object"),
        ({"optimizer": {"type": "Adam"}}, "dgc", "sets 'optimizer': dtrain sets it from [optim]"),
        ({"bf16": {"enabled": True}}, "dgc", "sets 'bf16': dtrain sets it from run.precision"),
        ({"gradient_clipping": 1.0}, "allreduce", "from optim.clip_grad_norm"),
        ({"train_batch_size": 128}, "dgc", "sets train_batch_size = 128, the job's [data]"),
        ({"zero_optimization": {"stage": 5}}, "allreduce", "stage must be 0-3, got 5"),
        ({"zero_optimization": {"stage": 2}}, "dgc", "needs ZeRO stage 0 or 1"),
        ({"zero_optimization": {"stage": 3}}, "dgc", "use configs/deepspeed/zero1.json"),
        ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, "dgc", "overlap_comm = false"),
        ({"zero_optimization": {"stage": 1, "contiguous_gradients": False}}, "dgc",
         "contiguous_gradients = true"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "allreduce",
         "offload_param needs stage 3"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "dgc",
         "offload_optimizer needs stage 1-3"),
    ],
)  # fmt: skip
def test_what_contradicts_the_job_is_one_line(tmp_path, ds, hook, message):
    with pytest.raises(UserError, match=None) as e:
        deepspeed_config(job(tmp_path, ds, hook=hook), micro_batch=32)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_network_slimming_is_refused_under_zero3(tmp_path):
    cfg = job(tmp_path, {"zero_optimization": {"stage": 3}}, hook="allreduce", bn_l1=1e-4)
    with pytest.raises(UserError, match="scales are partitioned"):
        deepspeed_config(cfg, micro_batch=32)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/deepspeed/*.json")))
def test_every_shipped_config_merges(tmp_path, path):
    cfg = job(tmp_path, path.read_text(), hook="allreduce")
    out = deepspeed_config(cfg, micro_batch=32)
    assert out["zero_optimization"] == json.loads(path.read_text())["zero_optimization"]
    offload = any(k.startswith("offload") for k in out["zero_optimization"])
    # dtrain's torch optimizer runs on the offloaded partition (not DeepSpeed's CPU Adam)
    assert out.get("zero_force_ds_cpu_optimizer", True) is not offload


def test_zero2_with_deepspeeds_own_reduction_is_fine(tmp_path):
    out = deepspeed_config(job(tmp_path, {"zero_optimization": {"stage": 2}}, hook="allreduce"),
                           micro_batch=32)  # fmt: skip
    assert out["zero_optimization"]["stage"] == 2


def test_a_missing_file_and_a_directory_are_named(tmp_path):
    cfg = job(tmp_path, None)
    cfg.engine.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match="no such file"):
        deepspeed_config(cfg, micro_batch=32)
    cfg.engine.deepspeed_config = str(tmp_path)
    with pytest.raises(UserError, match="is a directory"):
        deepspeed_config(cfg, micro_batch=32)


@pytest.mark.parametrize(
    "section,message",
    [
        ({"comm": {"hook": "powersgd"}}, "comm.hook = 'allreduce' (DeepSpeed's own) or 'dgc'"),
        ({"run": {"precision": "bf16"}}, "runs fp32 in dtrain for now"),
    ],
)
def test_the_job_config_refuses_what_the_engine_cannot_do(section, message):
    from dtrain.config import from_dict

    with pytest.raises(UserError, match=None) as e:
        from_dict({"engine": {"name": "deepspeed"}, **section})
    assert message in str(e.value)
