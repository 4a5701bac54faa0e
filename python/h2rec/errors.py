"""The one exception hierarchy of h2rec.

Every error a user can cause is an ``H2RecError``; the data and config errors also subclass
``ValueError`` so callers that already catch ``ValueError`` keep working. Messages name the file,
field (or argument) and value.
"""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 200  # characters of a bad value shown in a message


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``value`` quoted and escaped (control characters, quotes), cut at ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return f"{text[:limit]!r}... ({len(text) - limit:,} more characters)"
    return repr(text)


class H2RecError(Exception):
    """Base class of every error h2rec raises on purpose."""


class DataError(H2RecError, ValueError):
    """Bad input data: a file, line, column or value that cannot be used."""


class ConfigError(H2RecError, ValueError):
    """A configuration key that does not exist or a value of the wrong type."""


class CheckpointError(H2RecError, ValueError):
    """A checkpoint that does not fit the dataset, codes or model it is loaded with."""


class OutputError(DataError):
    """An output that h2rec refuses to write or replace, or a folder another process holds (a
    DataError, as the refusal of an existing output always was)."""
