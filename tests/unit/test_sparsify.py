"""The per-parameter math of DGC.md, without processes."""

import math

import pytest
import torch

from dtrain.comm import sparsify


def test_warmup_follows_dgc_md():
    kw = {"density": 0.001, "start_iter": 10, "warmup_steps": 8, "warmup_stages": 4}
    got = [sparsify.warmup_density(t, **kw) for t in range(8, 21)]
    assert (
        got == [1.0, 1.0] + [0.25] * 2 + [0.0625] * 2 + [0.015625] * 2 + [0.25**4] * 2 + [0.001] * 3
    )


def test_warmup_never_below_final_density_and_none_without_warmup():
    kw = {"start_iter": 0, "warmup_steps": 4, "warmup_stages": 4}
    assert [sparsify.warmup_density(t, density=0.1, **kw) for t in range(5)] == [
        0.25,
        0.1,
        0.1,
        0.1,
        0.1,
    ]
    assert (
        sparsify.warmup_density(0, density=0.01, start_iter=0, warmup_steps=0, warmup_stages=4)
        == 0.01
    )


def test_num_selected():
    assert sparsify.num_selected(1000, 0.001) == 1
    assert sparsify.num_selected(1001, 0.001) == 2
    assert sparsify.num_selected(10, 1e-6) == 1
    assert sparsify.num_selected(10, 1.0) == 10
    assert sparsify.num_selected(25_000_000, 0.001) == 25_000


def test_lr_density_steps_in_quarter_octaves_between_a_tenth_and_all():
    assert sparsify.lr_density(0.001, 1.0, 1.0) == 0.001
    assert sparsify.lr_density(0.001, 0.5, 2.0) == 0.001
    assert sparsify.lr_density(0.001, 1.0, 2.0) == pytest.approx(0.002)
    assert sparsify.lr_density(0.001, 1.0, 2.2) == pytest.approx(0.001 * 2**1.25)  # 2.38
    assert sparsify.lr_density(0.001, 0.0, 2.0) == pytest.approx(0.001 * 2**-3.25)  # >= 1/10
    assert sparsify.lr_density(0.001, 1e-9, 2.0) == sparsify.lr_density(0.001, 0.0, 2.0)
    assert sparsify.lr_density(0.5, 1.0, 9.0) == 1.0  # never above 1


def test_lr_density_gain_keeps_the_mean_density():
    cosine = [0.5 * (1 + math.cos(math.pi * t / 3000)) for t in range(300, 3000)]
    gain = sparsify.lr_density_gain(cosine, 0.001)
    mean = sum(sparsify.lr_density(0.001, r, gain) for r in cosine) / len(cosine)
    assert 0.98 * 0.001 <= mean <= 0.001
    assert 2.0 < gain < 2.5  # higher early, lower late
    assert sparsify.lr_density(0.001, cosine[0], gain) > 0.002
    assert sparsify.lr_density(0.001, cosine[-1], gain) < 0.0002
    # a constant rate keeps the constant density; no rate at all leaves the gain at 1
    flat = sparsify.lr_density_gain([0.3] * 50, 0.001)
    assert sparsify.lr_density(0.001, 0.3, flat) == 0.001
    assert sparsify.lr_density_gain([0.0] * 5, 0.001) == 1.0
    assert sparsify.lr_density_gain([], 0.001) == 1.0
    # a step schedule: 10x lower for the last half -> higher before, lower after
    steps = [1.0] * 100 + [0.1] * 100
    g = sparsify.lr_density_gain(steps, 0.01)
    assert sparsify.lr_density(0.01, 1.0, g) > 0.015 > 0.005 > sparsify.lr_density(0.01, 0.1, g)


def test_budget_density_is_the_mean_of_dgc_mds_schedule():
    # 3,000 steps, 300 of warm-up in 4 stages of 75: 75 * (1/4 + 1/16 + 1/64 + 1/256) + 2,700 * d
    mean = 75 * (0.25 + 0.0625 + 0.015625 + 0.00390625) + 2700 * 0.001
    got = sparsify.budget_density(0.001, total_steps=3000, warmup_steps=300)
    assert got == pytest.approx(mean / 3000)  # 0.0092: over 9x the density
    assert sparsify.budget_density(0.001, total_steps=3000) == pytest.approx(0.001)
    # steps before start_iter are dense in every schedule: not part of the budget
    late = sparsify.budget_density(0.001, total_steps=3100, start_iter=100, warmup_steps=300)
    assert late == pytest.approx(got)
    assert sparsify.budget_density(0.01, total_steps=5, start_iter=9) == 0.01


def test_plan_density_per_schedule():
    def cosine(t):
        return 0.5 * (1 + math.cos(math.pi * t / 3000))

    kw = {"factor": cosine, "total_steps": 3000, "warmup_steps": 300}
    assert sparsify.plan_density("constant", 0.001, **kw) == (0.001, 300, None)
    d, warm, gain = sparsify.plan_density("lr", 0.001, **kw)
    assert (d, warm) == (0.001, 300)  # DGC.md's warm-up, then the rate followed
    assert gain == sparsify.lr_density_gain([cosine(t) for t in range(300, 3000)], 0.001)
    d, warm, gain = sparsify.plan_density("budget", 0.001, **kw)
    assert warm == 0 and d == sparsify.budget_density(0.001, total_steps=3000, warmup_steps=300)
    assert gain == sparsify.lr_density_gain([cosine(t) for t in range(3000)], d)


def test_clip_coefficient_scales_to_c_over_sqrt_n():
    g = torch.full((100,), 1.0)  # norm 10
    coef = sparsify.clip_coefficient(g, clip_norm=4.0, world_size=4)  # limit 2
    assert coef.item() == pytest.approx(0.2)
    assert torch.linalg.vector_norm(g * coef).item() == pytest.approx(2.0)
    assert sparsify.clip_coefficient(g, clip_norm=100.0, world_size=4).item() == 1.0


@pytest.mark.parametrize("rate", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_correction(nesterov, rate):
    g, u, v = torch.randn(50), torch.randn(50), torch.randn(50)
    u0, v0 = u.clone(), v.clone()
    u_out, v_out = torch.empty(50), torch.empty(50)
    sparsify.momentum_correction(
        g, u, v, momentum=0.9, nesterov=nesterov, u_out=u_out, v_out=v_out, rate=rate
    )
    u_ref = 0.9 * u0 + g
    v_ref = v0 + rate * (g + 0.9 * u_ref if nesterov else u_ref)
    torch.testing.assert_close(u_out, u_ref)
    torch.testing.assert_close(v_out, v_ref)
    assert torch.equal(u, u0) and torch.equal(v, v0)  # inputs untouched until commit


def test_momentum_zero_is_plain_accumulation():
    g, v, out = torch.randn(20), torch.randn(20), torch.empty(20)
    sparsify.momentum_correction(g, None, v, momentum=0.0, nesterov=False, u_out=None, v_out=out)
    assert torch.equal(out, v + g)
    sparsify.momentum_correction(
        g, None, v, momentum=0.0, nesterov=False, u_out=None, v_out=out, rate=0.5
    )
    torch.testing.assert_close(out, v + 0.5 * g)


def test_select_exact_is_topk_of_magnitude():
    v = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0])
    assert sorted(sparsify.select_exact(v, 3).tolist()) == [1, 2, 4]
    assert sparsify.select_exact(v, 5).tolist() == [0, 1, 2, 3, 4]


DISTRIBUTIONS = {
    "gaussian": lambda n, g: torch.randn(n, generator=g),
    "heavy_tailed": lambda n, g: torch.randn(n, generator=g) / torch.rand(n, generator=g).add(0.01),
    "sparse": lambda n, g: torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.01),
}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("n,density", [(2_000_003, 0.001), (500_000, 0.01), (300_000, 0.25)])
def test_select_sampled_count_and_quality(dist, n, density):
    g = torch.Generator().manual_seed(n)
    v = DISTRIBUTIONS[dist](n, g)
    k = sparsify.num_selected(n, density)
    available = min(k, int(v.count_nonzero()))  # zeros are never worth sending
    for start in range(5):
        idx = sparsify.select_sampled(v, k, sample_ratio=0.01, start=start)
        assert 0.9 * available <= idx.numel() <= k
        assert idx.unique().numel() == idx.numel()
        picked = v[idx].abs()
        assert (picked > 0).all()
        # Everything selected is at least as large as what was left out, up to the threshold
        # estimate: the smallest picked value ranks within the top 2k.
        assert picked.min() >= v.abs().kthvalue(n - min(2 * k, n - 1)).values


def test_select_sampled_never_picks_zeros():
    v = torch.zeros(1_000_000)
    v[[5, 77, 999_999]] = torch.tensor([1.0, -2.0, 3.0])
    idx = sparsify.select_sampled(v, 1000, sample_ratio=0.01)
    assert sorted(idx.tolist()) == [5, 77, 999_999]
    assert sparsify.select_sampled(torch.zeros(1_000_000), 1000, sample_ratio=0.01).numel() == 0


def test_select_sampled_uses_exact_on_small_tensors_and_all_when_k_is_numel():
    v = torch.randn(4000)
    assert sorted(sparsify.select_sampled(v, 4, sample_ratio=0.01).tolist()) == sorted(
        sparsify.select_exact(v, 4).tolist()
    )
    assert sparsify.select_sampled(v, 4000, sample_ratio=0.01).numel() == 4000


def test_select_sampled_finds_a_spike_confined_to_one_block():
    # The block-maximum pass lets a retry look only at candidate blocks: a spike confined to one
    # block, which a 1% strided sample can miss, is still found exactly.
    v = torch.randn(1 << 20) * 1e-3
    v[sparsify.BLOCK * 10 : sparsify.BLOCK * 11] = 10.0
    idx = sparsify.select_sampled(v, sparsify.BLOCK, sample_ratio=0.01)
    assert sorted(idx.tolist()) == list(range(sparsify.BLOCK * 10, sparsify.BLOCK * 11))


def test_select_topk_dispatch():
    v = torch.randn(100_000)
    k = math.ceil(0.01 * v.numel())
    exact = sparsify.select_topk(v, k, exact=True, sample_ratio=0.01)
    assert torch.equal(exact, sparsify.select_exact(v, k))
    sampled = sparsify.select_topk(v, k, exact=False, sample_ratio=0.01, start=3)
    assert torch.equal(sampled, sparsify.select_sampled(v, k, sample_ratio=0.01, start=3))


@pytest.mark.parametrize("nesterov", [False, True])
def test_decay_momentum_plus_hook_momentum_is_sgds_buffer(nesterov):
    g = torch.Generator().manual_seed(3)
    m, wd = 0.9, 0.01
    u, d, buf = torch.zeros(50), torch.zeros(50), torch.zeros(50)
    for _ in range(5):
        w, grad = torch.randn(50, generator=g), torch.randn(50, generator=g)
        d_out, d_before = torch.empty(50), d.clone()
        term = sparsify.decay_momentum(
            w, d, momentum=m, weight_decay=wd, nesterov=nesterov, d_out=d_out
        )
        u = m * u + grad  # the hook's dense momentum
        out = (grad + m * u if nesterov else u) + term
        buf = m * buf + grad + wd * w  # torch.optim.SGD's buffer, decay included
        sgd = grad + wd * w + m * buf if nesterov else buf
        torch.testing.assert_close(out, sgd)
        assert torch.equal(d, d_before)  # the input is untouched until the caller commits
        d = d_out
