"""The one exception type a user is meant to read."""


class KilnError(Exception):
    """Something the user can fix: bad config, bad input, an engine from another machine.

    Stage scripts print the message on one line and exit non-zero, so the message
    must say what was wrong and how to fix it.
    """


class ValidationFailed(KilnError):
    """The exported graph does not compute what the PyTorch model computes."""


class EngineMismatch(KilnError):
    """An engine was built for other hardware or other library versions."""
