# -*- test-case-name: estat.test.test_encode_badrows -*-
"""
Tests for the bad rows' table, their Parquet encoder and their partitions.
"""

from __future__ import annotations

import orjson
import pyarrow as pa
from twisted.trial.unittest import SynchronousTestCase

from estat.config import Config
from estat.encode.badrows import BadRowEncoder, bad_row_schema, read_bad_rows
from estat.encoder import Batch
from estat.keys import KeyMaker
from estat.pipeline.partitions import DEFAULT, BadRowPartitioner
from estat.tap import bad_encoding

ROW = {"bad_row": "schema_violation", "stream": "segment", "schema": "order.json",
       "errors": [{"pointer": "/properties", "keyword": "required", "message": "m"}],
       "errors_total": 1, "payload": {"event": "Order Completed", "n": 2 ** 70, "a/b": "c"},
       "type": "track",
       "_estat": {"received_at": "2026-12-01T08:00:00.123Z", "ip": "127.0.0.1",
                  "user_agent": "t", "source": "web"}}


def batch(rows, key="bad/segment/dt=2026-12-01/hour=08/x.parquet") -> Batch:
    return Batch(key=key, poison_key="raw_dlq/" + key, first_event_at=0.0, sealed_at=0.0,
                 events=[(0.0, orjson.dumps(r) if "n" not in r.get("payload", {})
                          else __import__("json").dumps(r).encode()) for r in rows])


class TableTests(SynchronousTestCase):
    def test_schema(self) -> None:
        estat = pa.struct([pa.field("received_at", pa.timestamp("us", tz="UTC")),
                           pa.field("ip", pa.string()), pa.field("user_agent", pa.string()),
                           pa.field("source", pa.string())])
        error = pa.struct([pa.field("pointer", pa.string()), pa.field("keyword", pa.string()),
                           pa.field("message", pa.string())])
        expected = pa.schema([
            pa.field("bad_row", pa.string()), pa.field("stream", pa.string()),
            pa.field("schema", pa.string()),
            pa.field("errors", pa.list_(pa.field("element", error))),
            pa.field("errors_total", pa.int64()), pa.field("payload", pa.string()),
            pa.field("type", pa.string()), pa.field("_estat", estat)])
        self.assertTrue(bad_row_schema("collect").equals(expected))


class EncoderTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        collect = dict(ROW, stream="collect", payload={"x": [1, {"y": None}]})
        del collect["type"]
        objects = BadRowEncoder("segment").encode(batch([ROW, collect]))
        self.assertEqual(len(objects), 1)
        self.assertEqual(objects[0].count, 2)
        self.assertEqual(read_bad_rows(objects[0].body), [ROW, collect])

    def test_deterministic(self) -> None:
        one, two = (BadRowEncoder("segment").encode(batch([ROW])) for _ in range(2))
        self.assertEqual(one[0].body, two[0].body)


class PartitionTests(SynchronousTestCase):
    def test_values_from_the_event_as_sent(self) -> None:
        partitioner = BadRowPartitioner(("source", "type", "event", "missing"))
        self.assertEqual(partitioner.path_of(orjson.dumps(dict(ROW, payload={"event": "a b"}))),
                         f"source=web/type=track/event=a%20b/missing={DEFAULT}/")

    def test_wiring_parquet_and_partitions(self) -> None:
        config = Config.defaults(output_format="parquet", segment_partition_by=("event",))
        keys = KeyMaker("bad/segment", "raw_dlq/bad/segment", "i")
        encoder, partitioner = bad_encoding(config, "segment", keys)
        self.assertEqual(keys.suffix, ".parquet")
        self.assertIsNotNone(partitioner)
        objects = encoder.encode(batch([ROW], key=keys.batch_key(0, 0, "0" * 16)))
        self.assertEqual(objects[0].key,
                         "bad/segment/event=Order%20Completed/dt=1970-01-01/hour=00/"
                         "i-19700101T000000000Z-0000000000000000.parquet")
        config = Config.defaults()
        encoder, partitioner = bad_encoding(config, "collect", keys)
        self.assertEqual((encoder.suffix, partitioner), (".jsonl.gz", None))
