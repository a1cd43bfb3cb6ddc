"""Errors of the lakehouse layer (all LakewardenError: one line, no traceback, exit 2).

::

    LakewardenError
    └── LakehouseError
        ├── TableError      a table is missing, unreadable, or named wrongly
        ├── IngestError     a file cannot be ingested (format, encoding, shape, drift)
        ├── SuggestError    a file cannot be sampled for a draft policy, or the draft not written
        ├── SqlError        a query is refused or fails
        └── StreamError     a stream cannot start or go on (broker, topic, retention)
"""

from __future__ import annotations

from governance.errors import LakewardenError


class LakehouseError(LakewardenError):
    exit_code = 2


class TableError(LakehouseError):
    """A governed table is missing, unreadable, or named wrongly."""


class IngestError(LakehouseError):
    """A file cannot be ingested; the message names the file and what is wrong."""


class SuggestError(LakehouseError):
    """``policy suggest`` cannot sample the file or write the draft; the message names the file."""


class SqlError(LakehouseError):
    """A query is refused (not read-only, unknown table, table function) or fails."""


class StreamError(LakehouseError):
    """A stream cannot start or go on: the broker, the topic, or its retention against the policy."""
