"""The error every ``epserve`` command raises for a bad argument."""


class UsageError(Exception):
    """A bad argument: printed as ``epserve COMMAND: error: MESSAGE``, exit status 2, no traceback."""
