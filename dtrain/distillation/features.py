"""Intermediate outputs captured by layer name, and the adapters between student and teacher.

:class:`FeatureTaps` registers a forward hook on each named module and keeps its latest output;
:func:`make_adapter` builds the learned map from a student feature to the teacher's shape (a 1x1
convolution for feature maps, a linear layer otherwise; pooled to the teacher's spatial size when
it differs), and :func:`closest_name` finds what a user probably meant by a name that is not
there.
"""

import difflib
from collections.abc import Iterable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureTaps", "closest_name", "make_adapter"]


def closest_name(name: str, names: Iterable[str]) -> str | None:
    """The layer name most like ``name`` among ``names`` (None if none is close)."""
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return found[0] if found else None


class FeatureTaps:
    """Forward hooks on ``names`` of ``model``: after a forward pass, ``outputs[name]`` is that
    module's output (a tensor; a tuple's first element). :meth:`close` removes the hooks.

    Raises:
        KeyError: a name is not a module of ``model`` (the message names the closest one).
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        for name in names:
            if name not in modules or not name:
                near = closest_name(name, [n for n in modules if n])
                hint = f" (did you mean {near!r}?)" if near else ""
                self.close()
                raise KeyError(f"no layer named {name!r}{hint}")
            self._handles.append(modules[name].register_forward_hook(self._keep(name)))

    def _keep(self, name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            self.outputs[name] = out[0] if isinstance(out, tuple) else out

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _PoolTo(nn.Module):
    """A 1x1 convolution, then adaptive average pooling to the teacher's spatial size."""

    def __init__(self, cin: int, cout: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.conv(x), self.size)


def make_adapter(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """The map from a student feature of shape ``student`` to the teacher's ``teacher`` (both
    with the batch dimension): identity if equal; a 1x1 convolution for ``[B, C, H, W]`` (and
    pooling to the teacher's H, W when they differ); a linear layer on the last dimension for
    ``[B, F]`` or ``[B, L, F]``.

    Raises:
        ValueError: the shapes cannot be mapped (other ranks or batch/sequence dimensions).
    """
    if tuple(student) == tuple(teacher):
        return nn.Identity()
    if len(student) == len(teacher) == 4:
        if student[2:] == teacher[2:]:
            return nn.Conv2d(student[1], teacher[1], 1, bias=False)
        return _PoolTo(student[1], teacher[1], (teacher[2], teacher[3]))
    if len(student) == len(teacher) and len(student) in (2, 3) and student[:-1] == teacher[:-1]:
        return nn.Linear(student[-1], teacher[-1], bias=False)
    raise ValueError(f"no adapter maps a feature of shape {list(student)} to {list(teacher)}")
