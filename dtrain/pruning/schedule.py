"""Sparsity schedules: Zhu & Gupta's gradual cubic schedule, and prune → fine-tune rounds."""

import math

__all__ = ["cubic_sparsity", "round_sparsity"]


def cubic_sparsity(
    step: int, *, initial: float, final: float, start: int, end: int, frequency: int
) -> float:
    """Zhu & Gupta (2017), "To prune, or not to prune", eq. 1: the target sparsity at ``step``.

    ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_n - t_0))^3`` for t in ``start, start +
    frequency, ...``; it holds between those steps (the masks change every ``frequency`` steps),
    is 0 before ``start`` and ``final`` from ``end`` on.

    Args:
        step: the optimizer step (0-based, the step about to run).
        initial, final: sparsity at ``start`` and from ``end`` on, in [0, 1).
        start, end: first and last step that prune (``end > start``).
        frequency: steps between mask updates (>= 1).
    """
    if not (0.0 <= initial <= final < 1.0):
        raise ValueError(f"need 0 <= initial <= final < 1, got {initial!r}, {final!r}")
    if end <= start or frequency < 1:
        raise ValueError(f"need end > start and frequency >= 1, got {start}, {end}, {frequency}")
    if step < start:
        return 0.0
    if step >= end:
        return final
    t = start + (step - start) // frequency * frequency  # the last update at or before step
    progress = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def round_sparsity(index: int, *, rounds: int, final: float) -> float:
    """The sparsity of prune → fine-tune round ``index`` (0-based) of ``rounds``: each round
    prunes the same fraction of the weights that remain, ``1 - (1 - final)^((index + 1) /
    rounds)``, reaching ``final`` in the last round (Han et al., 2015; Frankle & Carbin, 2019)."""
    if rounds < 1 or not 0 <= index < rounds:
        raise ValueError(f"round {index} of {rounds}")
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final!r}")
    return 1.0 - math.pow(1.0 - final, (index + 1) / rounds)
