"""The pruning methods' pure parts: masks, schedules, digests, MaskSet, MACs, the [prune] config."""

import re

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune
from torch.utils.flop_counter import FlopCounterMode

from dtrain.config import load_config
from dtrain.errors import UserError
from dtrain.jobs.pruning import PruneJobConfig
from dtrain.pruning import (
    MaskSet,
    cubic_sparsity,
    digest,
    magnitude_masks,
    prunable_weights,
    round_sparsity,
)
from dtrain.pruning.measure import layer_macs, macs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_layer_masks_equal_torch_l1_unstructured(sparsity):
    net = _net()
    weights = prunable_weights(net, types=("conv", "linear"))
    mine = magnitude_masks(weights, sparsity, scope="layer")
    for name, module in net.named_modules():
        if f"{name}.weight" in mine:
            tprune.l1_unstructured(module, "weight", amount=sparsity)
            assert torch.equal(module.weight_mask.bool(), mine[f"{name}.weight"]), name
            assert 1 - mine[f"{name}.weight"].float().mean() == pytest.approx(sparsity, abs=0.02)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_global_masks_equal_torch_global_unstructured(sparsity):
    net = _net()
    weights = prunable_weights(net, types=("conv", "linear"))
    mine = magnitude_masks(weights, sparsity, scope="global")
    modules = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=tprune.L1Unstructured, amount=sparsity
    )
    for name, m in zip(("0.weight", "2.weight", "4.weight"), modules, strict=True):
        assert torch.equal(m.weight_mask.bool(), mine[name])
    kept = sum(int(k.sum()) for k in mine.values())
    assert kept == sum(k.numel() for k in mine.values()) - round(sparsity * 1144)


def test_masks_only_lose_entries_as_the_sparsity_grows():
    net = _net()
    weights = prunable_weights(net, types=("conv", "linear"))
    keep = magnitude_masks(weights, 0.5, scope="global")
    with torch.no_grad():  # training moved the pruned weights: they still go first
        for n, w in weights.items():
            w.add_(torch.randn_like(w)).mul_(keep[n])
    more = magnitude_masks(weights, 0.8, scope="global", keep=keep)
    for n in keep:
        assert not (more[n] & ~keep[n]).any()
    assert sum(int(m.sum()) for m in more.values()) == 1144 - round(0.8 * 1144)


def test_prunable_weights_by_type_and_ignore():
    net = _net()
    assert list(prunable_weights(net, types=("linear",))) == ["4.weight"]
    assert list(prunable_weights(net, types=("conv", "linear"), ignore=("4",))) == [
        "0.weight",
        "2.weight",
    ]
    with pytest.raises(KeyError, match="no layer named 'fc9'"):
        prunable_weights(net, types=("conv",), ignore=("fc9",))


def test_cubic_schedule_is_zhu_and_gupta():
    kw = {"initial": 0.1, "final": 0.9, "start": 100, "end": 200, "frequency": 10}
    assert cubic_sparsity(99, **kw) == 0.0
    assert cubic_sparsity(100, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(200, **kw) == cubic_sparsity(10_000, **kw) == 0.9
    # eq. 1 at t = start + 5 updates of 10 steps: progress 0.5
    assert cubic_sparsity(150, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert cubic_sparsity(159, **kw) == cubic_sparsity(150, **kw)  # held between updates
    values = [cubic_sparsity(t, **kw) for t in range(100, 201)]
    assert values == sorted(values)
    # steps of equal length prune less and less (the cubic's point)
    assert values[10] - values[0] > values[60] - values[50] > values[100] - values[90]


def test_rounds_prune_the_same_fraction_of_what_remains():
    left = [1 - round_sparsity(i, rounds=3, final=0.875) for i in range(3)]
    assert left == pytest.approx([0.5, 0.25, 0.125])
    assert round_sparsity(4, rounds=5, final=0.9) == pytest.approx(0.9)


def test_digest_tells_masks_apart():
    a = torch.rand(4, 5) > 0.5
    b = a.clone()
    assert digest(a) == digest(b)
    b[2, 3] = ~b[2, 3]
    assert digest(a) != digest(b)
    assert digest(a) != digest(a.view(5, 4))
    assert 0 <= digest(a) < 2**63


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_mask_set_zeroes_weights_and_optimizer_state(opt):
    net = _net()
    weights = prunable_weights(net, types=("conv", "linear"))
    masks = MaskSet(weights, magnitude_masks(weights, 0.7, scope="layer"))
    o = (
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        if opt == "sgd"
        else torch.optim.AdamW(net.parameters(), lr=0.1)
    )
    masks.apply_(o)
    for _ in range(3):
        net(torch.randn(2, 3, 8, 8)).sum().backward()  # gradients reach the pruned weights
        o.step()
        masks.apply_(o)
    for n, w in weights.items():
        pruned = ~masks.keep[n]
        assert (w[pruned] == 0).all() and (w[~pruned] != 0).all()
        for t in o.state[w].values():
            if t.shape == w.shape:
                assert (t[pruned] == 0).all()
    assert masks.sparsity() == pytest.approx(0.7, abs=0.01)
    saved = masks.state_dict()
    assert all(t.dtype == torch.bool and t.device.type == "cpu" for t in saved.values())


def test_macs_are_the_flop_counters_half_and_scale_with_masks():
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    with FlopCounterMode(display=False) as fc:
        net(x)
    assert macs(net, x) == fc.get_total_flops() // 2
    per = layer_macs(net, x)
    assert per["0"] == 8 * 6 * 6 * 3 * 9 and per["4"] == 64 * 10
    keep = {"0.weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool)}
    keep["0.weight"][:4] = True  # half of the first convolution
    assert macs(net, x, keep=keep) == macs(net, x) - per["0"] // 2


def _prune_cfg(*overrides):
    return load_config(None, ["--prune.source=runs/x", *overrides], PruneJobConfig)


def test_prune_config_checks_its_values():
    cfg = _prune_cfg("--prune.sparsity=0.5", "--prune.modules=linear")
    assert cfg.prune.sparsity == 0.5 and cfg.prune.modules == ("linear",)
    assert cfg.run.name == "digits_cnn-digits-prune-oneshot"
    with pytest.raises(UserError, match=r"prune.sparsity must be in \[0, 1\), got 1.0"):
        _prune_cfg("--prune.sparsity=1.0")
    with pytest.raises(UserError, match=re.escape("prune.modules must be one of conv, linear")):
        _prune_cfg("--prune.modules=lstm")
    with pytest.raises(UserError, match=re.escape("prune.initial_sparsity = 0.8 is above")):
        _prune_cfg("--prune.initial_sparsity=0.8", "--prune.sparsity=0.5")
    with pytest.raises(UserError, match=re.escape("unknown key prune.sparsty")):
        _prune_cfg("--prune.sparsty=0.5")
    with pytest.raises(UserError, match=re.escape("prune.source is required")):
        load_config(None, [], PruneJobConfig)


@pytest.mark.parametrize(
    "path", sorted(__import__("pathlib").Path(__file__).parents[2].glob("configs/prune/*.toml"))
)
def test_every_prune_config_loads(path):
    cfg = load_config(str(path), [], PruneJobConfig)
    assert cfg.prune.source and cfg.model.name in ("digits_cnn", "resnet20")


def test_rewinding_needs_rounds_and_a_step_for_late_rewinding():
    assert _prune_cfg("--prune.method=lottery").prune.rewind_mode == "init"
    assert _prune_cfg("--prune.method=iterative").prune.rewind_mode == "none"
    with pytest.raises(UserError, match="'lottery' rewinds"):
        _prune_cfg("--prune.method=lottery", "--prune.rewind=none")
    with pytest.raises(UserError, match="go together"):
        _prune_cfg("--prune.method=lottery", "--prune.rewind=step")
    with pytest.raises(UserError, match="needs rounds"):
        _prune_cfg("--prune.method=gradual", "--prune.rewind=init")


def test_cycles_restart_the_schedule():
    from dtrain.config import OptimConfig
    from dtrain.optim import schedule

    one = schedule(OptimConfig(), total_steps=30, steps_per_epoch=10)
    three = schedule(OptimConfig(cycles=3), total_steps=30, steps_per_epoch=10)
    short = schedule(OptimConfig(), total_steps=10, steps_per_epoch=10)
    assert [three(t) for t in range(30)] == [short(t % 10) for t in range(30)]
    assert three(10) == 1.0 and one(10) < 1.0
