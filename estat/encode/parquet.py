# -*- test-case-name: estat.test.test_encode_parquet -*-
"""
C{OUTPUT_FORMAT=parquet}: each batch becomes one Parquet file (one row
group) of the stream's declared columns (L{estat.schema.columns.Table}),
written with pyarrow.  This module imports pyarrow; nothing imports it
unless Parquet is chosen.

The columns are built in Python from the parsed events (L{RowBuilder});
bench/parquet.py measures that against pyarrow's own JSON reader and
README ("Tables") gives the figures.
"""

from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from zope.interface import implementer

from ..encoder import Batch, EncodedObject, _poison_line, content_md5, encode_object
from ..event import UnencodedEvent
from ..interfaces import IEncoder
from ..schema.columns import ESTAT_COLUMN, EXTRA_COLUMN, SCHEMA_ERRORS_COLUMN, Column, Table
from .rows import RowBuilder

__all__ = ["ParquetEncoder", "arrow_schema", "arrow_type", "SUFFIX", "read_events"]

SUFFIX = ".parquet"

#: Default levels when PARQUET_COMPRESSION names none.
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6, "brotli": 5}

_SCALAR_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
    "json": pa.string(),
}


def arrow_type(column: Column) -> pa.DataType:
    if column.kind == "struct":
        return pa.struct([arrow_field(f) for f in column.fields])
    if column.kind == "list":
        # "element", the name Parquet's LIST layout gives the item (and
        # pyarrow reads back), so a stored file's schema equals this one.
        if column.item == "struct":  # the bad rows' errors
            return pa.list_(pa.field("element", pa.struct([arrow_field(f)
                                                           for f in column.fields])))
        return pa.list_(pa.field("element", _SCALAR_TYPES[column.item]))
    return _SCALAR_TYPES[column.kind]


def arrow_field(column: Column) -> pa.Field:
    metadata = {}
    if column.kind == "json":
        metadata[b"estat.kind"] = b"json"
    if column.derived:
        metadata[b"estat.source"] = ".".join(column.source).encode("utf-8")
    return pa.field(column.name, arrow_type(column), nullable=True,
                    metadata=metadata or None)


def arrow_schema(table: Table) -> pa.Schema:
    """
    The Arrow schema of every file of C{table}'s stream: its columns, then
    C{_extra}.  The same table always gives the same schema.
    """
    fields = [arrow_field(c) for c in table.columns]
    fields.append(pa.field(EXTRA_COLUMN, pa.string(), nullable=True,
                           metadata={b"estat.kind": b"json"}))
    return pa.schema(fields, metadata={b"estat.stream": table.stream.encode("utf-8"),
                                       b"estat.table": b"1"})


def _leaves(prefix: str, typ: pa.DataType):
    if pa.types.is_struct(typ):
        for child in typ:
            yield from _leaves(f"{prefix}.{child.name}", child.type)
    elif pa.types.is_list(typ):
        yield from _leaves(f"{prefix}.list.element", typ.value_type)
    else:
        yield prefix, typ


def leaf_encodings(schema: pa.Schema) -> dict:
    """
    C{write_table}'s encoding arguments: timestamp and date columns are
    C{DELTA_BINARY_PACKED} (a batch's C{received_at} values are distinct
    and close together, so a dictionary of them is as large as the data and
    deltas take a few bits each: 21 kB against 0.2 kB for 5,000 events on
    the bench), every other column keeps the dictionary.  Every engine
    Estat's DDL targets reads both encodings.
    """
    leaves = [leaf for field in schema for leaf in _leaves(field.name, field.type)]
    delta = [path for path, typ in leaves
             if pa.types.is_timestamp(typ) or pa.types.is_date(typ)]
    if not delta:
        return {}
    return {"use_dictionary": [path for path, _ in leaves if path not in delta],
            "column_encoding": {path: "DELTA_BINARY_PACKED" for path in delta}}


@implementer(IEncoder)
class ParquetEncoder:
    """
    @ivar table: the stream's columns.
    @ivar compression: C{(codec, level or None)}, C{PARQUET_COMPRESSION}.
    @ivar gzip_level: for the object of raw originals of events that could
        not be encoded (gzip JSON Lines under C{DLQ_PREFIX}, as always).
    """

    suffix = SUFFIX

    def __init__(self, table: Table, compression: tuple = ("zstd", None),
                 gzip_level: int = 6) -> None:
        self.table = table
        self.stream = table.stream
        self.schema = arrow_schema(table)
        self.builder = RowBuilder(table)
        codec, level = compression
        self.codec = codec
        self.level = level if level is not None else DEFAULT_LEVELS.get(codec)
        self.gzip_level = gzip_level
        self.layout = leaf_encodings(self.schema)
        self._schema_errors = any(c.name == SCHEMA_ERRORS_COLUMN for c in table.columns)

    def encode(self, batch: Batch) -> list:
        events = []
        for _, payload in batch.events:
            if type(payload) is bytes:
                events.append(orjson.loads(payload))
            else:
                events.append(payload.obj)
        if self._schema_errors:
            events = [_lift_schema_errors(e) for e in events]
        columns, misfits, failed = self.builder.columns(events)
        objects = []
        if len(failed) < len(events):
            body = self.write(columns)
            objects.append(EncodedObject(
                key=batch.key, body=body, count=len(events) - len(failed),
                content_md5=content_md5(body),
                misfits=tuple(sorted(misfits.items()))))
        if failed:
            poison = []
            for index, error in failed:
                payload = batch.events[index][1]
                if type(payload) is bytes:
                    payload = UnencodedEvent(obj=events[index], raw=payload)
                poison.append(_poison_line(payload, error))
            objects.append(encode_object(batch.poison_key, poison, self.gzip_level,
                                         poison=True))
        return objects

    def write(self, columns: list) -> bytes:
        """
        One Parquet file of one row group from the built columns.
        """
        arrays = [pa.array(values, type=field.type)
                  for values, field in zip(columns, self.schema)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=self.codec if self.codec != "none" else None,
                       compression_level=self.level,
                       row_group_size=max(1, table.num_rows), **self.layout)
        return sink.getvalue().to_pybytes()


def _lift_schema_errors(event):
    """
    A flagged event's C{_estat.schema_errors} in its own column (the
    C{_estat} struct keeps the server fields every event has).
    """
    server = event.get(ESTAT_COLUMN) if type(event) is dict else None
    if type(server) is not dict or "schema_errors" not in server:
        return event
    event = dict(event)
    event[ESTAT_COLUMN] = {k: v for k, v in server.items() if k != "schema_errors"}
    event[SCHEMA_ERRORS_COLUMN] = server["schema_errors"]
    return event


def read_events(data, table: Table | None = None) -> list:
    """
    The events of a stored Parquet file, rebuilt (L{estat.encode.rows.rebuild_event}):
    what C{OUTPUT_FORMAT=jsonl} would have stored for them, key order
    aside.  The file describes itself; C{table} is not needed.
    """
    from .rows import rebuild_event

    parquet = pq.read_table(pa.BufferReader(data) if isinstance(data, bytes) else data)
    columns = table_of(parquet.schema) if table is None else table
    return [rebuild_event(columns, row) for row in parquet.to_pylist()]


def table_of(schema: pa.Schema) -> Table:
    """
    The L{Table} a stored file's Arrow schema describes.
    """
    metadata = schema.metadata or {}
    stream = metadata.get(b"estat.stream", b"collect").decode("utf-8")
    columns = tuple(_column_of(f) for f in schema if f.name != EXTRA_COLUMN)
    return Table(stream=stream, columns=columns, schema_id="file")


def _column_of(field: pa.Field) -> Column:
    metadata = field.metadata or {}
    source = metadata.get(b"estat.source")
    source = tuple(source.decode("utf-8").split(".")) if source else None
    t = field.type
    if metadata.get(b"estat.kind") == b"json":
        return Column(field.name, "json", source=source)
    if pa.types.is_struct(t):
        return Column(field.name, "struct", fields=tuple(_column_of(t.field(i))
                                                         for i in range(t.num_fields)))
    if pa.types.is_list(t):
        return Column(field.name, "list", item=_kind_of(t.value_type))
    return Column(field.name, _kind_of(t), source=source)


def _kind_of(t: pa.DataType) -> str:
    for kind, candidate in _SCALAR_TYPES.items():
        if kind != "json" and t.equals(candidate):
            return kind
    raise ValueError(f"not an Estat column type: {t}")
