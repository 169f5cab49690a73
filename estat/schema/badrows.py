# -*- test-case-name: estat.test.test_encode_badrows -*-
"""
The table of bad rows (quarantined events): one fixed set of columns for
every stream and every plan, since a bad row's event does not fit the
declared columns, by definition.  The Parquet encoder of bad rows
(L{estat.encode.badrows}) and C{estat-tables --bad} both read it from
here, so the columns are written down once.

Pure Python: nothing here imports pyarrow.
"""

from __future__ import annotations

from .columns import ESTAT, Column, Table

__all__ = ["BAD_ROW_COLUMNS", "ERROR_FIELDS", "bad_row_table"]

#: One schema error: what L{estat.schema.plan.Violation} holds.
ERROR_FIELDS = (Column("pointer", "string"), Column("keyword", "string"),
                Column("message", "string"))

#: In the order of a JSON Lines bad row (docs/schemas.md, "Bad rows").
BAD_ROW_COLUMNS = (
    Column("bad_row", "string"),
    Column("stream", "string"),
    Column("schema", "string"),
    Column("errors", "list", item="struct", fields=ERROR_FIELDS),
    Column("errors_total", "int64"),
    # The event whole and unchanged, as JSON text.
    Column("payload", "json"),
    # Segment: the message's type as its route gave it.
    Column("type", "string"),
    ESTAT,
)


def bad_row_table(stream: str) -> Table:
    """
    The bad rows of C{stream} (C{collect} or C{segment}); the table's
    stream is C{bad_<stream>}.
    """
    return Table(stream=f"bad_{stream}", columns=BAD_ROW_COLUMNS, schema_id="bad rows")
