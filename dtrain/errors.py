"""The one exception type for mistakes a user can make (config, paths, checkpoints, world size).

Entry points catch :class:`UserError` at the edge, print its message as one line and exit with
code 2; anything else is a bug and keeps its traceback.
"""

__all__ = ["EXIT_USAGE", "UserError"]

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""
