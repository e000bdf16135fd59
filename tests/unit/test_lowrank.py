"""Low-rank factorisation: exact at full rank, the reported error at lower ranks, the rank
rules, and the structure rebuilt from a checkpoint."""

import math

import pytest
import torch
from torch import nn

from dtrain.checkpoint import restore_model
from dtrain.lowrank import (
    Factorized,
    apply_ranks,
    choose_rank,
    eligible_layers,
    factorize,
    factorize_layer,
    factorize_weight,
    saves_parameters,
)
from dtrain.models.vision import DigitsCNN


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 32, 1, stride=2),  # eligible: 1x1, strided
        nn.Conv2d(32, 32, 1, groups=4),  # grouped: not eligible
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 24),
    )


@pytest.mark.parametrize("layer", [nn.Linear(40, 24), nn.Conv2d(16, 12, 1, stride=2)])
def test_full_rank_reproduces_the_layer(layer):
    torch.manual_seed(0)
    x = torch.randn(5, 40) if isinstance(layer, nn.Linear) else torch.randn(5, 16, 6, 6)
    pair, err = factorize_layer(layer, 12 if isinstance(layer, nn.Conv2d) else 24)
    assert isinstance(pair, Factorized)
    assert err < 1e-7
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-5)


def test_lower_rank_error_is_the_tail_of_the_singular_values():
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    for r in (1, 8, 30):
        a, b, err = factorize_weight(layer.weight.detach(), r)
        measured = float(torch.linalg.norm(w - b.double() @ a.double()) / torch.linalg.norm(w))
        expected = math.sqrt(float(s[r:].square().sum() / s.square().sum()))
        assert err == pytest.approx(expected, rel=1e-6)
        assert measured == pytest.approx(expected, rel=1e-4)
        assert a.shape == (r, 64) and b.shape == (48, r)


def test_choose_rank_by_energy_and_by_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, energy=16 / 22) == 1
    assert choose_rank(s, energy=16 / 22 + 1e-6) == 2
    assert choose_rank(s, energy=0.99) == 4
    assert choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, rank=2) == 2
    assert choose_rank(s, rank=99) == 4
    for bad in ({"rank": 0}, {"energy": 0.0}, {"energy": 1.5}, {}, {"rank": 1, "energy": 0.5}):
        with pytest.raises(ValueError):
            choose_rank(s, **bad)


def test_saves_parameters():
    assert saves_parameters(128, 512, 102) and not saves_parameters(128, 512, 103)
    assert not saves_parameters(10, 10, 5)


def test_factorize_replaces_eligible_layers_and_skips_those_that_save_nothing():
    torch.manual_seed(0)
    model = _conv_net().eval()
    layers = eligible_layers(model)
    assert list(layers) == ["1", "4"]
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    plans = {p.name: p for p in factorize(model, layers, rank=6)}
    assert isinstance(model[1], Factorized) and isinstance(model[4], Factorized)
    assert plans["4"].params_after == 6 * (512 + 24) + 24 < plans["4"].params_before
    assert model.lowrank_ranks == {"1": 6, "4": 6}
    assert not torch.allclose(model(x), before)  # rank 6 of 8 and 24: not exact
    assert eligible_layers(model) == {}  # the factors are not factorised again
    whole = _conv_net()
    plans = factorize(whole, eligible_layers(whole), rank=8)  # 8x32 at rank 8: no saving
    assert plans[0].rank is None and "saves no parameters" in plans[0].reason
    assert not isinstance(whole[1], Factorized)


def test_a_factorised_checkpoint_is_rebuilt_before_its_weights_load():
    torch.manual_seed(0)
    model = DigitsCNN(in_channels=1, num_classes=10).eval()
    factorize(model, {"fc1": model.fc1}, energy=0.5)
    shared = {"model": model.state_dict(), "lowrank": model.lowrank_ranks}
    fresh = restore_model(
        DigitsCNN(in_channels=1, num_classes=10), shared, what="t", example_shape=(1, 8, 8)
    ).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    assert fresh.lowrank_ranks == model.lowrank_ranks
    with pytest.raises(KeyError):
        apply_ranks(DigitsCNN(in_channels=1, num_classes=10), {"conv1": 2})
