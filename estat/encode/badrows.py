# -*- test-case-name: estat.test.test_encode_badrows -*-
"""
C{OUTPUT_FORMAT=parquet} for bad rows: each batch of quarantined events
becomes one Parquet file of the fixed bad-row table
(L{estat.schema.badrows}), the event itself as JSON text in C{payload}
and its errors as a list of C{{pointer, keyword, message}}.  This module
imports pyarrow; nothing imports it unless Parquet is chosen.
"""

from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from zope.interface import implementer

from ..encoder import Batch, EncodedObject, _poison_line, content_md5, encode_object
from ..event import UnencodedEvent
from ..interfaces import IEncoder
from ..schema.badrows import BAD_ROW_COLUMNS, bad_row_table
from .parquet import DEFAULT_LEVELS, SUFFIX, arrow_field
from .rows import dumps_json, format_timestamp, parse_timestamp

__all__ = ["BadRowEncoder", "bad_row_schema", "read_bad_rows"]


def bad_row_schema(stream: str) -> pa.Schema:
    table = bad_row_table(stream)
    return pa.schema([arrow_field(c) for c in table.columns],
                     metadata={b"estat.stream": table.stream.encode("utf-8"),
                               b"estat.table": b"bad_rows"})


_SERVER = [f.name for f in BAD_ROW_COLUMNS[-1].fields]


def _row(obj) -> list:
    """
    The column values of one bad row (as L{estat.ingest.validation.bad_row}
    makes them).
    """
    errors = obj.get("errors")
    server = obj.get("_estat")
    estat = None
    if type(server) is dict:
        estat = {name: server.get(name) for name in _SERVER}
        received = estat.get("received_at")
        estat["received_at"] = parse_timestamp(received) if type(received) is str else None
    total = obj.get("errors_total")
    return [
        obj.get("bad_row"), obj.get("stream"), obj.get("schema"),
        [{"pointer": e.get("pointer"), "keyword": e.get("keyword"),
          "message": e.get("message")} for e in errors] if type(errors) is list else None,
        total if type(total) is int else None,
        dumps_json(obj.get("payload")) if "payload" in obj else None,
        obj.get("type"),
        estat,
    ]


@implementer(IEncoder)
class BadRowEncoder:
    """
    @ivar stream: C{bad_collect} or C{bad_segment}.
    """

    suffix = SUFFIX

    def __init__(self, stream: str, compression: tuple = ("zstd", None),
                 gzip_level: int = 6) -> None:
        self.stream = f"bad_{stream}"
        self.schema = bad_row_schema(stream)
        codec, level = compression
        self.codec = codec
        self.level = level if level is not None else DEFAULT_LEVELS.get(codec)
        self.gzip_level = gzip_level

    def encode(self, batch: Batch) -> list:
        columns = [[] for _ in self.schema]
        poison = []
        for _, payload in batch.events:
            try:
                obj = orjson.loads(payload) if type(payload) is bytes else payload.obj
                values = _row(obj)
            except Exception as e:  # one bad row never fails its batch
                if type(payload) is bytes:
                    payload = UnencodedEvent(obj=None, raw=payload)
                poison.append(_poison_line(payload, e))
                continue
            for column, value in zip(columns, values):
                column.append(value)
        objects = []
        count = len(batch.events) - len(poison)
        if count:
            arrays = [pa.array(values, type=field.type)
                      for values, field in zip(columns, self.schema)]
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_arrays(arrays, schema=self.schema), sink,
                           compression=self.codec if self.codec != "none" else None,
                           compression_level=self.level, row_group_size=max(1, count))
            body = sink.getvalue().to_pybytes()
            objects.append(EncodedObject(key=batch.key, body=body, count=count,
                                         content_md5=content_md5(body)))
        if poison:
            objects.append(encode_object(batch.poison_key, poison, self.gzip_level,
                                         poison=True))
        return objects


def read_bad_rows(data) -> list:
    """
    The bad rows of a stored Parquet file, as their JSON Lines would have
    been (key order aside; C{type} only when set).
    """
    import json

    table = pq.read_table(pa.BufferReader(data) if isinstance(data, bytes) else data)
    rows = []
    for row in table.to_pylist():
        server = row.get("_estat")
        if server is not None and server.get("received_at") is not None:
            server = dict(server, received_at=_timestamp_text(server["received_at"]))
        out = {"bad_row": row.get("bad_row"), "stream": row.get("stream"),
               "schema": row.get("schema"), "errors": row.get("errors") or [],
               "errors_total": row.get("errors_total"),
               "payload": json.loads(row["payload"]) if row.get("payload") is not None
               else None}
        if row.get("type") is not None:
            out["type"] = row["type"]
        out["_estat"] = server
        rows.append(out)
    return rows


def _timestamp_text(value) -> str:
    from .rows import _micros

    return format_timestamp(_micros(value))
