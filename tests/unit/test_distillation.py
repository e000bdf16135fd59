"""The distillation losses and feature taps, against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.distillation import FeatureTaps, closest_name, feature_loss, kd_loss, make_adapter
from dtrain.distillation.cache import cache_key, check_shard, fingerprint, shard_file, shard_rows
from dtrain.models.vision import DigitsCNN, resnet20


def _by_hand(s, t, y, temperature, alpha):
    """The loss written out with explicit sums, example by example."""
    total = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        z = sum(math.exp(v) for v in si)
        ce = -(si[yi] - math.log(z))
        ps = [math.exp(v / temperature) for v in si]
        pt = [math.exp(v / temperature) for v in ti]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl = sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
        total += (1 - alpha) * ce + alpha * temperature**2 * kl
    return total / len(y)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (3.0, 1.0)])
def test_kd_loss_matches_the_hand_computation(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 3
    y = torch.randint(0, 4, (5,), generator=g)
    got = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
    assert float(got) == pytest.approx(_by_hand(s, t, y, temperature, alpha), rel=1e-5)


def test_the_limits_and_the_t_squared_factor():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.allclose(kd_loss(s, t, y, temperature=3.0, alpha=0.0), F.cross_entropy(s, y))
    soft = F.kl_div(
        F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean"
    )  # the soft term alone
    assert torch.allclose(kd_loss(s, t, y, temperature=3.0, alpha=1.0), 9 * soft)
    assert float(kd_loss(t, t, y, temperature=3.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    # T² keeps the soft gradients on one scale: at large T they approach (s - t) / (C·T²) · T²
    grads = []
    for temperature in (10.0, 40.0):
        x = s.clone().requires_grad_()
        kd_loss(x, t, y, temperature=temperature, alpha=1.0).backward()
        grads.append(x.grad.abs().mean())
    assert float(grads[1]) == pytest.approx(float(grads[0]), rel=0.1)


def test_per_token_for_language_models_and_no_gradient_into_the_teacher():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (2, 3), generator=g)
    got = kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    flat = kd_loss(s.reshape(6, 7), t.reshape(6, 7), y.reshape(6), temperature=2.0, alpha=0.5)
    assert torch.allclose(got, flat)  # the mean over the 6 tokens
    got.backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0, "alpha": 0.5}, "temperature must be > 0"),
        ({"temperature": 2.0, "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ],
)
def test_bad_temperature_and_alpha(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        kd_loss(x, x, torch.zeros(2, dtype=torch.long), **kwargs)


def test_taps_capture_named_layers_and_name_the_closest_when_wrong():
    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=10, width=4)
    taps = FeatureTaps(model, ["blocks.2", "blocks.5"])
    model(torch.randn(2, 1, 16, 16))
    assert taps.outputs["blocks.2"].shape == (2, 4, 16, 16)
    assert taps.outputs["blocks.5"].shape == (2, 8, 8, 8)
    taps.close()
    taps.outputs.clear()
    model(torch.randn(2, 1, 16, 16))
    assert taps.outputs == {}  # hooks removed
    with pytest.raises(
        KeyError, match=r"no layer named 'blocks\.2\.con1' \(did you mean 'blocks\.2\.conv1'\?\)"
    ):
        FeatureTaps(model, ["blocks.2.con1"])
    assert closest_name("zzz", ["fc", "conv1"]) is None


def test_adapters_map_student_features_to_the_teachers_and_learn():
    assert isinstance(make_adapter((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)
    conv = make_adapter((2, 4, 8, 8), (2, 16, 8, 8))
    assert conv(torch.randn(2, 4, 8, 8)).shape == (2, 16, 8, 8)
    pooled = make_adapter((2, 4, 8, 8), (2, 16, 4, 4))
    assert pooled(torch.randn(2, 4, 8, 8)).shape == (2, 16, 4, 4)
    lin = make_adapter((2, 5, 32), (2, 5, 64))
    assert lin(torch.randn(2, 5, 32)).shape == (2, 5, 64)
    with pytest.raises(ValueError, match="no adapter maps"):
        make_adapter((2, 4, 8, 8), (2, 64))
    # the hint loss: zero for equal features, and an adapter trained on it fits the teacher
    torch.manual_seed(0)
    student, teacher = (
        DigitsCNN(in_channels=1, num_classes=10, width=4),
        DigitsCNN(in_channels=1, num_classes=10, width=8),
    )
    x = torch.randn(16, 1, 8, 8)
    ts, tt = FeatureTaps(student, ["conv2"]), FeatureTaps(teacher, ["conv2"])
    with torch.no_grad():
        teacher(x)
    student(x)
    adapters = {"conv2": make_adapter(ts.outputs["conv2"].shape, tt.outputs["conv2"].shape)}
    same = feature_loss(tt.outputs, tt.outputs, [("conv2", "conv2", 1.0)], {"conv2": nn.Identity()})
    assert float(same) == 0.0
    opt = torch.optim.Adam(adapters["conv2"].parameters(), lr=0.05)
    losses = []
    for _ in range(50):
        loss = feature_loss(
            {"conv2": ts.outputs["conv2"].detach()}, tt.outputs, [("conv2", "conv2", 2.0)], adapters
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------ logit cache


def test_fingerprint_changes_with_any_bit_name_or_shape():
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    base = fingerprint([("w", w)])
    assert fingerprint([("w", w.clone())]) == base
    flipped = w.clone()
    flipped.view(torch.int32)[2, 1] ^= 1  # the lowest mantissa bit of one entry
    assert fingerprint([("w", flipped)]) != base
    assert fingerprint([("v", w)]) != base
    assert fingerprint([("w", w.reshape(3, 4))]) != base
    assert fingerprint([("w", w.double())]) != base
    assert fingerprint([("w", w.t().contiguous().t())]) == base  # layout does not matter


def test_shard_rows_deal_every_sample_to_exactly_one_rank():
    for n, world in [(10, 3), (2, 4), (1500, 2)]:
        rows = sorted(i for r in range(world) for i in shard_rows(n, r, world))
        assert rows == list(range(n))


def test_check_shard_names_what_is_stale(tmp_path):
    teacher, x = {"w": torch.ones(3)}, torch.zeros(5, 2)
    key = cache_key(teacher=teacher, x=x, precision="fp32", rank=0, world_size=2)
    path = shard_file(tmp_path, 0, 2)
    assert path.name == "rank00000-of-00002.pt"
    assert check_shard(path, key) == "missing"
    torch.save({"key": key, "logits": torch.zeros(3, 4)}, path)
    assert check_shard(path, key) is None
    other = cache_key(teacher={"w": torch.full((3,), 2.0)}, x=x + 1, precision="bf16", rank=0,
                      world_size=2)  # fmt: skip
    assert check_shard(path, other) == (
        "built for another teacher (other weights), training data, run.precision"
    )
    path.write_bytes(b"not a tensor file")
    assert check_shard(path, key) == "unreadable"
