"""The project's error type for mistakes a user can fix (the ``t2r`` command prints it as one line, exit 2)."""


class T2RError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""
