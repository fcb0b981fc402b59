"""User-facing errors.

Everything a user can get wrong (a name, a flag, a file) raises a `SpaError` subclass whose message is one
line that says what is wrong and what to do. The CLI prints it and exits with code 2; it never shows a
traceback for these. This module must never hold logic beyond the exception types.
"""

from __future__ import annotations


class SpaError(Exception):
    """A mistake in user input, with a one-line message meant to be shown as is."""

    exit_code: int = 2


class UnknownNameError(SpaError, KeyError):
    """An env, variant, policy or other name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LayoutError(SpaError, ValueError):
    """A puzzle layout text that cannot be parsed."""
