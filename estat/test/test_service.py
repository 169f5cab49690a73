# -*- test-case-name: estat.test.test_service -*-
"""
Tests for L{estat.service}: the pipeline built from fakes (a L{Clock}, the
memory store, a disk dead-letter queue in a temporary directory with a
synchronous thread runner, and a stand-in for the HTTP listener).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.batcher import Batcher
from estat.dlq import SUFFIX, DiskDeadLetterQueue, read_dlq_file
from estat.encoder import encode_object
from estat.service import Readiness
from estat.interfaces import StoreError
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.service import EstatService, hurry_delay
from estat.test.harness import temp_dir
from estat.testing import DeferredThreadRunner, MemoryObjectStore, read_lines, run_synchronously
from estat.uploader import Uploader

START = 1700000000.0


def line(n: int) -> bytes:
    return b'{"n":%d}' % (n,)


class StubListener(Service):
    """
    Stands in for the HTTP listener: records what the rest of the
    pipeline looked like when it was asked to stop, and stops when the
    test says so (or at once, with C{immediate}).
    """

    def __init__(self, snapshot, immediate: bool = True) -> None:
        self.snapshot = snapshot
        self.immediate = immediate
        self.stops: list = []
        self.stopping: Deferred | None = None

    def stopService(self) -> Deferred:
        super().stopService()
        self.stops.append(self.snapshot())
        if self.immediate:
            return succeed(None)
        self.stopping = Deferred()
        return self.stopping


class ServiceTestsMixin:
    def build(self, failures=(), shutdown_timeout=25.0, http_immediate=True,
              encode_runner=run_synchronously, dlq_runner=run_synchronously,
              batch_size=100, max_pending=2, retries=2, deliver_like_tap=False):
        self.clock = Clock()
        self.clock.advance(START)
        self.metrics = Metrics(CollectorRegistry())
        self.queue = EventQueue(100)
        self.store = MemoryObjectStore(failures=list(failures))
        base = temp_dir(self)
        self.dlq_dir = os.path.join(base, "dlq")
        self.dead_letters = DiskDeadLetterQueue(
            directory=self.dlq_dir,
            metrics=self.metrics,
            clock=self.clock,
            run_in_thread=dlq_runner,
            entropy=lambda n: b"\x01" * n,
        )
        self.uploader = Uploader(
            store=self.store,
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            clock=self.clock,
            run_in_thread=encode_runner,
            retries=retries,
            rand=lambda: 0.5,
        )
        if deliver_like_tap:
            # Exactly as estat.tap.build_service wires it.
            self.dead_letters.deliver = lambda obj: self.uploader.put_with_retries(obj, 0)
        else:
            self.dead_letters.deliver = lambda obj: Deferred.fromCoroutine(
                self.uploader.put_with_retries(obj, 0))
        self.batcher = Batcher(
            queue=self.queue,
            sink=self.uploader.upload,
            key_maker=KeyMaker("raw", "dlq", "test-1", entropy=self.entropy),
            metrics=self.metrics,
            clock=self.clock,
            batch_size=batch_size,
            flush_interval=120.0,
            max_pending=max_pending,
        )
        self.readiness = Readiness(ready=False)
        self.http = StubListener(self.snapshot, immediate=http_immediate)
        self.service = EstatService(
            http=self.http,
            batcher=self.batcher,
            uploader=self.uploader,
            dead_letters=self.dead_letters,
            queue=self.queue,
            store=self.store,
            readiness=self.readiness,
            metrics=self.metrics,
            clock=self.clock,
            shutdown_timeout=shutdown_timeout,
        )
        return self.service

    def entropy(self, n: int) -> bytes:
        """
        Deterministic, but a different key for every batch.
        """
        self.keys_made = getattr(self, "keys_made", 0) + 1
        return self.keys_made.to_bytes(n, "big")

    def snapshot(self) -> dict:
        return {
            "ready": self.readiness.ready,
            "batcher_running": bool(self.batcher.running),
            "queue_closed": self.queue.closed,
            "dlq_running": bool(self.dead_letters.running),
            "stored": len(self.store.objects),
        }

    def offer(self, *ns: int) -> None:
        for n in ns:
            self.assertTrue(self.queue.offer([(self.clock.seconds(), line(n))]))

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def dlq_files(self) -> list:
        return sorted(name for name in os.listdir(self.dlq_dir) if name.endswith(SUFFIX))


class HurryDelayTests(SynchronousTestCase):
    def test_hurry_delay(self):
        """
        The uploader is hurried 3 s before the deadline, or at 70 % of it
        for short deadlines.
        """
        self.assertEqual(hurry_delay(25.0), 22.0)
        self.assertEqual(hurry_delay(100.0), 97.0)
        self.assertEqual(hurry_delay(5.0), 3.5)
        self.assertEqual(hurry_delay(10.0), 7.0)


class StartTests(ServiceTestsMixin, SynchronousTestCase):
    def test_start(self):
        """
        Starting starts every piece and makes the process ready.
        """
        self.build()
        self.service.startService()
        self.assertTrue(self.readiness.ready)
        self.assertTrue(self.http.running)
        self.assertTrue(self.batcher.running)
        self.assertTrue(self.dead_letters.running)
        self.assertTrue(os.path.isdir(self.dlq_dir))

    def test_start_with_failing_store_check(self):
        """
        A failing store check is logged, not fatal.
        """
        self.build()
        self.store.check_error = StoreError("AccessDenied", "no")
        self.service.startService()
        self.assertTrue(self.readiness.ready)
        self.assertTrue(self.http.running)


class StopOrderTests(ServiceTestsMixin, SynchronousTestCase):
    def test_stop_order(self):
        """
        Readiness turns false before the listener is stopped; the batcher
        drains only once the listener has stopped; the dead-letter queue
        stops only once every batch has a fate; events queued before the
        stop are stored.
        """
        runner = DeferredThreadRunner()
        self.build(http_immediate=False, encode_runner=runner, batch_size=2, max_pending=2)
        self.service.startService()
        # Two full batches in flight (encoding not yet run), one event still
        # queued because max_pending batches are in flight.
        self.offer(0, 1, 2, 3, 4)
        self.assertEqual(len(runner.calls), 2)
        self.assertEqual(len(self.queue), 1)

        d = self.service.stopService()
        self.assertEqual(self.http.stops, [{
            "ready": False,
            "batcher_running": True,
            "queue_closed": False,
            "dlq_running": True,
            "stored": 0,
        }])
        self.assertFalse(self.readiness.ready)
        self.assertNoResult(d)
        # The batcher waits for the listener: it still takes part in the flow.
        self.assertTrue(self.batcher.running)
        self.assertFalse(self.queue.closed)
        self.assertEqual(len(self.queue), 1)

        self.http.stopping.callback(None)
        self.assertFalse(self.batcher.running)
        self.assertTrue(self.queue.closed)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(len(runner.calls), 3)
        # Batches are still on their way: the dead-letter queue stays up.
        self.assertTrue(self.dead_letters.running)
        self.assertNoResult(d)

        runner.run_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.dead_letters.running)
        self.assertEqual(sorted(self.store.events()),
                         sorted(line(n) for n in range(5)))
        self.assertEqual(self.sample("s3_events_stored_total"), 5)
        self.assertEqual(self.sample("shutdown_events_unsaved_total"), 0)
        self.assertEqual(self.dlq_files(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_open_batch_stored_on_stop(self):
        """
        Events in the open batch, far from its size or age, are stored on
        stop.
        """
        self.build()
        self.service.startService()
        self.offer(1, 2, 3)
        self.assertEqual(self.store.objects, {})
        self.successResultOf(self.service.stopService())
        [key] = self.store.objects
        self.assertEqual(read_lines(self.store.objects[key]), [line(1), line(2), line(3)])
        self.assertEqual(self.sample("batches_sealed_total", trigger="shutdown"), 1)

    def test_dead_letter_retries_stop_when_shutdown_begins(self):
        """
        The dead-letter retry loop stops at once, before the listener has
        stopped: its files stay on disk.
        """
        self.build(http_immediate=False)
        self.service.startService()
        obj = encode_object("raw/old.jsonl.gz", [line(9)], 6)
        self.assertTrue(self.successResultOf(self.dead_letters.put(obj)))
        self.assertEqual(len(self.dlq_files()), 1)

        d = self.service.stopService()
        self.clock.advance(self.dead_letters.interval * 3)
        self.assertNotIn("raw/old.jsonl.gz", self.store.objects)
        self.assertEqual(len(self.dlq_files()), 1)
        self.http.stopping.callback(None)
        self.successResultOf(d)
        self.assertEqual(len(self.dlq_files()), 1)

    def test_dead_letters_retried_while_running(self):
        """
        (Control for the test above.)  While running, the same file is
        retried and stored after the retry interval.
        """
        self.build()
        self.service.startService()
        obj = encode_object("raw/old.jsonl.gz", [line(9)], 6)
        self.successResultOf(self.dead_letters.put(obj))
        self.clock.advance(self.dead_letters.interval)
        self.assertIn("raw/old.jsonl.gz", self.store.objects)
        self.assertEqual(self.dlq_files(), [])

    def test_stop_during_dead_letter_retry(self):
        """
        A stop that begins while a dead-letter file is being retried (the
        store not answering) cancels that attempt and completes, with the
        dead-letter retry wired as L{estat.tap.build_service} wires it.
        """
        self.build(failures=["hang"], deliver_like_tap=True)
        self.service.startService()
        obj = encode_object("raw/old.jsonl.gz", [line(9)], 6)
        self.successResultOf(self.dead_letters.put(obj))
        self.offer(1, 2)
        self.clock.advance(self.dead_letters.interval)
        self.assertEqual([key for key, _ in self.store.puts], ["raw/old.jsonl.gz"])

        d = self.service.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.dlq_files()), 1)
        [key] = self.store.objects
        self.assertEqual(read_lines(self.store.objects[key]), [line(1), line(2)])


class ShutdownDeadlineTests(ServiceTestsMixin, SynchronousTestCase):
    def test_hanging_store_goes_to_dead_letters_when_hurried(self):
        """
        With a store that never answers, the batch is written to the
        dead-letter queue C{hurry_delay(shutdown_timeout)} after the stop
        began, and the stop completes before the deadline.
        """
        self.build(failures=["hang"], shutdown_timeout=25.0)
        self.service.startService()
        self.offer(1, 2)
        d = self.service.stopService()
        self.assertEqual(len(self.store.puts), 1)
        self.clock.advance(hurry_delay(25.0) - 0.1)
        self.assertNoResult(d)
        self.assertEqual(self.dlq_files(), [])
        self.assertTrue(self.dead_letters.running)

        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        [name] = self.dlq_files()
        kept = read_dlq_file(os.path.join(self.dlq_dir, name))
        [key] = {key for key, _ in self.store.puts}
        self.assertEqual(kept.key, key)
        self.assertEqual(kept.count, 2)
        self.assertEqual(read_lines(kept.body), [line(1), line(2)])
        self.assertEqual(len(self.store.puts), 1)
        self.assertEqual(self.store.objects, {})
        self.assertEqual(self.sample("dlq_events_enqueued_total"), 2)
        self.assertEqual(self.sample("shutdown_events_unsaved_total"), 0)
        self.assertFalse(self.dead_letters.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failing_store_retries_stop_when_hurried(self):
        """
        A store that keeps refusing is retried until the hurry, then the
        batch goes to the dead-letter queue.
        """
        self.build(failures=[StoreError("SlowDown")] * 1000, retries=1000)
        self.uploader.backoff_cap = 2.0
        self.service.startService()
        self.offer(1)
        d = self.service.stopService()
        self.clock.pump([0.5] * int(hurry_delay(25.0) / 0.5 - 1))
        self.assertNoResult(d)
        attempts = len(self.store.puts)
        self.assertGreater(attempts, 5)
        self.clock.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(len(self.dlq_files()), 1)
        self.assertLessEqual(len(self.store.puts), attempts + 1)

    def test_deadline_counts_unsaved_events(self):
        """
        When even the dead-letter write never finishes, the stop gives up
        at C{shutdown_timeout} and counts the events still only in memory.
        """
        dlq_runner = DeferredThreadRunner()
        self.build(failures=["hang"], shutdown_timeout=25.0, dlq_runner=dlq_runner)
        self.service.startService()
        dlq_runner.run_one()  # the dead-letter queue's start-up scan
        self.offer(1, 2, 3)
        d = self.service.stopService()
        self.clock.advance(hurry_delay(25.0))
        # The dead-letter write was handed to the thread runner, which never
        # runs it.
        self.assertEqual(len(dlq_runner.calls), 1)
        self.assertNoResult(d)
        self.assertEqual(self.sample("shutdown_events_unsaved_total"), 0)

        self.clock.advance(25.0 - hurry_delay(25.0) - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.sample("shutdown_events_unsaved_total"), 3)

    def test_deadline_counts_events_not_yet_sealed(self):
        """
        When the listener never stops, the events still queued or in the
        open batch are the ones counted at the deadline.
        """
        self.build(http_immediate=False, shutdown_timeout=10.0, batch_size=2, max_pending=1,
                   failures=["hang"] * 10)
        self.service.startService()
        # One batch of two in flight (hanging), then three queued events.
        self.offer(1, 2, 3, 4, 5)
        self.assertEqual(len(self.queue), 3)
        d = self.service.stopService()
        self.clock.advance(hurry_delay(10.0))
        # The hurry sent the first batch to the dead-letter queue; the
        # batcher, never drained, sealed the next two events, which went
        # straight to the dead-letter queue too (no attempt after the
        # hurry), and took the last event into a new open batch.
        self.assertEqual(len(self.dlq_files()), 2)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.batcher.pending_events, 0)
        self.assertEqual(self.batcher.open_count, 1)
        self.assertNoResult(d)
        self.clock.advance(10.0 - hurry_delay(10.0))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.sample("shutdown_events_unsaved_total"), 1)


class StoreCheckTests(SynchronousTestCase):
    """
    The start-up store check is work of the service: a shutdown that begins
    before it answers cancels it, quietly.
    """

    def test_stop_cancels_a_pending_check(self):
        from twisted.internet.defer import Deferred
        from twisted.logger import LogLevel, capturedLogs

        from estat.testing import MemoryObjectStore

        cancelled = []

        class SlowCheckStore(MemoryObjectStore):
            def check(self):
                return Deferred(lambda d: cancelled.append(True))

        harness = ShutdownDeadlineTests()
        harness.build(shutdown_timeout=10.0)
        harness.service.store = SlowCheckStore()
        with capturedLogs() as events:
            harness.service.startService()
            d = harness.service.stopService()
        self.assertEqual(cancelled, [True])
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse([e for e in events if e.get("log_level") == LogLevel.error])


class SecondStreamTests(ServiceTestsMixin, SynchronousTestCase):
    """
    A further stream (the Segment messages: its own queue and batcher,
    the same uploader) is started with the first and drained by the stop.
    """

    def test_drained_on_stop(self):
        self.build()
        queue = EventQueue(100)
        batcher = Batcher(queue=queue, sink=self.uploader.upload,
                          key_maker=KeyMaker("segment", "dlq/segment", "test-1",
                                             entropy=self.entropy),
                          metrics=self.metrics, clock=self.clock, batch_size=100,
                          flush_interval=120.0, max_pending=2)
        self.service.streams.append((queue, batcher))
        # build() made the service already: add the stream as its
        # constructor does with the streams it is given.
        batcher.setServiceParent(self.service)
        self.service.startService()
        self.assertTrue(batcher.running)
        self.offer(1)
        self.assertTrue(queue.offer([(self.clock.seconds(), b'{"type":"track"}')]))
        d = self.service.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(batcher.running)
        keys = sorted(self.store.objects)
        self.assertEqual([k.split("/")[0] for k in keys], ["raw", "segment"])
        self.assertEqual(read_lines(self.store.objects[keys[1]]), [b'{"type":"track"}'])

    def test_streams_given_at_construction_are_children(self):
        self.build()
        queue = EventQueue(10)
        batcher = Batcher(queue=queue, sink=self.uploader.upload,
                          key_maker=KeyMaker("segment", "dlq", "t"), metrics=self.metrics,
                          clock=self.clock, batch_size=10, flush_interval=120.0, max_pending=2)
        service = EstatService(
            http=StubListener(self.snapshot), batcher=self.batcher, uploader=self.uploader,
            dead_letters=self.dead_letters, queue=self.queue, store=self.store,
            readiness=self.readiness, metrics=self.metrics, clock=self.clock,
            streams=[(queue, batcher)])
        self.assertIs(batcher.parent, service)


class ReloaderStopTests(ServiceTestsMixin, SynchronousTestCase):
    def test_sighup_handler_removed_on_stop(self):
        """
        The plan reloader's SIGHUP handler is installed at start and put
        back when the service stops, before the listener closes.
        """
        from estat.schema.reloader import PlanReloader

        installed = []

        def on_signal(handler):
            installed.append(handler)
            return lambda: installed.remove(handler)

        self.build()
        order = []
        http_stop = self.http.stopService

        def stop_http():
            order.append(("http", list(installed)))
            return http_stop()

        self.http.stopService = stop_http
        reloader = PlanReloader(path="plan.yaml", validation=None, metrics=self.metrics,
                                run_in_thread=run_synchronously, on_signal=on_signal)
        self.service.reloader = reloader
        reloader.setServiceParent(self.service)
        self.service.startService()
        self.assertEqual(installed, [reloader.reload])
        self.successResultOf(self.service.stopService())
        self.assertEqual(installed, [])
        self.assertEqual(order, [("http", [])])
        self.assertFalse(reloader.running)
