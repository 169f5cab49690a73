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


from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from estat.batcher import Batcher  # noqa: E402
from estat.metrics import Metrics  # noqa: E402
from estat.queue import EventQueue  # noqa: E402
from estat.test.test_batcher import START, RecordingSink  # noqa: E402


class PartitionedBatcherTests(SynchronousTestCase):
    def make(self, batch_size=4, flush_interval=10.0, limit=100):
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = EventQueue(1000)
        self.metrics = Metrics(CollectorRegistry())
        self.sink = RecordingSink(immediate=True)
        self.batcher = Batcher(queue=self.queue, sink=self.sink,
                               key_maker=KeyMaker("raw", "dlq", "t", entropy=lambda n: b"\1" * n),
                               metrics=self.metrics, clock=self.clock, batch_size=batch_size,
                               flush_interval=flush_interval, max_pending=100,
                               partitioner=Partitioner(keys=("kind",), max_partitions=limit))
        self.batcher.startService()
        self.addCleanup(self.batcher.stopService)

    def offer(self, *kinds):
        self.queue.offer([(self.clock.seconds(), line({"kind": k})) for k in kinds])

    def parts(self):
        return [(b.partition, b.count) for b in self.sink.batches]

    def test_apart_and_size_bound(self):
        self.make(batch_size=4)
        self.offer("a", "b", "a", "b")
        # The total reached BATCH_SIZE: the largest partition is sealed.
        self.assertEqual(len(self.sink.batches), 1)
        self.assertIn(self.sink.batches[0].partition, ("kind=a/", "kind=b/"))
        self.assertTrue(all(b.key.startswith(b.partition, 4) for b in self.sink.batches))
        self.assertLessEqual(self.batcher.open_count, 4)

    def test_interval_per_partition(self):
        self.make(batch_size=100, flush_interval=10.0)
        self.offer("a")
        self.clock.advance(5)
        self.offer("b")
        self.clock.advance(5)
        self.assertEqual(self.parts(), [("kind=a/", 1)])
        self.clock.advance(5)
        self.assertEqual(self.parts(), [("kind=a/", 1), ("kind=b/", 1)])

    def test_overflow_counted(self):
        self.make(batch_size=100, limit=2)
        self.offer("a", "b", "c", "d", "a")
        self.assertEqual(self.metrics.registry.get_sample_value(
            "estat_partition_overflow_events_total", {"stream": "collect"}), 2)
        self.successResultOf(self.batcher.drain())
        self.assertEqual(sorted(self.parts()), [("kind=__other__/", 2), ("kind=a/", 2),
                                                ("kind=b/", 1)])
