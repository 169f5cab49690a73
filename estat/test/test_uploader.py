# -*- test-case-name: estat.test.test_uploader -*-
"""
Tests for L{estat.uploader}.
"""

from __future__ import annotations

import gc
import json
import weakref

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.encoder import Batch, encode_batch
from estat.event import UnencodedEvent
from estat.interfaces import StoreError
from estat.metrics import Metrics
from estat.testing import (
    DeferredThreadRunner,
    MemoryDeadLetterQueue,
    MemoryObjectStore,
    read_lines,
    run_synchronously,
)
from estat.uploader import Uploader, backoff_delay

START = 1700000000.0
KEY = "raw/dt=2023-11-14/hour=22/test-1-20231114T221320000Z-00.jsonl.gz"
POISON_KEY = "dlq/dt=2023-11-14/hour=22/test-1-20231114T221320000Z-00.jsonl.gz"


def line(n: int) -> bytes:
    return b'{"n":%d,"_estat":{"received_at":"2023-11-14T22:13:20.000Z"}}' % (n,)


def make_batch(events=None, count=3) -> Batch:
    if events is None:
        events = [(START, line(n)) for n in range(count)]
    return Batch(key=KEY, poison_key=POISON_KEY, events=events,
                 first_event_at=START, sealed_at=START + 1)


class BackoffDelayTests(SynchronousTestCase):
    def test_bounds(self):
        """
        The delay lies in [ceiling / 2, ceiling), the ceiling doubling with
        each attempt.
        """
        self.assertEqual(backoff_delay(0, 0.2, 5.0, lambda: 0.0), 0.1)
        self.assertEqual(backoff_delay(1, 0.2, 5.0, lambda: 0.0), 0.2)
        self.assertEqual(backoff_delay(2, 0.2, 5.0, lambda: 0.0), 0.4)
        for attempt in range(4):
            ceiling = 0.2 * 2 ** attempt
            high = backoff_delay(attempt, 0.2, 5.0, lambda: 0.999999)
            self.assertLess(high, ceiling)
            self.assertGreater(high, ceiling * 0.99)
            self.assertEqual(backoff_delay(attempt, 0.2, 5.0, lambda: 0.5), ceiling * 0.75)

    def test_cap(self):
        """
        The ceiling never exceeds the cap.
        """
        self.assertEqual(backoff_delay(10, 0.2, 5.0, lambda: 0.0), 2.5)
        self.assertLess(backoff_delay(10, 0.2, 5.0, lambda: 0.999999), 5.0)
        self.assertEqual(backoff_delay(50, 0.2, 5.0, lambda: 0.5), 3.75)


class UploaderTestsMixin:
    def make_uploader(self, failures=(), retries=2, run_in_thread=run_synchronously,
                      rand=lambda: 0.5, backoff_base=1.0, backoff_cap=30.0):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryObjectStore(failures=list(failures))
        self.dead_letters = MemoryDeadLetterQueue()
        self.metrics = Metrics(CollectorRegistry())
        self.uploader = Uploader(
            store=self.store,
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            clock=self.clock,
            run_in_thread=run_in_thread,
            retries=retries,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            rand=rand,
        )
        return self.uploader

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)


class StoreTests(UploaderTestsMixin, SynchronousTestCase):
    def test_stores_batch(self):
        """
        A batch becomes one gzip JSON Lines object under its key, holding
        its events' lines in order.
        """
        self.make_uploader()
        batch = make_batch(count=3)
        self.assertIs(self.successResultOf(self.uploader.upload(batch)), True)
        self.assertEqual(list(self.store.objects), [KEY])
        self.assertEqual(read_lines(self.store.objects[KEY]), [line(0), line(1), line(2)])
        self.assertEqual(self.sample("s3_events_stored_total"), 3)
        self.assertEqual(self.sample("batches_stored_total"), 1)
        self.assertEqual(self.sample("s3_put_errors_total"), 0)
        self.assertEqual(self.sample("s3_put_duration_seconds_count"), 1)
        self.assertEqual(self.dead_letters.kept, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_encoding_runs_in_thread_runner(self):
        """
        Nothing is encoded or stored until the injected thread runner runs
        the work it was handed, and that work is the encoder's C{encode}
        (L{encode_batch} for the default gzip JSON Lines).
        """
        runner = DeferredThreadRunner()
        self.make_uploader(run_in_thread=runner)
        batch = make_batch(count=2)
        d = self.uploader.upload(batch)
        self.assertNoResult(d)
        self.assertEqual(self.store.puts, [])
        self.assertEqual(len(runner.calls), 1)
        f, args, kwargs, _ = runner.calls[0]
        self.assertEqual(f, self.uploader.encoder.encode)
        self.assertIs(args[0], batch)

        runner.run_all()
        self.successResultOf(d)
        self.assertEqual(read_lines(self.store.objects[KEY]), [line(0), line(1)])


    def test_raw_events_are_freed_while_the_put_waits(self):
        """
        Once a batch is encoded, the uploader keeps no reference to it: while
        the store's put is still unanswered, only the encoded object is in
        memory, not the batch's raw events.
        """
        self.make_uploader(failures=["hang"])
        batch = make_batch(count=3)
        events = weakref.ref(batch)
        d = self.uploader.upload(batch)
        del batch
        gc.collect()
        self.assertEqual(len(self.store.puts), 1)
        self.assertNoResult(d)
        self.assertIsNone(events())

    def test_raw_events_are_kept_until_encoded(self):
        """
        Until the encoder has run, the batch is kept (the uploader has only
        handed it to the thread runner).
        """
        runner = DeferredThreadRunner()
        self.make_uploader(run_in_thread=runner)
        batch = make_batch(count=2)
        events = weakref.ref(batch)
        d = self.uploader.upload(batch)
        del batch
        gc.collect()
        self.assertIsNotNone(events())
        runner.run_all()
        self.successResultOf(d)
        self.assertEqual(read_lines(self.store.objects[KEY]), [line(0), line(1)])


class RetryTests(UploaderTestsMixin, SynchronousTestCase):
    def test_retries_with_backoff_then_stores(self):
        """
        A failed put is retried after a jittered backoff, on the clock,
        under the same key; every failed attempt is counted.
        """
        self.make_uploader(failures=[StoreError("SlowDown", "reduce your rate")] * 2,
                           retries=2, rand=lambda: 0.5, backoff_base=1.0)
        d = self.uploader.upload(make_batch(count=2))
        self.assertNoResult(d)
        self.assertEqual(len(self.store.puts), 1)
        self.assertEqual(self.sample("s3_put_errors_total"), 1)
        self.assertEqual(self.sample("s3_put_errors_by_code_total", code="SlowDown"), 1)

        # attempt 0 -> ceiling 1.0, jitter 0.5 -> 0.75 s
        self.clock.advance(0.74)
        self.assertNoResult(d)
        self.assertEqual(len(self.store.puts), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.store.puts), 2)
        self.assertNoResult(d)
        self.assertEqual(self.sample("s3_put_errors_total"), 2)
        self.assertEqual(self.sample("s3_put_retries_total"), 1)

        # attempt 1 -> ceiling 2.0 -> 1.5 s
        self.clock.advance(1.49)
        self.assertNoResult(d)
        self.assertEqual(len(self.store.puts), 2)
        self.clock.advance(0.01)
        self.successResultOf(d)
        self.assertEqual(len(self.store.puts), 3)
        self.assertEqual({key for key, _ in self.store.puts}, {KEY})
        self.assertEqual(len({body for _, body in self.store.puts}), 1)
        self.assertEqual(list(self.store.objects), [KEY])
        self.assertEqual(self.sample("s3_put_errors_by_code_total", code="SlowDown"), 2)
        self.assertEqual(self.sample("s3_put_retries_total"), 2)
        self.assertEqual(self.sample("s3_events_stored_total"), 2)
        self.assertEqual(self.sample("batches_stored_total"), 1)
        self.assertEqual(self.dead_letters.kept, [])

    def test_jitter_comes_from_rand(self):
        """
        The wait uses the injected random source: with C{rand} at 0 it is
        half the ceiling.
        """
        self.make_uploader(failures=[StoreError("SlowDown")], rand=lambda: 0.0,
                           backoff_base=1.0)
        d = self.uploader.upload(make_batch())
        self.clock.advance(0.49)
        self.assertEqual(len(self.store.puts), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.store.puts), 2)
        self.successResultOf(d)

    def test_exhausted_retries_go_to_dead_letters(self):
        """
        After C{retries} retries, the object goes to the dead-letter queue
        under the same key; every attempt is counted as an error.
        """
        self.make_uploader(failures=[StoreError("SlowDown")] * 3, retries=2)
        batch = make_batch(count=4)
        d = self.uploader.upload(batch)
        self.clock.advance(0.75)
        self.clock.advance(1.5)
        self.successResultOf(d)
        self.assertEqual(len(self.store.puts), 3)
        self.assertEqual({key for key, _ in self.store.puts}, {KEY})
        self.assertEqual(self.store.objects, {})
        [kept] = self.dead_letters.kept
        self.assertEqual(kept.key, KEY)
        self.assertEqual(kept.count, 4)
        self.assertFalse(kept.poison)
        self.assertEqual(kept.body, self.store.puts[0][1])
        self.assertEqual(read_lines(kept.body), [line(n) for n in range(4)])
        self.assertEqual(self.sample("s3_put_errors_total"), 3)
        self.assertEqual(self.sample("s3_put_errors_by_code_total", code="SlowDown"), 3)
        self.assertEqual(self.sample("s3_events_stored_total"), 0)
        self.assertEqual(self.sample("batches_stored_total"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zero_retries(self):
        """
        With C{retries} 0, one failure sends the object to the dead-letter
        queue at once.
        """
        self.make_uploader(failures=[StoreError("SlowDown")], retries=0)
        self.successResultOf(self.uploader.upload(make_batch()))
        self.assertEqual(len(self.store.puts), 1)
        self.assertEqual([o.key for o in self.dead_letters.kept], [KEY])

    def test_non_retryable_error_goes_to_dead_letters_at_once(self):
        """
        A L{StoreError} that is not retryable is not retried.
        """
        self.make_uploader(
            failures=[StoreError("AccessDenied", "no", retryable=False)], retries=5)
        self.successResultOf(self.uploader.upload(make_batch()))
        self.assertEqual(len(self.store.puts), 1)
        self.assertEqual([o.key for o in self.dead_letters.kept], [KEY])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sample("s3_put_errors_by_code_total", code="AccessDenied"), 1)
        self.assertIsNone(self.sample("s3_put_errors_by_code_total", code="SlowDown"))
        self.assertEqual(self.sample("s3_put_retries_total"), 0)

    def test_other_exception_is_retried(self):
        """
        An error that is not a L{StoreError} is counted under its type name
        and retried.
        """
        self.make_uploader(failures=[ConnectionResetError("reset")], retries=1)
        d = self.uploader.upload(make_batch())
        self.clock.advance(0.75)
        self.successResultOf(d)
        self.assertEqual(
            self.sample("s3_put_errors_by_code_total", code="ConnectionResetError"), 1)
        self.assertEqual(list(self.store.objects), [KEY])

    def test_put_with_retries_reports_outcome(self):
        """
        L{Uploader.put_with_retries} says whether the object was stored and
        does not dead-letter it itself.
        """
        self.make_uploader(failures=[StoreError("SlowDown")])
        [obj] = encode_batch(make_batch())
        d = Deferred.fromCoroutine(self.uploader.put_with_retries(obj, 0))
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(self.dead_letters.kept, [])
        d = Deferred.fromCoroutine(self.uploader.put_with_retries(obj, 0))
        self.assertTrue(self.successResultOf(d))
        self.assertIn(KEY, self.store.objects)


class HurryTests(UploaderTestsMixin, SynchronousTestCase):
    def test_hurry_cuts_backoff_short(self):
        """
        L{Uploader.hurry} during a backoff sends the object to the
        dead-letter queue at once, without another attempt.
        """
        self.make_uploader(failures=[StoreError("SlowDown")], retries=5)
        d = self.uploader.upload(make_batch())
        self.assertNoResult(d)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.uploader.hurry()
        self.successResultOf(d)
        self.assertEqual(len(self.store.puts), 1)
        self.assertEqual([o.key for o in self.dead_letters.kept], [KEY])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.store.puts), 1)

    def test_hurry_cancels_hanging_attempt(self):
        """
        L{Uploader.hurry} cancels an attempt that never answers and sends
        the object to the dead-letter queue without a retry.
        """
        self.make_uploader(failures=["hang"], retries=5)
        d = self.uploader.upload(make_batch(count=2))
        self.clock.advance(1000)
        self.assertNoResult(d)
        self.uploader.hurry()
        self.successResultOf(d)
        self.assertEqual(len(self.store.puts), 1)
        [kept] = self.dead_letters.kept
        self.assertEqual(kept.key, KEY)
        self.assertEqual(kept.count, 2)
        self.assertEqual(self.sample("s3_put_errors_by_code_total", code="Cancelled"), 1)
        self.assertEqual(self.sample("s3_put_errors_total"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_after_hurry_failures_are_not_retried(self):
        """
        Once hurried, a batch uploaded later is not attempted at all (an
        attempt could outlive the shutdown deadline): it goes straight to the
        dead-letter queue.
        """
        self.make_uploader(failures=[StoreError("SlowDown")], retries=5)
        self.uploader.hurry()
        self.successResultOf(self.uploader.upload(make_batch()))
        self.assertEqual(len(self.store.puts), 0)
        self.assertEqual([o.key for o in self.dead_letters.kept], [KEY])


class PoisonTests(UploaderTestsMixin, SynchronousTestCase):
    def test_poison_event_goes_under_poison_key(self):
        """
        An event the encoder cannot write is stored raw, as a second
        object under the batch's poison key; the rest are stored normally.
        """
        self.make_uploader()
        raw = b'{"x": NaN}'
        bad = UnencodedEvent(obj={"x": float("nan"), "_estat": {"ip": "192.0.2.1"}}, raw=raw)
        batch = make_batch(events=[(START, line(0)), (START, bad), (START, line(2))])
        self.successResultOf(self.uploader.upload(batch))
        self.assertEqual(sorted(self.store.objects), sorted([KEY, POISON_KEY]))
        self.assertEqual(read_lines(self.store.objects[KEY]), [line(0), line(2)])
        [poison_line] = read_lines(self.store.objects[POISON_KEY])
        record = json.loads(poison_line)
        self.assertEqual(record["raw"], raw.decode("ascii"))
        self.assertEqual(record["_estat"], {"ip": "192.0.2.1"})
        self.assertIn("error", record)
        self.assertEqual(self.sample("encoder_poison_events_total"), 1)
        # The poison object's events are not counted as stored events.
        self.assertEqual(self.sample("s3_events_stored_total"), 2)
        self.assertEqual(self.sample("batches_stored_total"), 1)

    def test_poison_object_that_fails_goes_to_dead_letters(self):
        """
        The poison object is retried and dead-lettered like any other.
        """
        self.make_uploader(failures=[StoreError("AccessDenied", retryable=False)] * 2)
        bad = UnencodedEvent(obj={"x": float("inf")}, raw=b"...")
        batch = make_batch(events=[(START, line(0)), (START, bad)])
        self.successResultOf(self.uploader.upload(batch))
        self.assertEqual([(o.key, o.poison) for o in self.dead_letters.kept],
                         [(KEY, False), (POISON_KEY, True)])


class NeverFailsTests(UploaderTestsMixin, SynchronousTestCase):
    def test_encoding_error_is_counted_as_dropped(self):
        """
        When encoding raises, L{Uploader.upload} still succeeds; the events
        are counted as dropped.
        """
        self.make_uploader()
        # A payload neither bytes nor UnencodedEvent makes encode_batch raise.
        batch = make_batch(events=[(START, line(0)), (START, 12345), (START, line(1))])
        self.assertIs(self.successResultOf(self.uploader.upload(batch)), False)
        self.assertEqual(self.store.puts, [])
        self.assertEqual(self.dead_letters.kept, [])
        self.assertEqual(self.sample("dlq_events_dropped_total"), 3)
        self.assertEqual(self.sample("events_dropped_total", reason="encode_failed"), 3)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_thread_runner_failure_is_counted_as_dropped(self):
        """
        A failure of the thread runner itself does not fail the upload.
        """
        self.make_uploader(run_in_thread=lambda f, *a, **k: fail(RuntimeError("pool gone")))
        self.assertIs(self.successResultOf(self.uploader.upload(make_batch(count=2))), False)
        self.assertEqual(self.sample("events_dropped_total", reason="encode_failed"), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_dead_letter_failure_is_counted_as_dropped(self):
        """
        A dead-letter queue that breaks its promise and fails does not fail
        the upload either.
        """
        self.make_uploader(failures=[StoreError("AccessDenied", retryable=False)])

        class BrokenDeadLetters:
            def put(self, obj):
                return fail(OSError("disk on fire"))

        self.uploader.dead_letters = BrokenDeadLetters()
        self.assertIs(self.successResultOf(self.uploader.upload(make_batch(count=3))), False)
        self.assertEqual(self.sample("events_dropped_total", reason="unexpected_error"), 3)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 3)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)



class OutcomeTests(UploaderTestsMixin, SynchronousTestCase):
    """
    The upload's result says whether every event has a durable home (what
    ACK_MODE=stored acknowledges).
    """

    def test_dead_lettered_is_kept(self):
        self.make_uploader(failures=[StoreError("AccessDenied", retryable=False)])
        self.assertIs(self.successResultOf(self.uploader.upload(make_batch(count=2))), True)
        self.assertEqual(len(self.dead_letters.kept), 1)

    def test_dropped_by_the_dead_letter_queue_is_not(self):
        self.make_uploader(failures=[StoreError("AccessDenied", retryable=False)])
        self.dead_letters.accept = False
        self.assertIs(self.successResultOf(self.uploader.upload(make_batch(count=2))), False)
