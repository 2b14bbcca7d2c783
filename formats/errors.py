"""The project's error types: a ``UserError`` is a mistake the user can fix (exit 2 at the CLI, one line).

Anything else raised by the library is a bug and is reported as one (exit 1, asking for a report).
``UserError`` subclasses ``ValueError`` so that callers who catch ``ValueError`` keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input, a bad file or an unusable output location; the message names the problem and the fix."""


class FormatError(UserError):
    """A file that is not a valid artifact: truncated, malformed, inconsistent, corrupted or too large."""


class OutputError(UserError):
    """An output cannot be written (exists, read-only, disk full, not a directory); nothing was left behind."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type from the user (also a ``TypeError``, for Python callers)."""
