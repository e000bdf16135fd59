"""Unstructured magnitude pruning: keep the largest |w| of each layer, or of all layers at once.

The masks are boolean tensors shaped like the weights (True: kept). On the same weights,
layer-wise masks equal ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount)``'s and
global ones ``global_unstructured(..., pruning_method=L1Unstructured, amount)``'s: the number
pruned is ``round(sparsity * numel)`` and the pruned entries are ``torch.topk(|w|, largest=False)``
of the same vector, so ties break the same way.
"""

import typing
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["PRUNABLE", "magnitude_masks", "prunable_weights"]

PRUNABLE: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "embedding": (nn.Embedding,),
}
"""Module types whose ``weight`` can be pruned, by the name a config uses."""


def prunable_weights(
    model: nn.Module, *, types: tuple[str, ...], ignore: tuple[str, ...] = ()
) -> dict[str, nn.Parameter]:
    """``{"<module>.weight": parameter}`` of the modules of ``types`` not named in ``ignore``,
    in model order.

    Raises:
        KeyError: a name in ``ignore`` is not a module of ``model``, or a type is unknown (the
            message names it).
    """
    for t in types:
        if t not in PRUNABLE:
            raise KeyError(f"unknown module type {t!r} (one of {', '.join(PRUNABLE)})")
    names = dict(model.named_modules())
    for name in ignore:
        if name not in names:
            raise KeyError(f"no layer named {name!r}")
    classes = tuple(c for t in types for c in PRUNABLE[t])
    out = {}
    for name, module in names.items():
        if isinstance(module, classes) and name not in ignore:
            out[f"{name}.weight"] = typing.cast(nn.Parameter, module.weight)
    return out


def _pruned_count(sparsity: float, numel: int) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return round(sparsity * numel)  # torch.nn.utils.prune's count for a float amount


def _scores(w: Tensor, keep: Tensor | None) -> Tensor:
    """|w| flattened; entries already pruned score -1, so they stay pruned first."""
    s = w.detach().abs().flatten()
    if keep is not None:
        s = s.masked_fill(~keep.flatten(), -1.0)
    return s


def _mask_from(scores: Tensor, pruned: int) -> Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if pruned:
        keep[torch.topk(scores, k=pruned, largest=False).indices] = False
    return keep


def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: str = "layer",
    keep: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks that prune the ``sparsity`` fraction of smallest-magnitude weights.

    Args:
        weights: ``{name: weight}`` (e.g. from :func:`prunable_weights`).
        sparsity: fraction in [0, 1) pruned in each tensor (``scope="layer"``) or over all of
            them together (``"global"``).
        scope: ``"layer"`` or ``"global"``.
        keep: masks already in place (iterative pruning): their pruned entries are pruned first,
            so a mask only ever loses entries while the sparsity grows.

    Returns:
        ``{name: bool mask}`` shaped like each weight (True: kept).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    keep = keep or {}
    scores = {n: _scores(w, keep.get(n)) for n, w in weights.items()}
    if scope == "layer":
        return {
            n: _mask_from(s, _pruned_count(sparsity, s.numel())).view_as(weights[n])
            for n, s in scores.items()
        }
    flat = torch.cat(list(scores.values())) if scores else torch.zeros(0)
    mask = _mask_from(flat, _pruned_count(sparsity, flat.numel()))
    out, pos = {}, 0
    for n, s in scores.items():
        out[n] = mask[pos : pos + s.numel()].view_as(weights[n])
        pos += s.numel()
    return out
