"""Truncated SVD of Linear layers and 1x1 convolutions into two smaller layers.

A weight ``W`` (out × in) of rank r is replaced by ``B @ A`` with ``A = √S_r V_rᵀ`` (r × in) and
``B = U_r √S_r`` (out × r): a layer into ``r`` features without a bias, then one out of them
with the original bias. At full rank the pair computes what the layer did (up to rounding); at
a lower rank its relative error in the Frobenius norm is ``√(Σ_{i>r} s_i² / Σ s_i²)``. A 1x1
convolution is the same matrix product per pixel (its stride stays with the first factor).
"""

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "Factorized",
    "LayerPlan",
    "apply_ranks",
    "choose_rank",
    "eligible_layers",
    "factorize",
    "factorize_layer",
    "factorize_weight",
    "saves_parameters",
]

logger = logging.getLogger(__name__)


class Factorized(nn.Sequential):
    """A layer of rank ``rank``: ``first`` (into ``rank`` features, no bias), then ``second``
    (out of them, the original bias). Plain ``nn.Linear`` / ``nn.Conv2d`` children, so
    quantization (torchao quantizes ``nn.Linear``) and export see ordinary layers."""

    def __init__(self, first: nn.Module, second: nn.Module, *, rank: int) -> None:
        super().__init__(first, second)
        self.rank = rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


@dataclass
class LayerPlan:
    """What :func:`factorize` did to one layer (``rank`` None: left whole, ``reason`` says
    why)."""

    name: str
    full_rank: int
    rank: int | None
    params_before: int
    params_after: int
    energy: float
    """Fraction of Σ s_i² that the kept singular values hold."""
    rel_error: float
    """‖W − BA‖_F / ‖W‖_F."""
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _is_1x1(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.groups == 1
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
    )


def eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every ``nn.Linear`` and ungrouped, unpadded 1x1 ``nn.Conv2d``
    (already factorised layers are not eligible again)."""
    inside = {n for n, m in model.named_modules() if isinstance(m, Factorized)}
    return {
        n: m
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or _is_1x1(m)) and n.rsplit(".", 1)[0] not in inside
    }


def _weight(layer: nn.Module) -> Tensor:
    w = layer.weight
    assert isinstance(w, Tensor)
    return w


def _matrix(layer: nn.Module) -> Tensor:
    w = _weight(layer).detach()
    return w.reshape(w.shape[0], -1) if w.dim() == 4 else w


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """Whether two factors of ``rank`` hold fewer weights than the ``out × in`` matrix."""
    return rank * (in_features + out_features) < in_features * out_features


def choose_rank(singular: Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: ``rank`` (at most the full rank), or the smallest r whose singular
    values hold at least ``energy`` of Σ s_i² (exactly one of the two)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    full = int(singular.numel())
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return min(rank, full)
    assert energy is not None
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = singular.double().square()
    cumulative = power.cumsum(0) / power.sum().clamp_min(1e-300)
    # the first r with cumulative[r-1] >= energy (rounding must not demand more than all)
    r = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)))
    return min(r + 1, full)


def factorize_weight(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A`` the best rank-``rank`` approximation of the
    matrix ``weight`` (out × in): A is rank × in, B is out × rank, each holding √S."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(weight.dtype)
    b = (u[:, :rank] * root[None, :]).to(weight.dtype)
    total = s.square().sum()
    err = math.sqrt(float(s[rank:].square().sum() / total)) if total > 0 else 0.0
    return a, b, err


def _pair(layer: nn.Module, rank: int) -> Factorized:
    """Two layers of the right kinds and shapes for ``layer`` at ``rank`` (weights unset)."""
    bias = layer.bias is not None
    device, dtype = _weight(layer).device, _weight(layer).dtype
    if isinstance(layer, nn.Linear):
        first: nn.Module = nn.Linear(layer.in_features, rank, False, device, dtype)
        second: nn.Module = nn.Linear(rank, layer.out_features, bias, device, dtype)
    else:
        assert isinstance(layer, nn.Conv2d)
        sh, sw = layer.stride
        first = nn.Conv2d(
            layer.in_channels, rank, 1, stride=(sh, sw), bias=False, device=device, dtype=dtype
        )
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=bias, device=device, dtype=dtype)
    return Factorized(first, second, rank=rank)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _count(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@torch.no_grad()
def factorize_layer(layer: nn.Module, rank: int) -> tuple[Factorized, float]:
    """``(the two-layer replacement of layer at rank, its relative error)``, whether or not it
    saves parameters (at full rank it computes what ``layer`` does)."""
    w = _matrix(layer)
    a, b, err = factorize_weight(w, rank)
    pair = _pair(layer, rank)
    w0, w1 = _weight(pair[0]), _weight(pair[1])
    w0.copy_(a.reshape(w0.shape))
    w1.copy_(b.reshape(w1.shape))
    if isinstance(layer.bias, Tensor):
        bias = pair[1].bias
        assert isinstance(bias, Tensor)
        bias.copy_(layer.bias)
    pair.train(layer.training)
    return pair, err


@torch.no_grad()
def factorize(
    model: nn.Module,
    layers: dict[str, nn.Module],
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> list[LayerPlan]:
    """Replace each of ``layers`` (from :func:`eligible_layers`) in ``model`` by its truncated
    SVD (:class:`Factorized`) at ``rank`` or the rank that keeps ``energy``, in place. A layer
    where the two factors would not hold fewer parameters stays whole (its plan says why).
    ``model.lowrank_ranks`` records ``{name: rank}`` of every factorised layer (saved with the
    checkpoints, so :func:`apply_ranks` rebuilds the structure)."""
    plans = []
    ranks: dict[str, int] = dict(getattr(model, "lowrank_ranks", {}))
    for name, layer in layers.items():
        w = _matrix(layer)
        out_f, in_f = w.shape
        s = torch.linalg.svdvals(w.double())
        r = choose_rank(s, rank=rank, energy=energy)
        power = s.square()
        kept = float(power[:r].sum() / power.sum()) if power.sum() > 0 else 1.0
        before = _count(layer)
        if not saves_parameters(out_f, in_f, r):
            why = f"rank {r} of {out_f}x{in_f} saves no parameters"
            err = math.sqrt(max(0.0, 1.0 - kept))
            plans.append(LayerPlan(name, int(s.numel()), None, before, before, kept, err, why))
            continue
        pair, err = factorize_layer(layer, r)
        _replace(model, name, pair)
        ranks[name] = r
        plans.append(LayerPlan(name, int(s.numel()), r, before, _count(pair), kept, err))
        logger.info(
            "low-rank %s: %dx%d -> rank %d (relative error %.3g)", name, out_f, in_f, r, err
        )
    setattr(model, "lowrank_ranks", ranks)  # noqa: B010 (saved with its checkpoints)
    return plans


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """``model`` with the layers ``ranks`` names replaced by :class:`Factorized` pairs of those
    ranks (weights to be loaded next): the structure :func:`factorize` made, rebuilt.

    Raises:
        KeyError: a name that is not an eligible layer of ``model``.
    """
    layers = eligible_layers(model)
    for name, r in ranks.items():
        if name not in layers:
            raise KeyError(name)
        _replace(model, name, _pair(layers[name], int(r)))
    setattr(model, "lowrank_ranks", dict(ranks))  # noqa: B010
    return model
