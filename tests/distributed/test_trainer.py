"""The trainer on 2 gloo ranks in-process: byte accounting per hook, accumulation, determinism."""

import json

import pytest
import torch

from dtrain.config import load_config
from dtrain.distributed import DistInfo
from dtrain.trainer import Trainer
from tests.distributed.harness import run_ranks


def _train(rank, world, out_dir, args, local_size=None):
    cfg = load_config(
        "configs/digits.toml",
        ["--logging.progress=false", f"--run.out_dir={out_dir}", "--logging.every_steps=5", *args],
    )
    local = local_size or world
    info = DistInfo(rank, world, rank % local, local, torch.device("cpu"), "gloo", "test")
    trainer = Trainer(cfg, info)
    summary = trainer.train()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.hook_state.stats()
    trainer.close()
    return summary, weights, stats


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])


def test_bytes_are_counted_for_every_hook(tmp_path):
    steps = ["--run.max_steps=12", "--comm.powersgd_start_iter=4", "--comm.powersgd_rank=1"]
    ratios = {}
    for hook in ("allreduce", "fp16", "powersgd", "dgc"):
        args = [*steps, f"--comm.hook={hook}", f"--run.name={hook}", "--comm.warmup_epochs=0"]
        (summary, _, stats), _ = run_ranks(_train, 2, str(tmp_path), args)
        assert summary["steps"] == 12 and stats["step"] == 12
        assert stats["dense_bytes"] == 71_754 * 4  # every gradient once, fp32
        ratios[hook] = stats["ratio"]
    assert ratios["allreduce"] == 1.0 and ratios["fp16"] == 2.0
    assert ratios["powersgd"] > 5.0  # rank 1 on the linear and conv layers
    assert ratios["dgc"] > 50.0  # density 0.001; conv1 (144 weights) and biases go dense


def test_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum=2 under no_sync gives the same update as one batch twice the size."""
    base = ["--run.max_steps=6", "--comm.hook=allreduce", "--optim.schedule=constant"]
    (_, one, _), _ = run_ranks(_train, 2, str(tmp_path), [*base, "--run.name=one"])
    (_, two, _), _ = run_ranks(
        _train, 2, str(tmp_path), [*base, "--run.name=two", "--run.grad_accum=2"]
    )
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["fc2.weight"], _initial("fc2.weight"))


def _initial(name):
    from dtrain.config import ModelConfig
    from dtrain.data import DataInfo
    from dtrain.models import build_model

    torch.manual_seed(0)
    info = DataInfo("image", (1, 8, 8), 10, 0, 0, 1500, 297, "accuracy")
    return build_model(ModelConfig(), info).state_dict()[name]


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    base = ["--run.max_steps=8", "--comm.warmup_steps=4", "--comm.warmup_epochs=0"]
    (_, a, _), _ = run_ranks(_train, 2, str(tmp_path), [*base, "--run.name=a"])
    (_, b, _), _ = run_ranks(_train, 2, str(tmp_path), [*base, "--run.name=b"])
    (_, c, _), _ = run_ranks(_train, 2, str(tmp_path), [*base, "--run.name=c", "--run.seed=1"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _lm(rank, world, out_dir, args):
    import os

    corpus = os.path.dirname(json.__file__)  # Python's own sources: a local text corpus
    return _train(rank, world, out_dir, [
        "--data.name=text", f"--data.path={corpus}", "--data.seq_len=32", "--data.batch_size=16",
        "--data.eval_batch_size=64", "--model.width=64", "--run.max_steps=30",
        "--optim.schedule=constant", "--comm.warmup_epochs=0", *args,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "model,optim",
    [("lstm_lm", ["--optim.lr=1.0", "--comm.clip_norm=0.25"]),
     ("char_transformer", ["--optim.name=adamw", "--optim.lr=3e-3", "--comm.density=0.01"])],
)  # fmt: skip
def test_language_models_train_with_dgc_and_report_perplexity(tmp_path, model, optim):
    args = [f"--model.name={model}", f"--run.name={model}", "--model.dropout=0.1", *optim]
    (summary, _, stats), _ = run_ranks(_lm, 2, str(tmp_path), args)
    assert "test_perplexity" in summary and "test_accuracy" not in summary
    assert summary["test_perplexity"] < 40  # vocabulary ~100: uniform guessing is ~100
    assert stats["ratio"] > 10
    lines = (tmp_path / model / "metrics.jsonl").read_text().splitlines()

    train = [json.loads(x) for x in lines if '"train"' in x]
    assert train[-1]["perplexity"] < train[0]["perplexity"]


def test_bf16_autocast_trains_with_dgc(tmp_path):
    args = ["--run.max_steps=40", "--comm.warmup_epochs=0", "--comm.density=0.05",
            "--optim.schedule=constant"]  # fmt: skip
    (summary, bf16, stats), _ = run_ranks(
        _train, 2, str(tmp_path), [*args, "--run.precision=bf16", "--run.name=bf16"]
    )
    (_, fp32, _), _ = run_ranks(_train, 2, str(tmp_path), [*args, "--run.name=fp32"])
    assert summary["test_accuracy"] > 50 and stats["ratio"] > 5
    # Same seed and data: only autocast's bf16 arithmetic can make the weights differ.
    assert not torch.equal(bf16["fc2.weight"], fp32["fc2.weight"])


def test_hierarchical_dgc_in_the_job(tmp_path):
    """4 ranks as 2 nodes x 2: the job trains, all ranks agree, only shares cross nodes."""
    args = ["--run.max_steps=30", "--comm.warmup_epochs=0", "--comm.density=0.05",
            "--optim.schedule=constant"]  # fmt: skip
    flat = run_ranks(_train, 4, str(tmp_path), [*args, "--run.name=flat"])
    hier = run_ranks(
        _train, 4, str(tmp_path), [*args, "--run.name=hier", "--comm.hierarchical=true"],
        local_size=2,
    )  # fmt: skip
    for _, weights, _ in hier[1:]:
        assert all(torch.equal(weights[k], hier[0][1][k]) for k in weights)
    sent = lambda results: sum(stats["bytes_sent"] for _, _, stats in results)  # noqa: E731
    assert sent(hier) < 0.7 * sent(flat)
    assert hier[0][0]["test_accuracy"] > 50  # flat DGC: ~74 after these 30 steps
    assert abs(hier[0][0]["test_accuracy"] - flat[0][0]["test_accuracy"]) < 10


def _resume_groups(rank, world, out_dir, args):
    cfg = load_config(
        "configs/digits.toml", ["--logging.progress=false", f"--run.out_dir={out_dir}", *args]
    )
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "test")
    trainer = Trainer(cfg, info)
    groups = [
        (g["lr"], g["weight_decay"], g["dgc_weight_decay"]) for g in trainer.optimizer.param_groups
    ]
    step, in_hook = trainer.step, sorted(set(trainer.hook_state._decay.values()))
    trainer.close()
    return step, groups, in_hook


def test_resume_applies_the_configs_learning_rate_and_weight_decay(tmp_path):
    base = ["--run.name=r", "--optim.schedule=constant", "--optim.warmup_epochs=0"]
    run_ranks(_train, 2, str(tmp_path), [*base, "--run.max_steps=4"])
    fine_tune = [*base, "--run.max_steps=8", "--checkpoint.resume=auto", "--optim.lr=0.01"]
    step, groups, in_hook = run_ranks(
        _resume_groups, 2, str(tmp_path), [*fine_tune, "--optim.weight_decay=0.001"]
    )[0]
    assert step == 4
    # SGD momentum 0.9 and the weight decay moved into DGC (biases and norms: no decay), with
    # the config's values, not the checkpoint's
    assert groups == [(0.01, 0.0, 0.001), (0.01, 0.0, 0.0)]
    assert in_hook == [0.001]


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path):

    from dtrain.optim import lr_factor

    args = ["--run.max_steps=10", "--run.name=lr", "--logging.every_steps=1"]
    run_ranks(_train, 2, str(tmp_path), args)
    cfg = load_config("configs/digits.toml", args)
    lines = [json.loads(x) for x in (tmp_path / "lr/metrics.jsonl").read_text().splitlines()]
    logged = [x["lr"] for x in lines if x["kind"] == "train"]
    # Step s (1-based in the log) trained with factor(s - 1); the cosine's last step is not 0.
    want = [
        cfg.optim.lr * lr_factor(cfg.optim, s, total_steps=10, warmup_steps=0) for s in range(10)
    ]
    assert logged == pytest.approx(want) and logged[-1] > 0


def _residual_left(rank, world, out_dir, args):
    cfg = load_config(
        "configs/digits.toml", ["--logging.progress=false", f"--run.out_dir={out_dir}", *args]
    )
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "test")
    trainer = Trainer(cfg, info)
    summary = trainer.train()
    state = trainer.hook_state
    left = max(float(st.v.abs().max()) for st in state._params.values() if st.v is not None)
    flushable = sum(
        p.numel() * 4
        for p in trainer.model.parameters()
        if p.dim() > 1 and p.numel() >= cfg.comm.min_compress_numel
    )
    trainer.close()
    return summary["bytes_sent_total"], left, flushable


def test_the_job_flushes_the_residuals_after_the_last_step_in_lr_weighted_mode(tmp_path):
    args = ["--run.max_steps=8", "--comm.warmup_epochs=0", "--comm.density=0.01"]
    runs = {
        name: run_ranks(_residual_left, 2, str(tmp_path), [*args, f"--run.name={name}", *extra])[0]
        for name, extra in {
            "auto": [],
            "off": ["--comm.flush=false"],
            "paper": ["--comm.mode=paper"],
        }.items()
    }
    sent, left, flushable = runs["auto"]
    assert left == 0.0  # everything the residuals held is in the weights
    assert runs["off"][1] > 0 and runs["paper"][1] > 0  # no flush: the residuals still hold it
    assert sent - runs["off"][0] == flushable  # one dense allreduce of them, counted
    kinds = {
        name: [json.loads(x)["kind"] for x in (tmp_path / name / "metrics.jsonl").open()]
        for name in runs
    }
    # the evaluation before the flush is logged too: what the flush changed shows
    assert kinds["auto"].count("pre_flush") == 1 and "pre_flush" not in kinds["off"]


def test_the_density_follows_the_schedule_at_the_constant_densitys_bytes(tmp_path):
    args = ["--run.max_steps=40", "--comm.warmup_epochs=0", "--comm.warmup_steps=10",
            "--comm.density=0.01", "--logging.every_steps=1", "--comm.flush=false"]  # fmt: skip
    sent, density = {}, {}
    for name in ("constant", "lr", "auto"):
        extra = [f"--run.name={name}", f"--comm.density_schedule={name}"]
        run_ranks(_train, 2, str(tmp_path), [*args, *extra])
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()]
        density[name] = [x["density"] for x in lines if x["kind"] == "train"]
        sent[name] = lines[-1]["bytes_sent_total"]
    warm = [0.25] * 3 + [0.0625] * 2 + [0.015625] * 3 + [0.01] * 2  # DGC.md, 10 steps
    assert density["constant"] == warm + [0.01] * 30
    # lr: the same warm-up, then from over twice the density down to under half of it (cosine)
    lr = density["lr"]
    assert lr[:10] == warm and lr[10] >= 0.02 and lr[-1] < 0.005
    assert lr[10:] == sorted(lr[10:], reverse=True)
    # auto (budget): no separate warm-up, the warm-up's pairs spread along the cosine
    budget = density["auto"]
    assert budget == sorted(budget, reverse=True) and budget[0] < 0.25
    assert sum(budget[10:]) > 2 * sum(lr[10:])
    # ... and about the same pairs over the run (k rounds up per tensor; 1-D ones go dense)
    for name in ("lr", "auto"):
        assert 0.9 * sent["constant"] <= sent[name] <= 1.05 * sent["constant"], (name, sent)
