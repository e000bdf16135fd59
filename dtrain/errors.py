"""The exception types for mistakes a user can make (config, paths, checkpoints, world size).

Entry points catch :class:`UserError` at the edge, print its message as one line and exit with
code 2; anything else is a bug and keeps its traceback. Who prints:

* :class:`UserError` — the same on every rank (the config, the command line): rank 0 prints it.
* :class:`RankError` — this rank's own problem (its checkpoint file, its data path, its GPU):
  the rank that raises it prints it.
* :class:`PeerError` — another rank failed and printed why; this rank only exits with code 2.
"""

__all__ = ["EXIT_USAGE", "PeerError", "RankError", "UserError", "should_print"]

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class RankError(UserError):
    """A :class:`UserError` that this rank may hold alone: printed by the rank that raises it."""


class PeerError(UserError):
    """Another rank failed with a :class:`UserError` (it printed the message): exit quietly."""


def should_print(error: UserError, rank: int) -> bool:
    """Whether ``rank`` prints ``error``: exactly one line per failure across the job."""
    if isinstance(error, PeerError):
        return False
    return rank == 0 or isinstance(error, RankError)
