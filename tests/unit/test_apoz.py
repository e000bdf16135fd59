"""APoZ: which layers feed a ReLU, zero counts, and the channels it removes first."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dtrain.config import load_config
from dtrain.errors import UserError
from dtrain.jobs.pruning import PruneExtension, PruneJobConfig
from dtrain.models.vision import DigitsCNN, resnet20
from dtrain.pruning.apoz import ApozImportance, count_zeros, relu_feeders
from dtrain.pruning.structured import apply_plan, plan_channels


def test_the_layers_that_feed_a_relu():
    assert relu_feeders(DigitsCNN(in_channels=1, num_classes=10)) == ["conv1", "conv2", "fc1"]
    r = relu_feeders(resnet20(in_channels=1, num_classes=10))
    assert r == ["stem.1", *(f"blocks.{i}.bn1" for i in range(9))]  # bn2 feeds the add
    assert relu_feeders(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))) == []


def test_zero_counts_per_channel():
    torch.manual_seed(0)
    m = DigitsCNN(in_channels=1, num_classes=10)
    xs = [torch.randn(5, 1, 8, 8) for _ in range(3)]
    counts = count_zeros(m, ["conv1"], xs)["conv1"]
    out = torch.cat([m.conv1(x) for x in xs])
    assert torch.equal(counts[:-1], (out <= 0).sum(dim=(0, 2, 3)).double())
    assert counts[-1] == 15 * 8 * 8


def test_the_channels_with_the_most_zeros_go_first():
    torch.manual_seed(0)
    m = DigitsCNN(in_channels=1, num_classes=10)
    dead = [1, 4, 6, 9, 11, 13, 14, 15]
    with torch.no_grad():
        m.conv1.bias[dead] = -100.0  # these channels never pass the ReLU
    x = torch.randn(32, 1, 8, 8)
    counts = count_zeros(m, relu_feeders(m), [x])
    imp = ApozImportance({n: c[:-1] / c[-1] for n, c in counts.items()})
    plan = plan_channels(
        copy.deepcopy(m), x[:2], importance=imp, ratio=0.5, global_pruning=False,
        ignored=[m.fc2],
    )  # fmt: skip
    removed = {items[0][0]: items[0][2] for items in plan.items}
    assert removed["conv1"] == dead
    apply_plan(plan)


def test_apoz_on_a_model_without_relus_is_one_line():
    cfg = load_config(
        None,
        ["--prune.source=x", "--prune.granularity=channels", "--prune.importance=apoz"],
        PruneJobConfig,
    )
    ext = PruneExtension(cfg)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UserError, match="needs ReLUs after convolutions or linear layers"):
        ext._check_channels(SimpleNamespace(bn_scales=[], total_steps=10), model)
