"""Pruning on 2 gloo ranks in-process: the mask-aware DGC hook, agreement across ranks, and the
pruning job (every hook, masks kept, resume in the middle of an iterative schedule)."""

import shutil

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.comm import DGCState, dgc_hook, sparsify
from dtrain.comm.hierarchical import HierarchicalDGCState, hierarchical_dgc_hook
from dtrain.config import load_config
from dtrain.distributed import DistInfo
from dtrain.jobs.prune_report import write_report
from dtrain.jobs.pruning import PruneJobConfig, make_trainer
from dtrain.pruning import Disagreement, digest, verify_identical
from dtrain.trainer import Trainer
from tests.distributed.harness import outcome, run_ranks
from tests.distributed.models import mlp, train_step

DENSITY = 0.05


def _masks(model) -> dict:
    """The same 90%-sparse random masks on every rank, for the three weight matrices."""
    g = torch.Generator().manual_seed(7)
    return {p: torch.rand(p.shape, generator=g) < 0.1 for p in model.parameters() if p.dim() == 2}


def _masked_dgc(
    rank: int, world: int, exchange: str, exact: bool, hierarchical: bool = False
) -> dict:
    model = DDP(mlp(), bucket_cap_mb=100)  # one bucket
    # min_compress 500: the 2048- and 3072-entry weights compressed, the 480-entry one dense
    kwargs = dict(
        density=DENSITY, momentum=0.9, min_compress_numel=500, exchange=exchange, exact_topk=exact
    )
    if hierarchical:  # 2 nodes of 2: each parameter's owner runs DGC across the nodes
        outer = HierarchicalDGCState(local_size=2, **kwargs)
        state, hook = outer.dgc, hierarchical_dgc_hook
    else:
        outer = state = DGCState(**kwargs)
        hook = dgc_hook
    outer.attach(model.module.named_parameters())
    model.register_comm_hook(outer, hook)
    masks = _masks(model.module)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outer.set_masks(masks)
    with torch.no_grad():
        for p, m in masks.items():
            p.mul_(m)
    sent_pruned, grad_pruned = 0, 0.0
    finish = state._finish_step

    def check_then_finish() -> None:  # the step's selected (hence sent) indices, before commit
        nonlocal sent_pruned
        for job in state._pending:
            if getattr(job, "sent", None) is not None:
                p = next(q for q, s in state._params.items() if s is job.state)
                sent_pruned += int((~masks[p].view(-1)[job.sent]).sum())
        finish()

    state._finish_step = check_then_finish
    bytes_sent = []
    for step in range(6):
        train_step(model, opt, rank, step)
        grad_pruned = max(grad_pruned, max(float(p.grad[~m].abs().max()) for p, m in masks.items()))
        bytes_sent.append(state.stats()["bytes_sent"])
    outer.state_dict()  # commits the last step
    buffers = [
        float(t.view(p.shape)[~masks[p]].abs().max())
        for p, st in state._params.items()
        if p in masks
        for t in (st.u, st.v)
        if t is not None
    ]
    kept = {tuple(p.shape): int(m.sum()) for p, m in masks.items()}
    return {
        "sent_pruned": sent_pruned,
        "grad_pruned": grad_pruned,
        "buffers_pruned": max(buffers, default=0.0),
        "weights_pruned": max(float(p.detach()[~m].abs().max()) for p, m in masks.items()),
        "moved": all(not torch.equal(p.detach(), p.detach() * 0) for p in masks),
        "bytes": bytes_sent,
        "stats": state.stats(),
        "kept": kept,
    }


@pytest.mark.parametrize("exchange,exact", [("sparse", False), ("sparse", True), ("dense", True)])
def test_dgc_never_sends_a_pruned_coordinate_and_takes_k_over_the_kept(exchange, exact):
    results = run_ranks(_masked_dgc, 2, exchange, exact)
    for r in results:
        assert r["sent_pruned"] == 0
        assert r["grad_pruned"] == 0.0 and r["buffers_pruned"] == 0.0
        assert r["weights_pruned"] == 0.0 and r["moved"]
    r = results[0]
    k = [sparsify.num_selected(r["kept"][s], DENSITY) for s in ((64, 32), (48, 64))]
    unmasked = [sparsify.num_selected(n, DENSITY) for n in (2048, 3072)]
    assert r["stats"]["pairs_sent"] == sum(k)
    assert r["stats"]["pairs_unmasked"] == sum(unmasked) > 5 * sum(k)
    dense = r["kept"][(10, 48)] + 64 + 48 + 10  # the masked dense weight sends its kept only
    if exchange == "sparse":  # (index, value) pairs + the flag word; the dense allreduce
        assert r["bytes"][-1] == 4 * (2 * sum(k) + 1) + 4 * dense
    else:  # one allreduce: the kept entries of the compressed weights, the dense, the flag
        assert r["bytes"][-1] == 4 * (r["kept"][(64, 32)] + r["kept"][(48, 64)] + dense + 1)


def test_hierarchical_dgc_never_sends_a_pruned_coordinate_across_nodes():
    results = run_ranks(_masked_dgc, 4, "sparse", False, True)
    for r in results:
        assert r["sent_pruned"] == 0
        assert r["grad_pruned"] == 0.0 and r["buffers_pruned"] == 0.0
        assert r["weights_pruned"] == 0.0 and r["moved"]
    sent = sum(r["stats"]["pairs_sent"] for r in results)
    unmasked = sum(r["stats"]["pairs_unmasked"] for r in results)
    assert sent > 0 and unmasked > 5 * sent  # k over the kept, on each owner


def _disagree(rank: int, world: int, _: int) -> str:
    masks = {"fc1.weight": torch.ones(4, 4, dtype=torch.bool), "fc2.weight": torch.eye(3) > 0}
    if rank == 1:  # as if scored on this rank's own data
        masks["fc2.weight"] = masks["fc2.weight"].flip(0)
    ok = outcome(lambda: verify_identical({"fc1.weight": masks["fc1.weight"]}))

    def check() -> None:
        try:
            verify_identical(masks)
        except Disagreement as e:
            assert e.name == "fc2.weight"
            raise

    return ok + " / " + outcome(check)


def test_ranks_that_disagree_on_a_mask_all_stop_naming_the_layer():
    for r in run_ranks(_disagree, 2, 2):
        assert r.startswith("ok / Disagreement: ranks disagree on the mask of fc2.weight"), r


# ------------------------------------------------------------------------------ the job


def _train_source(rank, world, out_dir):
    cfg = load_config(
        "configs/digits.toml",
        [
            "--logging.progress=false",
            f"--run.out_dir={out_dir}",
            "--run.name=src",
            "--run.max_steps=40",
            "--comm.hook=allreduce",
        ],
    )
    trainer = Trainer(cfg, DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t"))
    trainer.train()
    trainer.close()


def _prune(rank, world, out_dir, args):
    cfg = load_config(
        "configs/prune/digits_global90.toml",
        [
            "--logging.progress=false",
            f"--run.out_dir={out_dir}",
            f"--prune.source={out_dir}/src",
            "--logging.every_steps=5",
            *args,
        ],
        PruneJobConfig,
    )
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t")
    trainer = make_trainer(cfg, info)
    summary = trainer.train()
    write_report(trainer, summary)
    ext = trainer.extensions[0]
    masks = ext.masks
    zero_w = all(bool((p.detach()[~masks.keep[n]] == 0).all()) for n, p in masks.params.items())
    opt_state = [
        t[~masks.keep[n]]
        for n, p in masks.params.items()
        for t in trainer.optimizer.state.get(p, {}).values()
        if torch.is_tensor(t) and t.shape == p.shape
    ]
    hook = getattr(trainer.hook_state, "_params", {})
    hook_state = [
        t.view(p.shape)[~masks.keep[n]]
        for n, p in masks.params.items()
        if p in hook
        for t in (hook[p].u, hook[p].v, hook[p].d)
        if t is not None
    ]
    out = {
        "summary": summary,
        "zero_weights": zero_w,
        "zero_state": all(bool((t == 0).all()) for t in opt_state + hook_state),
        "state_tensors": len(opt_state + hook_state),
        "digests": {n: digest(k) for n, k in masks.keep.items()},
        "stats": trainer.hook_state.stats(),
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
    }
    trainer.close()
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune")
    import os

    cwd = os.getcwd()
    os.chdir(__file__.rsplit("/tests/", 1)[0])
    try:
        run_ranks(_train_source, 2, str(out))
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])


@pytest.mark.parametrize("hook", ["dgc", "allreduce", "fp16", "powersgd"])
def test_pruned_weights_and_their_state_stay_zero_with_every_hook(source, hook):
    args = [
        f"--comm.hook={hook}",
        f"--run.name={hook}",
        "--run.max_steps=12",
        "--comm.powersgd_start_iter=4",
    ]
    results = run_ranks(_prune, 2, str(source), args)
    for r in results:
        assert r["zero_weights"] and r["zero_state"]
        assert r["summary"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert results[0]["digests"] == results[1]["digests"]  # rank-different data, same masks
    for k, v in results[0]["model"].items():
        assert torch.equal(v, results[1]["model"][k]), k
    if hook == "dgc":
        assert results[0]["state_tensors"] > 0  # the hook's momentum and residuals checked
        s = results[0]["stats"]
        assert s["pairs_unmasked"] > 5 * s["pairs_sent"]
    if hook == "allreduce":  # SGD's momentum buffers checked
        assert results[0]["state_tensors"] == 4


def test_gradual_pruning_follows_the_cubic_schedule(source):
    args = [
        "--prune.method=gradual",
        "--run.name=gradual",
        "--run.max_steps=20",
        "--prune.start_step=2",
        "--prune.end_step=14",
        "--prune.frequency=4",
        "--prune.initial_sparsity=0.2",
    ]
    r = run_ranks(_prune, 2, str(source), args)[0]
    assert r["zero_weights"] and r["summary"]["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_a_resumed_iterative_run_equals_the_uninterrupted_one(source):
    base = [
        "--prune.method=iterative",
        "--prune.rounds=3",
        "--run.max_steps=18",
        "--checkpoint.every_steps=9",
        "--checkpoint.keep=5",
    ]
    full = run_ranks(_prune, 2, str(source), [*base, "--run.name=full"])[0]
    # interrupted after the step-9 checkpoint, in round 2 of 3: the rest dropped, resumed
    shutil.copytree(source / "full", source / "cut")
    shutil.rmtree(source / "cut/checkpoints/step_00000018")
    cut = run_ranks(_prune, 2, str(source), [*base, "--run.name=cut", "--checkpoint.resume=auto"])
    cut = cut[0]
    assert cut["digests"] == full["digests"]
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    assert cut["summary"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert cut["summary"]["test_accuracy_before"] == full["summary"]["test_accuracy_before"]


def test_lottery_rounds_rewind_to_the_source_init_under_the_new_mask(source):
    base = [
        "--prune.method=lottery",
        "--prune.rounds=2",
        "--prune.sparsity=0.8",
        "--optim.cycles=2",
        "--run.max_steps=10",
        "--checkpoint.every_steps=5",
        "--checkpoint.keep=5",
        "--run.name=lottery",
    ]
    r = run_ranks(_prune, 2, str(source), base)[0]
    assert r["summary"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    # the source's initial weights: dtrain.train seeds, then builds the model
    from dtrain.config import ModelConfig
    from dtrain.data import DataInfo
    from dtrain.models import build_model

    torch.manual_seed(0)
    init = build_model(ModelConfig(), DataInfo.images((1, 8, 8), classes=10, train_size=1,
                                                      test_size=1)).state_dict()  # fmt: skip
    # step 5 is round 2's first: pruned to 80% and rewound; its checkpoint is written after
    at5 = torch.load(source / "lottery/checkpoints/step_00000005/shared.pt", weights_only=True)
    state = at5["state"]
    masks = state["extensions"]["prune"]["masks"]
    assert 1 - sum(int(m.sum()) for m in masks.values()) / sum(
        m.numel() for m in masks.values()
    ) == pytest.approx(0.8, abs=1e-4)
    for name, w in state["model"].items():
        expect = init[name] * masks[name] if name in masks else init[name]
        assert torch.equal(w, expect), name
    for name, w in state["extensions"]["prune"]["rewind"].items():
        assert torch.equal(w, init[name]), name  # kept in the checkpoint
    hook = torch.load(source / "lottery/checkpoints/step_00000005/rank_00001.pt", weights_only=True)
    buffers = [t for e in hook["state"]["hook"]["params"].values() for t in e.values()
               if torch.is_tensor(t) and t.numel() > 1]  # fmt: skip
    assert buffers and all(not t.any() for t in buffers)  # momentum and residuals reset
    rounds = state["extensions"]["prune"]["rounds"]
    assert [x["step"] for x in rounds] == [5] and rounds[0]["sparsity"] == pytest.approx(
        1 - 0.2**0.5, abs=1e-3
    )


# ------------------------------------------------------------------------------ channels


def _taylor_plans(rank, world):
    """Taylor scores on each rank's own gradients, then on all-reduced ones."""
    from dtrain.models.vision import DigitsCNN
    from dtrain.pruning.structured import plan_channels

    torch.manual_seed(0)
    model = DigitsCNN(in_channels=1, num_classes=10)
    g = torch.Generator().manual_seed(rank)  # rank-different data
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()

    def plan():
        return plan_channels(
            model, x[:2], importance="taylor", ratio=0.5, global_pruning=False,
            ignored=[model.fc2],
        ).index_tensors()  # fmt: skip

    local = outcome(lambda: verify_identical(plan(), what="removed channels"))
    for p in model.parameters():  # what the job does first
        torch.distributed.all_reduce(p.grad)
    agreed = outcome(lambda: verify_identical(plan(), what="removed channels"))
    return local, agreed


def test_taylor_on_each_ranks_data_disagrees_and_all_reduced_gradients_agree():
    for local, agreed in run_ranks(_taylor_plans, 2):
        assert local.startswith("Disagreement: ranks disagree on the removed channels of "), local
        assert agreed == "ok"


def test_channel_pruning_job_removes_channels_alike_and_resumes_bit_for_bit(source):
    base = [
        "--prune.granularity=channels",
        "--prune.importance=taylor",
        "--prune.sparsity=0.3",
        "--prune.sweep=0.2",
        "--run.max_steps=12",
        "--checkpoint.every_steps=6",
        "--checkpoint.keep=5",
    ]
    full = run_ranks(_prune, 2, str(source), [*base, "--run.name=ch"])
    a, b = full
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["model"]["conv2.weight"].shape[0] < 32 or a["model"]["fc1.weight"].shape[0] < 128
    assert 0.2 < a["summary"]["sparsity"] < 0.8  # parameters removed
    report = __import__("json").loads((source / "ch/prune_report.json").read_text())
    assert (
        report["macs"] < report["macs_before"]
        and report["parameters"] < report["parameters_before"]
    )
    shutil.copytree(source / "ch", source / "ch_cut")
    shutil.rmtree(source / "ch_cut/checkpoints/step_00000012")
    cut = run_ranks(_prune, 2, str(source), [*base, "--run.name=ch_cut",
                                              "--checkpoint.resume=auto"])[0]  # fmt: skip
    for k, v in a["model"].items():
        assert torch.equal(v, cut["model"][k]), k  # rebuilt architecture, same weights


def _slim_source(rank, world, out_dir, bn_l1):
    cfg = load_config(
        "configs/digits.toml",
        [
            "--logging.progress=false", f"--run.out_dir={out_dir}", f"--run.name=slim{bn_l1}",
            "--run.max_steps=30", "--model.name=resnet20", "--model.width=4",
            f"--optim.bn_l1={bn_l1}", "--comm.hook=allreduce",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t"))
    trainer.train()
    l1 = float(sum(g.abs().sum() for g in trainer.bn_scales))
    trainer.close()
    return l1


def test_network_slimming_shrinks_bn_scales_then_prunes_by_them(source):
    plain = run_ranks(_slim_source, 2, str(source), 0.0)[0]
    slim = run_ranks(_slim_source, 2, str(source), 0.2)[0]
    assert slim < 0.8 * plain  # the L1 penalty pushed the scales down
    args = [
        "--prune.granularity=channels", "--prune.importance=bn_scale", "--prune.sparsity=0.5",
        "--prune.scope=global", "--prune.sweep=0.25", "--model.name=resnet20",
        "--model.width=4", f"--prune.source={source}/slim0.2", "--run.max_steps=6",
        "--run.name=slimmed",
    ]  # fmt: skip
    r = run_ranks(_prune, 2, str(source), args)[0]
    assert r["summary"]["sparsity"] > 0.1


def test_apoz_counts_every_ranks_shard_and_removes_channels_alike(source):
    args = [
        "--prune.granularity=channels", "--prune.importance=apoz", "--prune.sparsity=0.4",
        "--prune.sweep=0.2", "--run.max_steps=4", "--run.name=apoz",
    ]  # fmt: skip
    a, b = run_ranks(_prune, 2, str(source), args)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["model"]["fc1.weight"].shape[0] < 128  # fc1 feeds a ReLU: pruned by its zeros


def _prune_spying(rank, world, out_dir, args):
    """``_prune``, recording the DGC state around every structural change during the run."""
    import copy

    changes = []
    rebuild = Trainer.rebuild

    def spy(self, carry=None):
        before = copy.deepcopy(self.hook_state.state_dict()) if self.step > 0 else None
        rebuild(self, carry)
        if before is not None:
            after = copy.deepcopy(self.hook_state.state_dict())
            changes.append((self.step, before, {n: at for n, (_, at) in carry.items()}, after))

    Trainer.rebuild = spy
    try:
        out = _prune(rank, world, out_dir, args)
    finally:
        Trainer.rebuild = rebuild
    out["changes"] = changes
    return out


def test_iterative_channel_rounds_carry_dgc_state_over_and_resume_bit_for_bit(source):
    base = [
        "--prune.granularity=channels", "--prune.method=iterative", "--prune.rounds=2",
        "--prune.sparsity=0.5", "--prune.sweep=0.2", "--run.max_steps=12",
        "--checkpoint.every_steps=4", "--checkpoint.keep=5", "--comm.hook=dgc",
    ]  # fmt: skip
    a, b = run_ranks(_prune_spying, 2, str(source), [*base, "--run.name=chit"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    [(step, before, kept, after)] = a["changes"]  # round 2 starts at step 6
    assert step == 6 and after["iter"] == before["iter"] and after["iter"] > 0
    assert after["bytes_sent_total"] == before["bytes_sent_total"] > 0
    shrunk, residuals = 0, 0
    for name, entry in before["params"].items():
        assert entry.keys() == after["params"][name].keys()
        for key in {"u", "v", "d"} & entry.keys():
            old, new = entry[key], after["params"][name][key]
            assert torch.equal(new, old[kept[name]]), (name, key)  # sliced like the weights
            shrunk += new.numel() < old.numel()
            residuals += key == "v"
        assert after["params"][name]["u"].abs().sum() > 0  # carried over, not reset
    assert shrunk >= 8 and residuals >= 2  # every layer lost entries; compressed ones have v
    rounds = a["summary"]["sparsity"]
    assert 0.3 < rounds < 0.9
    # interrupted after the step-4 checkpoint, before round 2: resumed, the same model
    shutil.copytree(source / "chit", source / "chit_cut")
    for s in (8, 12):
        shutil.rmtree(source / f"chit_cut/checkpoints/step_{s:08d}")
    cut = run_ranks(_prune, 2, str(source), [*base, "--run.name=chit_cut",
                                              "--checkpoint.resume=auto"])[0]  # fmt: skip
    for k, v in a["model"].items():
        assert torch.equal(v, cut["model"][k]), k


def test_stage_level_pruning_gives_each_resnet_stage_one_smaller_width(source):
    if not (source / "rn").exists():
        run_ranks(_resnet_source, 2, str(source))
    args = [
        "--prune.granularity=channels", "--prune.groups=stages", "--prune.sparsity=0.5",
        "--prune.scope=layer", "--prune.sweep=0.25", "--model.name=resnet20",
        "--model.width=4", f"--prune.source={source}/rn", "--run.max_steps=4",
        "--run.name=stages",
    ]  # fmt: skip
    a, b = run_ranks(_prune, 2, str(source), args)
    for k, v in a["model"].items():  # batch-norm statistics: each rank's last batch
        assert "running" in k or torch.equal(v, b["model"][k]), k
    report = __import__("json").loads((source / "stages/prune_report.json").read_text())
    widths = [(s["width"], s["inside"]) for s in report["stage_widths"]]
    assert widths == [(2, [4, 4, 4]), (4, [8, 8, 8]), (8, [16, 16, 16])]
    assert [s["width"] for s in report["stage_widths_before"]] == [4, 8, 16]
    # the one-shot model again with re-estimated batch-norm statistics, the same on each rank
    key = "test_accuracy_pruned_recalibrated"
    assert a["summary"][key] == b["summary"][key] == report[key] is not None
    assert all("test_accuracy_recalibrated" in x for x in report["sweep"])


def _resnet_source(rank, world, out_dir):
    cfg = load_config(
        "configs/digits.toml",
        [
            "--logging.progress=false", f"--run.out_dir={out_dir}", "--run.name=rn",
            "--run.max_steps=10", "--model.name=resnet20", "--model.width=4",
            "--comm.hook=allreduce",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "t"))
    trainer.train()
    trainer.close()
