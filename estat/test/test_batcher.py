# -*- test-case-name: estat.test.test_batcher -*-
"""
Tests for L{estat.batcher}.
"""

from __future__ import annotations

import gc
import weakref

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.batcher import Batcher
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.queue import EventQueue

#: 2023-11-14T22:13:20Z
START = 1700000000.0


def event(received_at: float, n: int) -> tuple:
    return (received_at, b'{"n":%d}' % (n,))


class RecordingSink:
    """
    A batch sink that keeps every batch and answers with a Deferred the
    test fires (or, with C{immediate}, one that has already fired).
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.batches: list = []
        self.deferreds: list = []

    def __call__(self, batch) -> Deferred:
        self.batches.append(batch)
        if self.immediate:
            return succeed(None)
        d = Deferred()
        self.deferreds.append(d)
        return d


class BatcherTestsMixin:
    def make_batcher(self, sink=None, batch_size=3, flush_interval=10.0,
                     max_pending=2, queue_size=100, tick=1.0, start=True, call_soon=None):
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = EventQueue(queue_size, call_soon=call_soon)
        self.metrics = Metrics(CollectorRegistry())
        self.key_maker = KeyMaker("raw", "dlq", "test-1", entropy=lambda n: b"\xab" * n)
        self.sink = RecordingSink(immediate=True) if sink is None else sink
        self.batcher = Batcher(
            queue=self.queue,
            sink=self.sink,
            key_maker=self.key_maker,
            metrics=self.metrics,
            clock=self.clock,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=max_pending,
            tick=tick,
        )
        if start:
            self.batcher.startService()
        return self.batcher

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def sealed(self, trigger: str):
        return self.sample("batches_sealed_total", trigger=trigger)

    def offer_one(self, received_at: float, n: int) -> bool:
        return self.queue.offer([event(received_at, n)])


class SizeTests(BatcherTestsMixin, SynchronousTestCase):
    def test_seals_when_batch_size_reached(self):
        """
        A batch is sealed the moment it holds C{batch_size} events, with the
        events in the order they were queued.
        """
        self.make_batcher(batch_size=3)
        self.assertTrue(self.offer_one(START, 1))
        self.assertTrue(self.offer_one(START, 2))
        self.assertEqual(self.sink.batches, [])
        self.assertEqual(self.batcher.open_count, 2)

        self.assertTrue(self.offer_one(START, 3))
        self.assertEqual(len(self.sink.batches), 1)
        batch = self.sink.batches[0]
        self.assertEqual(batch.events, [event(START, 1), event(START, 2), event(START, 3)])
        self.assertEqual(batch.count, 3)
        self.assertEqual(self.batcher.open_count, 0)
        self.assertEqual(self.sealed("size"), 1)
        self.assertIsNone(self.sealed("interval"))

    def test_many_events_at_once_make_full_batches(self):
        """
        Events offered together are cut into batches of exactly
        C{batch_size}; the remainder stays in the open batch.
        """
        self.make_batcher(batch_size=3)
        self.assertTrue(self.queue.offer([event(START, n) for n in range(8)]))
        self.assertEqual([b.count for b in self.sink.batches], [3, 3])
        self.assertEqual(
            [e for b in self.sink.batches for e in b.events],
            [event(START, n) for n in range(6)])
        self.assertEqual(self.batcher.open_count, 2)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.sealed("size"), 2)


class IntervalTests(BatcherTestsMixin, SynchronousTestCase):
    def test_seals_after_flush_interval_not_before(self):
        """
        A batch that never fills is sealed once its first event is
        C{flush_interval} old, and not a tick earlier.
        """
        self.make_batcher(batch_size=100, flush_interval=10.0, tick=1.0)
        self.offer_one(self.clock.seconds(), 1)
        self.clock.advance(9)
        self.assertEqual(self.sink.batches, [])
        self.assertEqual(self.batcher.open_count, 1)
        self.clock.advance(1)
        self.assertEqual(len(self.sink.batches), 1)
        batch = self.sink.batches[0]
        self.assertEqual(batch.events, [event(START, 1)])
        self.assertEqual(batch.sealed_at, START + 10)
        self.assertEqual(self.sealed("interval"), 1)
        self.assertIsNone(self.sealed("size"))

    def test_interval_counts_from_first_event_not_last(self):
        """
        Later events do not postpone the seal: the age is the age of the
        batch's first event.
        """
        self.make_batcher(batch_size=100, flush_interval=10.0, tick=1.0)
        self.offer_one(self.clock.seconds(), 1)
        self.clock.advance(6)
        self.offer_one(self.clock.seconds(), 2)
        self.clock.advance(3)
        self.assertEqual(self.sink.batches, [])
        self.clock.advance(1)
        self.assertEqual(len(self.sink.batches), 1)
        self.assertEqual(self.sink.batches[0].events,
                         [event(START, 1), event(START + 6, 2)])

    def test_interval_counts_from_receive_time(self):
        """
        The age of a batch is measured from the receive time carried by its
        first event, not from when the batcher took it off the queue.
        """
        self.make_batcher(batch_size=100, flush_interval=10.0, tick=1.0, start=False)
        self.offer_one(START, 1)
        self.clock.advance(6)
        self.batcher.startService()
        self.assertEqual(self.batcher.open_count, 1)
        self.clock.advance(3)
        self.assertEqual(self.sink.batches, [])
        self.clock.advance(1)
        self.assertEqual(len(self.sink.batches), 1)
        self.assertEqual(self.sink.batches[0].sealed_at, START + 10)

    def test_new_batch_has_its_own_interval(self):
        """
        After an interval seal, the next batch is timed from its own first
        event.
        """
        self.make_batcher(batch_size=100, flush_interval=10.0, tick=1.0)
        self.offer_one(self.clock.seconds(), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.sink.batches), 1)
        self.clock.advance(3)
        self.offer_one(self.clock.seconds(), 2)
        self.clock.advance(9)
        self.assertEqual(len(self.sink.batches), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.sink.batches), 2)
        self.assertEqual(self.sink.batches[1].events, [event(START + 13, 2)])
        self.assertEqual(self.sealed("interval"), 2)

    def test_idle_batcher_seals_nothing(self):
        """
        With no events, time passing seals no (empty) batch.
        """
        self.make_batcher(batch_size=3, flush_interval=10.0, tick=1.0)
        for _ in range(100):
            self.clock.advance(1)
        self.assertEqual(self.sink.batches, [])
        self.assertIsNone(self.sealed("interval"))
        self.assertIsNone(self.sealed("size"))
        self.assertEqual(self.batcher.pending_batches, 0)


class KeyTests(BatcherTestsMixin, SynchronousTestCase):
    def test_key_from_first_event_time(self):
        """
        The batch's keys come from the L{KeyMaker}: partitioned by the UTC
        time of the first event, named with the seal time.
        """
        self.make_batcher(batch_size=2, start=False)
        self.queue.offer([event(START - 7200, 1), event(START - 10, 2)])
        self.batcher.startService()
        [batch] = self.sink.batches
        self.assertEqual(batch.first_event_at, START - 7200)
        self.assertEqual(batch.sealed_at, START)
        self.assertEqual(
            batch.key,
            "raw/dt=2023-11-14/hour=20/test-1-20231114T221320000Z-abababababababab.jsonl.gz")
        self.assertEqual(
            batch.poison_key,
            "dlq/dt=2023-11-14/hour=20/test-1-20231114T221320000Z-abababababababab.jsonl.gz")
        self.assertEqual(batch.key, self.key_maker.batch_key(START - 7200, START))


class OneTurnTests(BatcherTestsMixin, SynchronousTestCase):
    """
    With the reactor's coalesced wake (C{call_soon}), as C{/collect} runs.
    """

    def test_a_turn_may_offer_more_than_the_queue_holds(self):
        """
        Requests read in one reactor turn may carry more events than the
        queue holds: a batcher with a free slot takes them as the queue
        fills, and none is refused.
        """
        scheduled = []
        self.make_batcher(batch_size=5, max_pending=4, queue_size=4,
                          call_soon=scheduled.append)
        offered = [[event(START, 2 * n), event(START, 2 * n + 1)] for n in range(8)]
        for events in offered:
            self.assertTrue(self.queue.offer(events))
        for wake in scheduled:
            wake()
        self.batcher.drain()
        self.assertEqual([e for b in self.sink.batches for e in b.events],
                         [e for events in offered for e in events])

    def test_the_queue_is_full_when_the_batcher_has_no_slot(self):
        """
        With every slot taken the early wake does not help: the queue is
        truly full, and refuses.
        """
        sink = RecordingSink()
        self.make_batcher(sink=sink, batch_size=2, max_pending=1, queue_size=2,
                          call_soon=lambda f: None)
        self.assertTrue(self.queue.offer([event(START, 0), event(START, 1)]))
        self.assertTrue(self.queue.offer([event(START, 2), event(START, 3)]))
        self.assertEqual(len(sink.batches), 1)
        self.assertEqual(len(self.queue), 2)
        self.assertFalse(self.queue.offer([event(START, 4)]))
        sink.deferreds[0].callback(None)
        self.assertEqual(len(sink.batches), 2)
        self.assertTrue(self.queue.offer([event(START, 4), event(START, 5)]))


class ReleaseTests(BatcherTestsMixin, SynchronousTestCase):
    def test_pending_batch_is_not_kept(self):
        """
        The batcher keeps only the count of a batch on its way to the store,
        not the batch: once the sink lets go of it (an uploader does once it
        is encoded), its raw events can be freed. C{pending_events} still
        counts them until the sink fires.
        """
        kept = []

        def sink(batch):
            kept.append(weakref.ref(batch))
            d = Deferred()
            kept.append(d)
            return d

        self.make_batcher(sink=sink, batch_size=2)
        self.offer_one(START, 0)
        self.offer_one(START, 1)
        ref, d = kept
        gc.collect()
        self.assertIsNone(ref())
        self.assertEqual(self.batcher.pending_batches, 1)
        self.assertEqual(self.batcher.pending_events, 2)
        d.callback(None)
        self.assertEqual(self.batcher.pending_batches, 0)
        self.assertEqual(self.batcher.pending_events, 0)


class MaxPendingTests(BatcherTestsMixin, SynchronousTestCase):
    def test_stops_taking_events_at_max_pending(self):
        """
        While C{max_pending} batches are unfinished, the batcher takes no
        event off the queue, so the queue fills and refuses; once a batch
        finishes, taking resumes.
        """
        sink = RecordingSink()
        self.make_batcher(sink=sink, batch_size=2, max_pending=2, queue_size=4)
        for n in range(4):
            self.assertTrue(self.offer_one(START, n))
        self.assertEqual(len(sink.batches), 2)
        self.assertEqual(self.batcher.pending_batches, 2)
        self.assertEqual(self.sample("batches_pending"), 2)
        self.assertEqual(len(self.queue), 0)

        for n in range(4, 8):
            self.assertTrue(self.offer_one(START, n))
        self.assertEqual(len(self.queue), 4)
        self.assertEqual(self.batcher.open_count, 0)
        self.assertFalse(self.offer_one(START, 8))
        # Time does not help either.
        self.clock.advance(100)
        self.assertEqual(len(sink.batches), 2)
        self.assertEqual(len(self.queue), 4)

        sink.deferreds[0].callback(None)
        self.assertEqual(len(sink.batches), 3)
        self.assertEqual(sink.batches[2].events, [event(START, 4), event(START, 5)])
        self.assertEqual(self.batcher.pending_batches, 2)
        self.assertEqual(len(self.queue), 2)
        self.assertTrue(self.offer_one(START, 9))
        self.assertTrue(self.offer_one(START, 10))
        self.assertFalse(self.offer_one(START, 11))

        sink.deferreds[1].callback(None)
        sink.deferreds[2].callback(None)
        self.assertEqual(len(sink.batches), 5)
        self.assertEqual(
            [e for b in sink.batches for e in b.events],
            [event(START, n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)])

    def test_interval_seal_waits_for_a_slot(self):
        """
        An open batch past its age is not sealed while C{max_pending}
        batches are unfinished; it is sealed once one finishes.
        """
        sink = RecordingSink()
        self.make_batcher(sink=sink, batch_size=100, max_pending=1,
                          flush_interval=10.0, tick=1.0)
        self.offer_one(self.clock.seconds(), 1)
        self.clock.advance(10)
        self.assertEqual(len(sink.batches), 1)
        self.offer_one(self.clock.seconds(), 2)
        self.clock.advance(30)
        self.assertEqual(len(sink.batches), 1)
        self.assertEqual(self.batcher.open_count, 1)
        sink.deferreds[0].callback(None)
        self.clock.advance(1)
        self.assertEqual(len(sink.batches), 2)
        self.assertEqual(sink.batches[1].events, [event(START + 10, 2)])


class DrainTests(BatcherTestsMixin, SynchronousTestCase):
    def test_drain_seals_open_batch(self):
        """
        L{Batcher.drain} seals the open batch at once, closes the queue and
        stops the age check.
        """
        self.make_batcher(batch_size=100, flush_interval=10.0)
        self.offer_one(START, 1)
        self.offer_one(START, 2)
        d = self.batcher.drain()
        self.assertIsNone(self.successResultOf(d))
        [batch] = self.sink.batches
        self.assertEqual(batch.events, [event(START, 1), event(START, 2)])
        self.assertEqual(self.sealed("shutdown"), 1)
        self.assertTrue(self.queue.closed)
        self.assertFalse(self.offer_one(START, 3))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The consume loop ended quietly.
        self.assertIsNone(self.sample("loop_errors_total", loop="batcher"))

    def test_drain_seals_queued_events_and_waits_for_every_batch(self):
        """
        Events still queued (because C{max_pending} batches were in flight)
        are sealed in batches of at most C{batch_size}; the drain fires only
        once every sink Deferred has fired.
        """
        sink = RecordingSink()
        self.make_batcher(sink=sink, batch_size=3, max_pending=1, queue_size=10)
        self.queue.offer([event(START, n) for n in range(3)])
        self.assertEqual(len(sink.batches), 1)
        self.queue.offer([event(START, n) for n in range(3, 8)])
        self.assertEqual(len(self.queue), 5)

        d = self.batcher.stopService()
        self.assertFalse(self.batcher.running)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual([b.count for b in sink.batches], [3, 3, 2])
        self.assertEqual(
            [e for b in sink.batches for e in b.events],
            [event(START, n) for n in range(8)])
        self.assertEqual(self.sealed("shutdown"), 2)
        self.assertEqual(self.sealed("size"), 1)
        self.assertFalse(self.offer_one(START, 9))

        self.assertNoResult(d)
        sink.deferreds[2].callback(None)
        self.assertNoResult(d)
        sink.deferreds[0].callback(None)
        self.assertNoResult(d)
        sink.deferreds[1].callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.batcher.pending_batches, 0)
        self.assertEqual(self.sample("batches_pending"), 0)

    def test_drain_with_nothing(self):
        """
        Draining an idle batcher fires at once and seals nothing.
        """
        self.make_batcher()
        self.successResultOf(self.batcher.drain())
        self.assertEqual(self.sink.batches, [])
        self.assertIsNone(self.sealed("shutdown"))

    def test_idle_waits_for_in_flight_batches(self):
        """
        L{Batcher.idle} fires once no batch is on its way to the store.
        """
        sink = RecordingSink()
        self.make_batcher(sink=sink, batch_size=1)
        self.successResultOf(self.batcher.idle())
        self.offer_one(START, 1)
        d = self.batcher.idle()
        self.assertNoResult(d)
        sink.deferreds[0].callback(None)
        self.successResultOf(d)


class SinkFailureTests(BatcherTestsMixin, SynchronousTestCase):
    def test_failed_sink_is_counted_and_batcher_goes_on(self):
        """
        A sink that fails (it promises not to) loses the batch: the loss is
        counted and logged, and the next batches still go to the sink.
        """
        results = [fail(RuntimeError("boom")), succeed(None)]
        batches = []

        def sink(batch):
            batches.append(batch)
            return results.pop(0)

        self.make_batcher(sink=sink, batch_size=2)
        self.queue.offer([event(START, 1), event(START, 2)])
        self.assertEqual(len(batches), 1)
        self.assertEqual(self.sample("loop_errors_total", loop="uploader"), 1)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 2)
        self.assertEqual(self.sample("events_dropped_total", reason="unexpected_error"), 2)
        self.assertEqual(self.batcher.pending_batches, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        self.queue.offer([event(START, 3), event(START, 4)])
        self.assertEqual(len(batches), 2)
        self.assertEqual(batches[1].events, [event(START, 3), event(START, 4)])
        self.assertEqual(self.sample("loop_errors_total", loop="uploader"), 1)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 2)

    def test_sink_raising_synchronously(self):
        """
        A sink that raises instead of returning a Deferred is treated the
        same way and frees its slot.
        """
        calls = []

        def sink(batch):
            calls.append(batch)
            raise ValueError("bad sink")

        self.make_batcher(sink=sink, batch_size=1, max_pending=1)
        self.offer_one(START, 1)
        self.offer_one(START, 2)
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.sample("loop_errors_total", loop="uploader"), 2)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.successResultOf(self.batcher.drain())


class SealedMetricsTests(BatcherTestsMixin, SynchronousTestCase):
    def test_batches_sealed_by_trigger(self):
        """
        C{batches_sealed_total} counts each seal under its trigger.
        """
        self.make_batcher(batch_size=2, flush_interval=10.0)
        self.queue.offer([event(START, n) for n in range(4)])
        self.offer_one(self.clock.seconds(), 4)
        self.clock.advance(10)
        self.offer_one(self.clock.seconds(), 5)
        self.successResultOf(self.batcher.drain())
        self.assertEqual(self.sealed("size"), 2)
        self.assertEqual(self.sealed("interval"), 1)
        self.assertEqual(self.sealed("shutdown"), 1)
        self.assertEqual([b.count for b in self.sink.batches], [2, 2, 1, 1])
