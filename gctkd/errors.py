"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

import difflib
from typing import Iterable


class UserError(ValueError):
    """A bad path, value, checkpoint or option: the message says what is wrong and how to fix it."""


def nearest_names(name: str, known: Iterable[str], count: int = 3) -> str:
    """A ``did you mean`` hint for an unknown name, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=count, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class RunStopped(Exception):
    """A run that stopped before its end on purpose; the message says where it stands.

    Args:
        message: one line: why it stopped, what was saved, how to go on.
        exit_code: the process's exit status.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NumericalFault(RunStopped):
    """A non-finite loss, gradient or weight: the run stops, keeping its last good checkpoint."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


class Interrupted(RunStopped):
    """SIGTERM: the run wrote a checkpoint and stopped; ``--resume`` continues it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=143)
