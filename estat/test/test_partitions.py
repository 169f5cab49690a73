# -*- test-case-name: estat.test.test_partitions -*-
"""
Tests for L{estat.pipeline.partitions} and L{estat.encode.partitioned}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from estat.encode.jsonl import JsonlEncoder
from estat.encode.parquet import ParquetEncoder
from estat.encode.partitioned import PartitionedEncoder
from estat.encoder import Batch
from estat.event import UnencodedEvent
from estat.keys import KeyMaker
from estat.pipeline.partitions import (
    DEFAULT, MAX_VALUE_BYTES, OTHER, Partitioner, encode_value,
)
from estat.schema.columns import collect_table

SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


class EncodeValueTests(SynchronousTestCase):
    def test_safe_set_raw(self):
        self.assertEqual(encode_value(SAFE), SAFE)

    def test_every_unsafe_byte(self):
        for b in range(128):
            c = chr(b)
            if c not in SAFE:
                self.assertEqual(encode_value("a" + c), f"a%{b:02X}", repr(c))
        self.assertEqual(encode_value("é/ =%"), "%C3%A9%2F%20%3D%25")
        self.assertEqual(encode_value("\U0001F600"), "%F0%9F%98%80")

    def test_cap_on_utf8_boundary(self):
        self.assertEqual(encode_value("a" * 500), "a" * MAX_VALUE_BYTES)
        text = encode_value("a" * (MAX_VALUE_BYTES - 1) + "é")
        self.assertEqual(text, "a" * (MAX_VALUE_BYTES - 1))
        for n in range(4):
            value = encode_value("x" * n + "€" * 100)
            raw = bytes.fromhex(value[n:].replace("%", ""))
            raw.decode("utf-8")  # whole characters only
            self.assertLessEqual(n + len(raw), MAX_VALUE_BYTES)

    def test_reserved_escaped(self):
        for value in (DEFAULT, OTHER, ".", ".."):
            encoded = encode_value(value)
            self.assertNotEqual(encoded, value)
            self.assertTrue(encoded.startswith("%"))

    def test_default(self):
        for value in (None, "", 1, True, {}, [], 1.5):
            self.assertEqual(encode_value(value), DEFAULT)


def line(obj, source="web"):
    return orjson.dumps(dict(obj, _estat={"source": source}))


class PartitionerTests(SynchronousTestCase):
    def test_source_and_field(self):
        p = Partitioner(keys=("source", "kind"))
        self.assertEqual(p.path_of(line({"kind": "a/b"}, source="ios app")),
                         "source=ios%20app/kind=a%2Fb/")
        self.assertEqual(p.path_of(line({"kind": 3})), f"source=web/kind={DEFAULT}/")
        self.assertEqual(p.path_of(line({})), f"source=web/kind={DEFAULT}/")
        self.assertEqual(p.path_of(UnencodedEvent(obj={"kind": "x", "_estat": {}}, raw=None)),
                         f"source={DEFAULT}/kind=x/")
        self.assertEqual(p.other, f"source={OTHER}/kind={OTHER}/")


def keys():
    return KeyMaker(raw_prefix="raw", dlq_prefix="dlq", instance_id="i",
                    entropy=lambda n: b"\0" * n, suffix=".parquet")


class PartitionedEncoderTests(SynchronousTestCase):
    def batch(self, kinds, partition=None):
        key = keys().batch_key(1.0, 2.0)
        return Batch(key=key, poison_key=keys().poison_key(key),
                     events=[(1.0, line({"kind": k})) for k in kinds],
                     first_event_at=1.0, sealed_at=2.0, partition=partition)

    def encoder(self, inner=None, limit=100):
        return PartitionedEncoder(inner or ParquetEncoder(collect_table()),
                                  Partitioner(keys=("kind",), max_partitions=limit), keys())

    def test_split_deterministic(self):
        kinds = ["a", "b", "a", None, "c/d", "b"]
        first = self.encoder().encode(self.batch(kinds))
        second = self.encoder().encode(self.batch(kinds))
        self.assertEqual([o.key for o in first], [o.key for o in second])
        self.assertEqual([o.body for o in first], [o.body for o in second])
        self.assertEqual([(o.key.split("/")[1], o.count) for o in first],
                         [("kind=a", 2), ("kind=b", 2), (f"kind={DEFAULT}", 1),
                          ("kind=c%2Fd", 1)])
        self.assertTrue(all(o.key.startswith("raw/kind=") for o in first))

    def test_overflow(self):
        objects = self.encoder(limit=2).encode(self.batch(["a", "b", "c", "d", "a"]))
        self.assertEqual([(o.key.split("/")[1], o.count) for o in objects],
                         [("kind=a", 2), ("kind=b", 1), (f"kind={OTHER}", 2)])

    def test_pass_through(self):
        batch = self.batch(["a", "b"], partition="kind=a/")
        [obj] = self.encoder(JsonlEncoder()).encode(batch)
        self.assertEqual(obj.key, batch.key)
        self.assertEqual(obj.count, 2)
