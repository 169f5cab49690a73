# -*- test-case-name: estat.test.test_encode_parquet -*-
"""
Tests for L{estat.encode.parquet}, and the C{estat-jsonl} command: one
schema whatever the traffic, a lossless round trip against what jsonl mode
stores, and the same bytes for the same batch.
"""

from __future__ import annotations

import io
import json
import os
import zlib

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings, HealthCheck, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from estat.encode.jsonl import JsonlEncoder
from estat.encode.parquet import ParquetEncoder, arrow_schema, read_events
from estat.encode.rows import parse_timestamp
from estat.encoder import Batch, content_md5
from estat.event import UnencodedEvent
from estat.jsonl_tool import main
from estat.schema.columns import ESTAT, Column, Table, collect_table, segment_table

TABLE = Table(stream="collect", columns=(
    Column("s", "string"), Column("i", "int64"), Column("d", "double"), Column("b", "bool"),
    Column("t", "timestamp"), Column("day", "date"), Column("j", "json"),
    Column("o", "struct", fields=(Column("x", "int64"), Column("in", "struct", fields=(
        Column("y", "string"),)))),
    Column("l", "list", item="int64"),
    ESTAT,
))

ESTAT_TYPE = pa.struct([pa.field("received_at", pa.timestamp("us", tz="UTC")),
                        pa.field("ip", pa.string()), pa.field("user_agent", pa.string()),
                        pa.field("source", pa.string())])
JSON = {b"estat.kind": b"json"}


def server(n=0):
    return {"received_at": "2026-12-06T14:40:04.123Z", "ip": "10.0.0.%d" % (n % 250),
            "user_agent": "ua", "source": "web"}


def line(event):
    try:
        return orjson.dumps(event)
    except (orjson.JSONEncodeError, TypeError):
        return UnencodedEvent(obj=event, raw=None)


def batch(events, key="collect/dt=2026-12-06/hour=14/b.parquet"):
    return Batch(key=key, poison_key="dlq/" + key, events=[(1.0, line(e)) for e in events],
                 first_event_at=1.0, sealed_at=2.0)


def jsonl_events(events):
    [obj] = JsonlEncoder().encode(batch(events, key="k.jsonl.gz"))
    text = zlib.decompress(obj.body, 31).decode("utf-8")
    return [json.loads(x) for x in text.split("\n") if x]


class SchemaTests(SynchronousTestCase):
    def test_expected(self):
        expected = pa.schema([
            pa.field("s", pa.string()), pa.field("i", pa.int64()),
            pa.field("d", pa.float64()), pa.field("b", pa.bool_()),
            pa.field("t", pa.timestamp("us", tz="UTC")), pa.field("day", pa.date32()),
            pa.field("j", pa.string(), metadata=JSON),
            pa.field("o", pa.struct([pa.field("x", pa.int64()), pa.field(
                "in", pa.struct([pa.field("y", pa.string())]))])),
            pa.field("l", pa.list_(pa.field("element", pa.int64()))),
            pa.field("_estat", ESTAT_TYPE),
            pa.field("_extra", pa.string(), metadata=JSON),
        ], metadata={b"estat.stream": b"collect", b"estat.table": b"1"})
        self.assertTrue(arrow_schema(TABLE).equals(expected, check_metadata=True))

    def test_collect_without_schema(self):
        expected = pa.schema([pa.field("_estat", ESTAT_TYPE),
                              pa.field("_extra", pa.string(), metadata=JSON)])
        self.assertTrue(arrow_schema(collect_table()).equals(expected))

    def test_segment(self):
        schema = arrow_schema(segment_table())
        self.assertEqual(schema.field("timestamp").type, pa.timestamp("us", tz="UTC"))
        self.assertEqual(schema.field("context_ip").metadata, {b"estat.source": b"context.ip"})
        self.assertEqual(schema.field("properties").metadata, JSON)


class EncodeTests(SynchronousTestCase):
    def encode(self, events, table=TABLE):
        objects = ParquetEncoder(table).encode(batch(events))
        self.assertEqual(len(objects), 1)
        return objects[0]

    def test_round_trip_and_counts(self):
        events = [dict(s="a", i=1, t="2026-12-06T15:40:04+01:00", _estat=server()),
                  dict(i="1", o={"x": True, "in": {"y": None}}, l=[1, "x"], _estat=server()),
                  dict(big=2 ** 70, d=2 ** 53 + 1, _estat=server())]
        obj = self.encode(events)
        self.assertEqual(obj.count, 3)
        self.assertEqual(dict(obj.misfits), {"i": 1, "o.x": 1, "l": 1, "d": 1})
        self.assertEqual(read_events(obj.body), jsonl_events(events))
        table = pq.read_table(pa.BufferReader(obj.body))
        self.assertEqual(table.column("t").to_pylist()[0].isoformat(),
                         "2026-12-06T14:40:04+00:00")
        self.assertEqual(parse_timestamp("2026-12-06T14:40:04Z"), 1796568004000000)

    def test_same_bytes(self):
        events = [dict(s="a", zz={"q": [1]}, _estat=server(i)) for i in range(50)]
        first, second = self.encode(events), self.encode(events)
        self.assertEqual(first.body, second.body)
        self.assertEqual(first.content_md5, content_md5(first.body))

    def test_time_columns_are_delta_encoded(self):
        """
        Timestamp and date columns (C{t}, C{day}, C{_estat.received_at})
        are written C{DELTA_BINARY_PACKED} with no dictionary; the other
        columns keep theirs; DuckDB reads every value back.
        """
        events = [dict(s="a%d" % (i % 3), t="2026-12-06T14:40:%02d.5Z" % (i % 60),
                       day="2026-12-%02d" % (1 + i % 28), l=[i],
                       _estat=dict(server(i), received_at="2026-12-06T14:40:%02d.%03dZ"
                                   % (i // 1000, i % 1000)))
                  for i in range(2000)]
        obj = self.encode(events)
        meta = pq.ParquetFile(pa.BufferReader(obj.body)).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema: meta.column(i).encodings
                     for i in range(meta.num_columns)}
        for path in ("t", "day", "_estat.received_at"):
            self.assertIn("DELTA_BINARY_PACKED", encodings[path], path)
            self.assertNotIn("RLE_DICTIONARY", encodings[path], path)
        self.assertIn("RLE_DICTIONARY", encodings["s"])
        self.assertEqual(read_events(obj.body), jsonl_events(events))
        import duckdb
        con = duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        path = self.mktemp() + ".parquet"
        with open(path, "wb") as f:
            f.write(obj.body)
        rows = con.execute(
            "SELECT count(DISTINCT _estat.received_at), min(day), max(day), "
            "max(t) FROM read_parquet(?)", [path]).fetchone()
        self.assertEqual(rows[0], 2000)
        self.assertEqual((str(rows[1]), str(rows[2])), ("2026-12-01", "2026-12-28"))
        self.assertEqual(rows[3].isoformat(), "2026-12-06T14:40:59.500000+00:00")


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                    st.sampled_from(["2026-12-06T14:40:04Z", "2026-12-06T14:40:04.1+02:00",
                                     "2026-12-06T23:59:60Z", "2026-12-06", "2026-02-30"]))
keys = st.one_of(st.sampled_from(["s", "i", "d", "b", "t", "day", "j", "o", "l", "x", "in",
                                  "y", "S", "I", "O", "X", "Y"]), st.text(max_size=4))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=20)
events = st.dictionaries(keys, values, max_size=8)


def independent_misfits(event):
    """
    Count misfits by walking the declared columns, independently of rows.py.
    """
    count = 0

    def fits(kind, v):
        if kind == "string":
            return type(v) is str
        if kind == "int64":
            return type(v) is int and -2 ** 63 <= v < 2 ** 63
        if kind == "double":
            return type(v) is float or (type(v) is int and abs(v) < 2 ** 1024 and float(v) == v)
        if kind == "bool":
            return type(v) is bool
        if kind == "timestamp":
            return type(v) is str and parse_timestamp(v) is not None
        if kind == "date":
            import datetime
            try:
                return type(v) is str and len(v) == 10 and bool(datetime.date.fromisoformat(v))
            except ValueError:
                return False
        return True

    def walk(columns, obj):
        nonlocal count
        for c in columns:
            if c.name not in obj or obj[c.name] is None:
                continue
            v = obj[c.name]
            if c.kind == "struct":
                if type(v) is dict:
                    walk(c.fields, v)
                else:
                    count += 1
            elif c.kind == "list":
                if type(v) is not list or not all(x is None or fits(c.item, x) for x in v):
                    count += 1
            elif not fits(c.kind, v):
                count += 1
    walk(TABLE.columns[:-1], event)
    return count


class HostileTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(events, min_size=1, max_size=12))
    def test_hostile(self, drawn):
        sent = [dict(e, _estat=server(n)) for n, e in enumerate(drawn)]
        obj = ParquetEncoder(TABLE).encode(batch(sent))[0]
        schema = pq.read_schema(pa.BufferReader(obj.body))
        self.assertTrue(schema.equals(arrow_schema(TABLE), check_metadata=True))
        self.assertEqual(read_events(obj.body), jsonl_events(sent))
        self.assertEqual(sum(dict(obj.misfits).values()),
                         sum(independent_misfits(e) for e in sent))
        again = ParquetEncoder(TABLE).encode(batch(sent))[0]
        self.assertEqual(again.body, obj.body)
        self.assertEqual(obj.content_md5, content_md5(obj.body))

    def hostile_batch(self):
        wide = {f"k{n}": n for n in range(10000)}
        deep = current = {}
        for _ in range(300):
            current["o"] = {}
            current = current["o"]
        return [dict(wide, _estat=server()), dict(o=deep, j=deep, _estat=server()),
                dict(S="x", s=1, O={"x": 1}, o={"X": 2, "x": "2"}, _estat=server()),
                dict(i=2 ** 80, _estat=server()), dict(_estat=server())]

    def test_wide_deep_and_case(self):
        sent = self.hostile_batch()
        obj = ParquetEncoder(TABLE).encode(batch(sent))[0]
        self.assertTrue(pq.read_schema(pa.BufferReader(obj.body)).equals(arrow_schema(TABLE)))
        self.assertEqual(read_events(obj.body), jsonl_events(sent))

    def test_estat_jsonl(self):
        sent = self.hostile_batch()
        root = self.mktemp()
        os.makedirs(os.path.join(root, "a"))
        half = len(sent) // 2
        for name, part in (("a/1.parquet", sent[:half]), ("a/2.parquet", sent[half:])):
            with open(os.path.join(root, name), "wb") as f:
                f.write(ParquetEncoder(TABLE).encode(batch(part))[0].body)
        out = io.BytesIO()
        self.assertEqual(main([root], stdout=out), 0)
        self.assertEqual([json.loads(x) for x in out.getvalue().split(b"\n") if x],
                         jsonl_events(sent))
        target = os.path.join(root, "out.gz")
        self.assertEqual(main([root, "-o", target, "--gzip"]), 0)
        with open(target, "rb") as f:
            self.assertEqual([json.loads(x) for x in zlib.decompress(f.read(), 31).split(b"\n") if x],
                             jsonl_events(sent))

    def test_estat_jsonl_errors(self):
        err = io.StringIO()
        self.assertEqual(main(["/nonexistent/x.parquet"], stdout=io.BytesIO(), stderr=err), 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        path = self.mktemp()
        for body in (b"not parquet", None):
            with open(path, "wb") as f:
                if body is None:
                    pq.write_table(pa.table({"a": [1]}), f)
                else:
                    f.write(body)
            err = io.StringIO()
            self.assertEqual(main([path], stdout=io.BytesIO(), stderr=err), 2)
            self.assertIn("not an Estat Parquet file", err.getvalue())


class StreamTests(SynchronousTestCase):
    def test_segment_round_trip(self):
        sent = [
            {"type": "track", "event": "Bought", "userId": 5, "timestamp": "2026-12-06T14:40:04Z",
             "sentAt": "bad", "context": {"ip": "1.2.3.4", "library": {"name": "js"},
                                          "userAgent": None, "page": {"url": 3}},
             "properties": {"revenue": 2 ** 70, "x": None}, "integrations": {},
             "_estat": server()},
            {"type": "identify", "traits": [], "_estat": server()},
        ]
        obj = ParquetEncoder(segment_table()).encode(batch(sent))[0]
        self.assertEqual(dict(obj.misfits), {"userId": 1, "sentAt": 1, "context_page_url": 1})
        self.assertEqual(read_events(obj.body), jsonl_events(sent))
        table = pq.read_table(pa.BufferReader(obj.body))
        self.assertEqual(table.column("context_ip").to_pylist(), ["1.2.3.4", None])
        self.assertEqual(table.column("_extra").to_pylist()[1], None)

    def test_collect_without_schema_whole_event(self):
        sent = [{"a": {"b": [1, None]}, "_estat": server()}, {"_estat": server(), "x": None}]
        obj = ParquetEncoder(collect_table()).encode(batch(sent))[0]
        table = pq.read_table(pa.BufferReader(obj.body))
        self.assertEqual([json.loads(x) for x in table.column("_extra").to_pylist()],
                         [{"a": {"b": [1, None]}}, {"x": None}])
        self.assertEqual(read_events(obj.body), jsonl_events(sent))


class SchemaErrorsColumnTests(SynchronousTestCase):
    """
    With a tracking plan, a flagged event's C{_estat.schema_errors} is the
    C{_estat_schema_errors} column, and reads back where it was.
    """

    def test_flagged_event(self) -> None:
        from estat.encode.parquet import ParquetEncoder, read_events
        from estat.encoder import Batch
        from estat.schema.columns import collect_table, with_schema_errors

        import pyarrow as pa
        import pyarrow.parquet as pq

        errors = [{"pointer": "/price", "keyword": "type", "message": "m"}]
        flagged = {"e": 1, "_estat": {"received_at": "2026-12-01T08:00:00.000Z", "ip": "1.2.3.4",
                                      "user_agent": "ua", "schema_errors": errors}}
        plain = {"e": 2, "_estat": {"received_at": "2026-12-01T08:00:00.000Z", "ip": "1.2.3.4",
                                    "user_agent": "ua"}}
        table = with_schema_errors(collect_table())
        batch = Batch(events=[(1.0, orjson.dumps(flagged)), (1.0, orjson.dumps(plain))],
                      key="raw/x.parquet", poison_key="raw_dlq/x.jsonl.gz", first_event_at=1.0,
                      sealed_at=1.0)
        obj, = ParquetEncoder(table).encode(batch)
        stored = pq.read_table(pa.BufferReader(obj.body))
        self.assertEqual(stored.column("_estat_schema_errors").to_pylist(),
                         [orjson.dumps(errors).decode(), None])
        self.assertNotIn("schema_errors", stored.schema.field("_estat").type.names if hasattr(
            stored.schema.field("_estat").type, "names") else [])
        self.assertEqual(stored.column("_extra").to_pylist(), ['{"e":1}', '{"e":2}'])
        events = read_events(obj.body)
        self.assertEqual(events[0]["_estat"]["schema_errors"], errors)
        self.assertNotIn("schema_errors", events[1]["_estat"])
