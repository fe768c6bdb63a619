"""dmuh's exceptions: one family the CLI turns into a one-line message, and one first-line helper.

Every error a user can fix is a `DmuhError`; its subclass says which part of the input is wrong, and
`field` (when set) names the configuration field, so the command line can name the flag that set it
while a Python caller reads the field's name.
"""

from __future__ import annotations

from typing import Optional


class DmuhError(Exception):
    """Bad input or state that the user can fix: the message names the file, field or flag."""

    def __init__(self, message: str = "", *, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class ConfigError(DmuhError):
    """A configuration value, a method hyper-parameter or a model option out of its allowed range."""


class DataError(DmuhError):
    """A data source, split, label or paired-data file that cannot be used as given."""


class RunError(DmuhError):
    """A run directory, its checkpoint or another file of a run that is missing, damaged or mismatched."""


class SearchError(DmuhError):
    """A codes file, an index or a search request that cannot be used as given."""


class UnavailableError(DmuhError):
    """A server the command needs (a Milvus server) does not answer now, or not yet: nothing is wrong
    with the input, and the same request may succeed later (`dmuh serve` answers it with 503)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none), cut to
    `limit` characters: what a one-line error quotes of a library's exception."""
    message = getattr(error, "message", None)
    if message is None and callable(getattr(error, "details", None)):  # a grpc.RpcError
        message = error.details() or getattr(error.code(), "name", "")
    lines = str(message if message is not None else error).strip().splitlines()
    return (lines[0].strip() if lines else type(error).__name__)[:limit]
