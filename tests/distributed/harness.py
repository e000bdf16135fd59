"""The multi-rank test harness: :func:`dtrain.spawn.run_ranks` (2-4 gloo ranks, spawned)."""

from collections.abc import Callable

from dtrain.spawn import run_ranks

__all__ = ["outcome", "run_ranks"]


def outcome(fn: Callable[[], object]) -> str:
    """``"ok"``, or the exception ``fn`` raised as ``"Type: message"`` (to return from a rank)."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"
