"""The one exception type a user is meant to read."""

from __future__ import annotations

from typing import Callable


class KilnError(Exception):
    """Something the user can fix: bad config, bad input, an engine from another machine.

    Stage scripts print the message on one line and exit non-zero, so the message
    must say what was wrong and how to fix it.
    """


class ValidationFailed(KilnError):
    """The exported graph does not compute what the PyTorch model computes."""


class EngineMismatch(KilnError):
    """An engine was built for other hardware or other library versions."""


def run_cli(main: Callable[[list[str]], int]) -> None:
    """Run a `python -m kiln.<module>` entry point: a KilnError is one line on stderr and exit status 1."""
    import sys

    try:
        sys.exit(main(sys.argv[1:]))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(1)
