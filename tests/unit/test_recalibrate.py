"""Batch-norm statistics re-estimated after a structural change."""

import copy

import torch
from torch import nn

from dtrain.models.vision import DigitsCNN, resnet20
from dtrain.pruning.recalibrate import recalibrate_batch_norms
from dtrain.pruning.structured import apply_plan, plan_channels


def test_the_statistics_become_the_average_over_the_batches():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(5.0)
    xs = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    model = nn.Sequential(bn).eval()
    assert recalibrate_batch_norms(model, xs) == 1
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))
    assert bn.momentum == 0.1 and not model.training  # put back
    assert recalibrate_batch_norms(DigitsCNN(in_channels=1, num_classes=10), iter(())) == 0


def test_a_one_shot_pruned_resnet_evaluates_like_itself_again():
    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=10, width=8)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():  # statistics of this data in the unpruned model
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(x)
    pruned = copy.deepcopy(model)
    plan = plan_channels(
        pruned, x[:2], importance="l1", ratio=0.5, global_pruning=False, ignored=[pruned.fc]
    )
    apply_plan(plan)
    stale = pruned.eval()(x)
    recalibrate_batch_norms(pruned, [x])
    fresh = pruned.eval()(x)
    train_mode = pruned.train()(x)  # batch statistics: what the re-estimated ones must match
    # (the running variance is the unbiased one: not quite the batch's)
    err, stale_err = (fresh - train_mode).abs().max(), (stale - train_mode).abs().max()
    assert err < 0.02 and stale_err > 10 * err
