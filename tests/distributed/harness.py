"""The multi-rank test harness: :func:`dtrain.spawn.run_ranks` (2-4 gloo ranks, spawned)."""

from dtrain.spawn import run_ranks

__all__ = ["run_ranks"]
