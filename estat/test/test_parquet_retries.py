# -*- test-case-name: estat.test.test_parquet_retries -*-
"""
Parquet mode gives the same bytes for the same batch: a retried PUT, a
dead-letter re-upload and a write-ahead-log replay write an identical
object under the same key, and Content-MD5 holds.
"""

from __future__ import annotations

import os

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.encode.parquet import ParquetEncoder, read_events
from estat.encoder import Batch, content_md5
from estat.interfaces import StoreError
from estat.event import UnencodedEvent
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.schema.columns import ESTAT, Column, Table
from estat.testing import MemoryDeadLetterQueue, MemoryObjectStore, run_synchronously
from estat.uploader import Uploader
from estat.test.test_wal import START, WalMixin
from estat.wal.recovery import recover

TABLE = Table(stream="collect", columns=(Column("id", "string"), Column("n", "int64"), ESTAT))


def parquet_events(n, at=START):
    return [(at + i / 1000, orjson.dumps({"id": f"e-{i}", "n": i if i % 3 else "x",
                                          "_estat": {"received_at": "2026-12-06T14:40:04.123Z",
                                                     "source": "web"}}))
            for i in range(n)]


class UploaderTests(SynchronousTestCase):
    def make(self, failures):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryObjectStore(failures=list(failures))
        self.dead_letters = MemoryDeadLetterQueue()
        self.metrics = Metrics(CollectorRegistry())
        self.encoder = ParquetEncoder(TABLE)
        self.uploader = Uploader(store=self.store, dead_letters=self.dead_letters,
                                 metrics=self.metrics, clock=self.clock,
                                 run_in_thread=run_synchronously, retries=2, rand=lambda: 0.5,
                                 backoff_base=1.0, backoff_cap=30.0, encoder=self.encoder)

    def batch(self):
        keys = KeyMaker("raw", "dlq", "h", entropy=lambda n: b"\1" * n, suffix=".parquet")
        key = keys.batch_key(START, START + 1)
        return Batch(key, keys.poison_key(key), parquet_events(6), START, START + 1)

    def test_retried_put_same_bytes(self):
        self.make([StoreError("SlowDown")])
        batch = self.batch()
        d = self.uploader.sink_for(self.encoder)(batch)
        self.clock.advance(5)
        self.successResultOf(d)
        [(k1, b1), (k2, b2)] = self.store.puts
        self.assertEqual((k1, b1), (k2, b2))
        [obj] = self.encoder.encode(batch)
        self.assertEqual(b1, obj.body)
        self.assertEqual(obj.content_md5, content_md5(b1))
        self.assertEqual(self.store.objects, {batch.key: b1})
        self.assertEqual(self.metrics.registry.get_sample_value(
            "estat_column_mismatches_total", {"stream": "collect", "column": "n"}), 2)

    def test_dead_letter_same_bytes(self):
        self.make([StoreError("SlowDown")] * 3)
        batch = self.batch()
        d = self.uploader.upload(batch)
        self.clock.advance(5)
        self.clock.advance(5)
        self.successResultOf(d)
        [kept] = self.dead_letters.kept
        self.assertEqual((kept.key, kept.body), self.store.puts[0])
        self.assertEqual(kept.content_md5, content_md5(kept.body))
        # The re-upload from the dead-letter queue puts these bytes again.
        self.make([])
        self.successResultOf(self.store.put(kept.key, kept.body, kept.content_md5))
        self.assertEqual(self.store.objects[batch.key], self.encoder.encode(batch)[0].body)


class WalReplayTests(WalMixin, SynchronousTestCase):
    def test_replay_same_key_same_bytes(self):
        wal = self.make_wal()
        self.start(wal)
        evs = parquet_events(5) + [(START, UnencodedEvent({"id": "big", "n": 2 ** 80,
                                                          "_estat": {}}, b'{"n":1}'))]
        wal.log_events("raw", evs[:2], lambda e: None)
        wal.log_events("raw", evs[2:], lambda e: None)
        wal.committers[0].flush()
        first, last = wal.seal("raw", 4)
        keys = KeyMaker("raw", "raw_dlq", "host-1", suffix=".parquet")
        key = keys.batch_key(evs[0][0], START + 5, unique=wal.unique("raw", first, last))
        wal.log_seal("raw", first, last, 4, START + 5, key, keys.poison_key(key))
        wal.committers[0].flush()
        original = Batch(key, keys.poison_key(key), evs[:4], evs[0][0], START + 5)
        os.close(wal._lock_fd)
        wal._lock_fd = None
        wal.running = False
        r = recover(self.directory, lambda: "other")
        [sealed] = r.sealed["raw"]
        rebuilt = Batch(sealed.seal.key, sealed.seal.poison_key, sealed.events,
                        sealed.events[0][0], sealed.seal.sealed_at)
        encoder = ParquetEncoder(TABLE)
        replayed = [(o.key, o.body, o.content_md5) for o in encoder.encode(rebuilt)]
        self.assertEqual(replayed,
                         [(o.key, o.body, o.content_md5) for o in encoder.encode(original)])
        self.assertEqual(replayed[0][0], key)
        self.assertEqual(replayed[0][2], content_md5(replayed[0][1]))
        self.assertEqual([e["id"] for e in read_events(replayed[0][1])],
                         ["e-0", "e-1", "e-2", "e-3"])
