"""Structured channel pruning on Torch-Pruning's graph: plans, removal, the zeroed-channel check,
rebuilding from the history."""

import copy

import pytest
import torch
from torch import nn

from dtrain.jobs.channels import ignored_modules
from dtrain.models.vision import DigitsCNN, resnet18, resnet20
from dtrain.pruning.measure import macs
from dtrain.pruning.structured import (
    apply_plan,
    check_removal,
    kept_indices,
    plan_channels,
    rebuild,
    widths,
)


def _trained_like(model: nn.Module) -> nn.Module:
    """Batch norms with the statistics and scales of a trained model (not the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def _model(name):
    torch.manual_seed(0)
    if name == "digits":
        return DigitsCNN(in_channels=1, num_classes=10), torch.randn(4, 1, 8, 8)
    build = resnet20 if name == "resnet20" else resnet18
    kw = {} if name == "resnet20" else {"width": 8}
    return _trained_like(build(in_channels=1, num_classes=10, **kw)), torch.randn(4, 1, 32, 32)


@pytest.mark.parametrize("name", ["digits", "resnet20", "resnet18"])
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale"])
def test_removal_equals_zeroing_the_removed_channels(name, importance):
    model, x = _model(name)
    if importance == "bn_scale" and name == "digits":
        pytest.skip("no batch norm")
    original = copy.deepcopy(model)
    plan = plan_channels(
        model, x, importance=importance, ratio=0.5, global_pruning=False,
        ignored=ignored_modules(model, ()),
    )  # fmt: skip
    before = macs(original, x[:1])
    apply_plan(plan)
    assert check_removal(original, model, plan, x) < 1e-4
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in original.parameters()
    )
    assert widths(model)[list(widths(model))[-1]] == 10  # the classifier keeps its classes
    assert macs(model, x[:1]) / before < 0.35  # both sides of every convolution


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("groups", ["stages", "blocks"])
def test_stage_level_pruning_keeps_each_stage_one_width(name, groups):
    model, x = _model(name)
    original = copy.deepcopy(model)
    before = original.stage_widths()
    plan = plan_channels(
        model, x, importance="l1", ratio=0.5, global_pruning=False, groups=groups,
        ignored=ignored_modules(model, ()),
    )  # fmt: skip
    apply_plan(plan)
    assert check_removal(original, model, plan, x) < 1e-4
    after = model.stage_widths()
    for b, a in zip(before, after, strict=True):
        if groups == "stages":  # the shared width halves, the blocks' insides stay
            assert a["width"] == b["width"] // 2 and a["inside"] == b["inside"]
        else:
            assert a["width"] == b["width"] and a["inside"] == [w // 2 for w in b["inside"]]
    for block in model.blocks:  # every block's convolutions and shortcut meet the stage width
        assert block.conv1.in_channels in [s["width"] for s in after] + [after[0]["width"]]
    assert widths(model)["fc"] == 10
    if name == "resnet20":  # one side of each pair: half the MACs either way
        assert macs(model, x[:1]) / macs(original, x[:1]) == pytest.approx(0.5, abs=0.05)


def test_the_zero_padding_shortcut_places_the_kept_channels():
    model, x = _model("resnet20")
    shortcut = model.blocks[3].shortcut
    assert shortcut.dst.tolist() == list(range(8, 24))  # 16 channels centred among 32
    original = copy.deepcopy(model)
    plan = plan_channels(
        model, x, importance="l1", ratio=0.5, global_pruning=False, groups="stages",
        ignored=[model.fc],
    )  # fmt: skip
    removed = dict((n, i) for items in plan.items for n, w, i in items if "out_" in w)
    apply_plan(plan)
    assert check_removal(original, model, plan, x) < 1e-4
    gone_in, gone_out = set(removed["stem.0"]), set(removed["blocks.3.conv2"])
    kept_in = [c for c in range(16) if c not in gone_in]
    kept_out = [c for c in range(32) if c not in gone_out]
    pairs = [(kept_in.index(c), kept_out.index(c + 8)) for c in kept_in if c + 8 in kept_out]
    assert list(zip(shortcut.src.tolist(), shortcut.dst.tolist(), strict=True)) == pairs
    assert (shortcut.in_channels, shortcut.out_channels) == (8, 16)


def test_global_round_to_and_taylor_need_the_same_gradients():
    model, x = _model("digits")
    y = torch.randint(0, 10, (4,))

    def plan_with(grad_seed):
        m = copy.deepcopy(model)
        torch.manual_seed(grad_seed)
        nn.functional.cross_entropy(m(x + torch.randn_like(x)), y).backward()
        return plan_channels(
            m, x, importance="taylor", ratio=0.5, global_pruning=True, round_to=4,
            ignored=[m.fc2],
        ).index_tensors()  # fmt: skip

    a, b, c = plan_with(0), plan_with(0), plan_with(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # other data: other channels
    m = copy.deepcopy(model)
    plan = plan_channels(m, x, importance="l1", ratio=0.5, global_pruning=True, round_to=4,
                         ignored=[m.fc2])  # fmt: skip
    apply_plan(plan)
    assert all(w % 4 == 0 for n, w in widths(m).items() if n != "fc2")


def test_the_history_rebuilds_the_architecture_and_loads_its_weights(tmp_path):
    model, x = _model("resnet20")
    plan = plan_channels(
        model, x, importance="l2", ratio=0.4, global_pruning=False,
        ignored=ignored_modules(model, ()),
    )  # fmt: skip
    history = apply_plan(plan)
    torch.save({"history": history, "state": model.state_dict()}, tmp_path / "p.pt")
    saved = torch.load(tmp_path / "p.pt", weights_only=True)
    fresh = rebuild(resnet20(in_channels=1, num_classes=10), saved["history"], x)
    fresh.load_state_dict(saved["state"])
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_kept_indices_say_where_each_remaining_entry_was():
    model, x = _model("resnet20")
    original = copy.deepcopy(model)
    plan = plan_channels(
        model, x, importance="l1", ratio=0.5, global_pruning=False, ignored=[model.fc]
    )
    history = apply_plan(plan)
    kept = kept_indices(original, history, x)
    old = dict(original.named_parameters())
    for name, p in model.named_parameters():  # the weights themselves are such a slice
        assert torch.equal(old[name].detach().reshape(-1)[kept[name]], p.detach().reshape(-1))
    removed = dict((n, i) for items in plan.items for n, w, i in items if "out_" in w)
    rows = [c for c in range(16) if c not in set(removed["blocks.0.conv1"])]
    w = old["blocks.0.conv1.weight"]
    expect = torch.arange(w.numel()).view(w.shape)[rows]  # its input side is the stem's
    cols = [c for c in range(16) if c not in set(removed["stem.0"])]
    assert torch.equal(kept["blocks.0.conv1.weight"], expect[:, cols].reshape(-1))
