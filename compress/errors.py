"""The library's error types (defined in ``formats.errors``, the lowest layer, and shared by both).

Raise ``UserError`` for a mistake the user can fix, with a message naming the problem and the fix;
the CLI prints it on one line and exits 2. Any other exception is a bug (exit 1, with a request to
report it).
"""
from formats.errors import FormatError, OutputError, UserError, UserTypeError

__all__ = ["FormatError", "OutputError", "UserError", "UserTypeError"]
