"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

import difflib
from typing import Iterable


class UserError(ValueError):
    """A bad path, value, checkpoint or option: the message says what is wrong and how to fix it."""


def nearest_names(name: str, known: Iterable[str], count: int = 3) -> str:
    """A ``did you mean`` hint for an unknown name, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=count, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
