"""User-facing errors.

Every problem a user can fix (bad input file, bad config value, wrong store) is raised as a
:class:`StkdError`. The CLI prints it as one line, without a traceback unless ``--debug`` is given,
and exits non-zero. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class StkdError(Exception):
    """An error caused by user input, with a message that says what to fix.

    Args:
        message: what is wrong and the rule it breaks.
        where: the file, field or option the error is about (printed first).
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class InputError(StkdError):
    """A source file or argument is malformed (missing, ragged, wrong shape, ...)."""


class StoreError(StkdError):
    """A dataset store is missing, corrupted or of another schema version."""


class ConfigError(StkdError):
    """A configuration value or key is invalid."""
