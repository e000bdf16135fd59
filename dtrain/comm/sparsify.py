"""The per-parameter math of Deep Gradient Compression, as small pure functions.

Everything here works on one flat tensor and knows nothing about processes, buckets or DDP, so
each step of ``shared/DGC.md`` can be unit-tested on its own. :mod:`dtrain.comm.dgc` strings them
together inside the communication hook.
"""

import math
from collections.abc import Callable

import torch

__all__ = [
    "budget_density",
    "clip_coefficient",
    "decay_momentum",
    "lr_density",
    "lr_density_gain",
    "momentum_correction",
    "num_selected",
    "plan_density",
    "select_exact",
    "select_sampled",
    "select_topk",
    "warmup_density",
]

# Selection works on blocks of this many consecutive elements: one pass computes each block's
# largest magnitude, and only blocks that can hold a selected entry are looked at again. 64 keeps
# the block-max tensor small (n/64) while candidate blocks stay a few percent of the tensor at the
# densities DGC uses.
BLOCK = 64
# The sampled threshold aims this much above k, so that the first pass usually finds >= k entries
# (a cheap truncation) instead of < k (a retry).
_OVERSHOOT = 1.1
# Minimum expected number of sampled entries above the threshold: below this the estimate is too
# noisy to be useful, so the sample is enlarged (or exact selection is used on small tensors).
_MIN_SAMPLE_HITS = 64
# How often the threshold is lowered when fewer than k entries pass, before padding.
MAX_RETRIES = 3


def warmup_density(
    step: int, *, density: float, start_iter: int, warmup_steps: int, warmup_stages: int
) -> float:
    """Density d(t) of DGC.md's exponential warm-up.

    Steps before ``start_iter`` are dense (1.0). For ``start_iter <= t < start_iter +
    warmup_steps`` the density falls in ``warmup_stages`` equal stages, stage i using
    ``max(density, 0.25 ** (i + 1))``; afterwards it is ``density``.
    """
    if step < start_iter:
        return 1.0
    t = step - start_iter
    if t >= warmup_steps:
        return density
    stage = t * warmup_stages // warmup_steps
    return max(density, 0.25 ** (stage + 1))


# lr_density: the factor on the density moves in quarter octaves (2^(j/4)), so a bucket sees a
# few dozen distinct k over a run (each layout's exchange is decided once), and never goes
# below a tenth of the configured density.
_LR_DENSITY_STEPS = 4
LR_DENSITY_FLOOR = 0.1


def budget_density(
    density: float, *, total_steps: int, start_iter: int = 0, warmup_steps: int = 0,
    warmup_stages: int = 4,
) -> float:  # fmt: skip
    """The mean of DGC.md's d(t) (:func:`warmup_density`) over steps ``start_iter`` to
    ``total_steps``: the density that sends, spread evenly, every pair of the warm-up and
    ``density`` over the run (``density`` itself without a warm-up)."""
    steps = range(start_iter, total_steps)
    if not steps:
        return density
    return sum(
        warmup_density(t, density=density, start_iter=start_iter, warmup_steps=warmup_steps,
                       warmup_stages=warmup_stages)
        for t in steps
    ) / len(steps)  # fmt: skip


def lr_density(density: float, rate: float, gain: float) -> float:
    """The density that follows the learning rate: ``density * q(clamp(gain * rate, 0.1,
    1 / density))``, at most 1.

    ``rate`` is r_t = lr_t / lr_ref and ``q`` rounds to the nearest quarter octave (2^(j/4));
    ``gain`` is chosen (:func:`lr_density_gain`) so that the run's mean density is ``density``:
    the same pairs in all, more of them while the rate is high and weights move far.
    """
    x = min(1.0 / density, max(LR_DENSITY_FLOOR, gain * rate))
    x = 2.0 ** (round(_LR_DENSITY_STEPS * math.log2(x)) / _LR_DENSITY_STEPS)
    return min(1.0, density * x)


def lr_density_gain(rates: list[float], density: float) -> float:
    """The largest ``gain`` for which the mean of :func:`lr_density` over ``rates`` (one per
    step, the steps after the density warm-up) is at most ``density``: the same budget of
    pairs as a constant density. For a constant rate the density stays (gain about 1); for a
    cosine to 0 the gain is about 2.24.
    """
    if not any(rates):
        return 1.0  # no rate to follow: the density stays (at the floor where the rate is 0)
    budget = density * (1.0 + 1e-9)  # a mean of equal floats may round above them

    def mean(g: float) -> float:
        return sum(lr_density(density, r, g) for r in rates) / len(rates)

    lo, hi = 0.0, 1.0
    while mean(hi) <= budget and hi < 2.0**30:
        lo, hi = hi, 2.0 * hi
    for _ in range(50):  # mean() is a non-decreasing step function of g
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) <= budget else (lo, mid)
    return lo if lo > 0.0 else hi


def plan_density(
    how: str, density: float, *, factor: Callable[[int], float], total_steps: int,
    start_iter: int = 0, warmup_steps: int = 0, warmup_stages: int = 4,
) -> tuple[float, int, float | None]:  # fmt: skip
    """``(density, warmup_steps, lr_density_gain)`` for the DGC hook, by density schedule.

    ``how``: ``"constant"`` (DGC.md: the warm-up, then ``density``), ``"lr"`` (the warm-up, then
    :func:`lr_density` with mean ``density``) or ``"budget"`` (no separate warm-up: from
    ``start_iter`` on, :func:`lr_density` with mean :func:`budget_density`, every pair of the
    ``constant`` schedule). ``factor(t)``: the learning-rate multiplier at step t.
    """
    if how == "constant":
        return density, warmup_steps, None
    if how == "budget":
        density = budget_density(
            density, total_steps=total_steps, start_iter=start_iter,
            warmup_steps=warmup_steps, warmup_stages=warmup_stages,
        )  # fmt: skip
        warmup_steps = 0
    rates = [factor(t) for t in range(start_iter + warmup_steps, total_steps)]
    return density, warmup_steps, lr_density_gain(rates, density)


def num_selected(numel: int, density: float) -> int:
    """k = max(1, ceil(d * numel)), never more than numel."""
    # round() first: 0.001 * 1000 is 1.0000000000000002 in binary floating point.
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def clip_coefficient(grad: torch.Tensor, clip_norm: float, world_size: int) -> torch.Tensor:
    """Local clipping factor ``min(1, C * N^-1/2 / ||g||)`` as a 0-d tensor (no host sync)."""
    limit = clip_norm / math.sqrt(world_size)
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    return torch.clamp(limit / (norm + 1e-12), max=1.0).to(grad.dtype)


def momentum_correction(
    grad: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor,
    *,
    momentum: float,
    nesterov: bool,
    u_out: torch.Tensor | None,
    v_out: torch.Tensor,
    rate: float = 1.0,
) -> None:
    """Momentum correction, written to ``u_out``/``v_out`` (the inputs are left untouched).

    ``u' = m*u + g``; ``v' = v + r*u'`` (Nesterov: ``v' = v + r*(g + m*u')``), ``r`` = ``rate``
    (1 in the paper; the ``lr_weighted`` mode's learning-rate ratio). With ``momentum == 0``
    there is no ``u`` and ``v' = v + r*g``. Writing to separate outputs lets the caller commit
    the update only once every rank is known to be finite.
    """
    if momentum == 0.0:
        if rate == 1.0:
            torch.add(v, grad, out=v_out)
        else:
            torch.add(v, grad, alpha=rate, out=v_out)
        return
    assert u is not None and u_out is not None
    torch.add(grad, u, alpha=momentum, out=u_out)
    if rate != 1.0:
        if nesterov:
            torch.add(v, grad, alpha=rate, out=v_out)
            v_out.add_(u_out, alpha=momentum * rate)
        else:
            torch.add(v, u_out, alpha=rate, out=v_out)
    elif nesterov:
        torch.add(v, grad, out=v_out)
        v_out.add_(u_out, alpha=momentum)
    else:
        torch.add(v, u_out, out=v_out)


def decay_momentum(
    weight: torch.Tensor,
    d: torch.Tensor,
    *,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    d_out: torch.Tensor,
) -> torch.Tensor:
    """Decay-only momentum ``d' = m*d + wd*w`` written to ``d_out``; returns the update term.

    The term is ``d'`` (Nesterov: ``wd*w + m*d'``). Added to the momentum-corrected gradient it
    makes momentum and decay together exactly SGD's ``buf <- m*buf + g + wd*w``, at every
    learning rate (a decay folded into the optimizer as ``wd/(1-m)`` matches only in steady
    state). ``d`` is left untouched, so the caller can commit the update later.
    """
    torch.mul(d, momentum, out=d_out)
    d_out.add_(weight, alpha=weight_decay)
    if nesterov:
        return torch.add(d_out.mul(momentum), weight, alpha=weight_decay)
    return d_out


def select_exact(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k entries of largest magnitude."""
    if k >= v.numel():
        return torch.arange(v.numel(), device=v.device)
    return torch.topk(v.abs(), k, sorted=False).indices


def _sample_thresholds(v: torch.Tensor, k: int, num_samples: int, start: int) -> list[float]:
    """Threshold estimates for ~1.1k, 2.2k, 4.4k, ... entries from a strided sample of |v|."""
    n = v.numel()
    stride = max(1, n // num_samples)
    sample = v[start % stride :: stride].abs()
    m = sample.numel()
    rank = max(1, math.ceil(_OVERSHOOT * k * m / n))
    ranks = [min(m, rank << i) for i in range(MAX_RETRIES + 1)]
    top = torch.topk(sample, ranks[-1], sorted=True).values
    return top[torch.tensor(ranks, device=v.device) - 1].tolist()


def _above(x: torch.Tensor, thr: float) -> torch.Tensor:
    # A zero (or negative) threshold would select every zero entry; those carry nothing.
    return x > 0 if thr <= 0 else x >= thr


def select_sampled(v: torch.Tensor, k: int, *, sample_ratio: float, start: int = 0) -> torch.Tensor:
    """Indices (int64, at most k) of large-magnitude entries via a sampled threshold.

    DGC.md step 3: the threshold is estimated from a strided sample of ``|v|`` (at least
    ``sample_ratio * numel`` entries, starting at ``start % stride``); entries with ``|v| >= thr``
    are selected; if more than k pass the k largest of them are kept; if fewer, the threshold is
    lowered (to the sample's estimate for twice as many entries) up to :data:`MAX_RETRIES` times.
    May return fewer than k indices; the caller pads. Never selects an entry equal to zero.

    The full tensor is read once (block maxima); only blocks whose maximum passes the threshold are
    read again, so a retry costs little.
    """
    n = v.numel()
    if k >= n:
        return torch.arange(n, device=v.device)
    num_samples = max(math.ceil(sample_ratio * n), math.ceil(_MIN_SAMPLE_HITS * n / k))
    if 2 * num_samples >= n:  # a sample this large costs as much as exact selection
        return select_exact(v, k)
    thresholds = _sample_thresholds(v, k, num_samples, start)

    nb = n // BLOCK
    head = v[: nb * BLOCK].view(nb, BLOCK)
    tail = v[nb * BLOCK :]
    # amax and amin separately: several times faster on CPU than aminmax or abs().amax().
    block_max = torch.maximum(head.amax(dim=1), head.amin(dim=1).neg_())
    tail_abs = tail.abs()

    picked = torch.empty(0, dtype=torch.long, device=v.device)
    for thr in thresholds:
        blocks = torch.nonzero(_above(block_max, thr)).view(-1)
        rows = head.index_select(0, blocks).abs_()
        r, c = torch.nonzero(_above(rows, thr), as_tuple=True)
        picked = blocks[r] * BLOCK + c
        t = torch.nonzero(_above(tail_abs, thr)).view(-1)
        if t.numel():
            picked = torch.cat([picked, t + nb * BLOCK])
        if picked.numel() >= k:
            break
    if picked.numel() > k:
        keep = torch.topk(v[picked].abs(), k, sorted=False).indices
        picked = picked[keep]
    return picked


def select_topk(
    v: torch.Tensor, k: int, *, exact: bool, sample_ratio: float, start: int = 0
) -> torch.Tensor:
    """Dispatch to :func:`select_exact` or :func:`select_sampled`."""
    if exact:
        return select_exact(v, k)
    return select_sampled(v, k, sample_ratio=sample_ratio, start=start)
