"""The masks kept in place while a pruned model trains."""

import torch
from torch import Tensor, nn

__all__ = ["MaskSet"]


class MaskSet:
    """Boolean masks (True: kept) on named parameters, kept through training.

    :meth:`apply_` zeroes the pruned entries of each weight and of every optimizer state tensor
    shaped like it (SGD's momentum buffer, Adam's moments): after it, a pruned weight is exactly
    zero and nothing remembers a gradient for it. Call it after every optimizer step (the dense
    hooks' gradients reach pruned weights; DGC with the masks given to its state never sends
    them). :meth:`state_dict` is plain tensors (``torch.load(weights_only=True)``).

    Args:
        params: ``{name: parameter}`` of the masked weights.
        masks: ``{name: bool tensor}`` shaped like each parameter; the names must match.
    """

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, Tensor]) -> None:
        if set(params) != set(masks):
            raise ValueError(
                f"masks for {sorted(set(masks) ^ set(params))[:3]} do not match the parameters"
            )
        self.params = dict(params)
        self.keep: dict[str, Tensor] = {}
        for name, p in self.params.items():
            m = masks[name]
            if m.shape != p.shape:
                raise ValueError(f"mask of {name} is {list(m.shape)}, the weight {list(p.shape)}")
            self.keep[name] = m.to(device=p.device, dtype=torch.bool)

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned entries of the weights and of ``optimizer``'s state for them."""
        for name, p in self.params.items():
            keep = self.keep[name]
            p.mul_(keep)
            if optimizer is not None:
                for t in optimizer.state.get(p, {}).values():
                    if isinstance(t, Tensor) and t.shape == p.shape:
                        t.mul_(keep)

    def by_param(self) -> dict[nn.Parameter, Tensor]:
        """``{parameter: mask}`` (for :meth:`dtrain.comm.DGCState.set_masks`)."""
        return {p: self.keep[n] for n, p in self.params.items()}

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (kept, numel)}``."""
        return {n: (int(k.sum()), k.numel()) for n, k in self.keep.items()}

    def sparsity(self) -> float:
        """Fraction of the masked weights that are pruned."""
        counts = self.counts().values()
        kept, total = sum(k for k, _ in counts), sum(n for _, n in counts)
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: bool mask}`` on the CPU."""
        return {n: k.cpu() for n, k in self.keep.items()}
