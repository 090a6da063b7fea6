"""The one exception type that reaches users as a one-line message.

Library code raises :class:`TradeMDError` for every problem a user can fix (a missing file,
a wrong schema, an impossible temperature). The message names the problem and the fix; the
CLI prints it on one line and exits with status 1, without a traceback.
"""

__all__ = ["TradeMDError"]


class TradeMDError(Exception):
    """A problem with the user's input or environment, with its fix in the message."""
