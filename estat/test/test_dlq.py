# -*- test-case-name: estat.test.test_dlq -*-
"""
Tests for L{estat.dlq}: the L{IDeadLetterQueue} contract, run against the
disk queue and the in-memory fake, then the disk queue's files, limits and
retry loop, driven by a L{Clock} with a synchronous thread runner.
"""

from __future__ import annotations

import os
import re

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from estat.dlq import QUARANTINE, Claim, DiskDeadLetterQueue, encode_dlq_file, read_dlq_file
from estat.encoder import EncodedObject, encode_object
from estat.fsutil import TEMP_PREFIX
from estat.interfaces import IDeadLetterQueue
from estat.metrics import Metrics
from estat.test.harness import temp_dir
from estat.testing import (
    DeferredThreadRunner,
    MemoryDeadLetterQueue,
    MemoryObjectStore,
    run_synchronously,
)
from estat.uploader import Uploader

START = 1700000000.0
INTERVAL = 5.0
MAX_BACKOFF = 60.0
NAME = re.compile(r"^(\d{20})-([0-9a-f]{8})\.dlq$")


def make_object(name: str, count: int = 2, poison: bool = False) -> EncodedObject:
    key = f"raw/dt=2023-11-14/hour=22/{name}.jsonl.gz"
    return encode_object(key, [b'{"n":%d,"of":"%s"}' % (i, name.encode()) for i in range(count)],
                         6, poison=poison)


class Deliveries:
    """
    A C{deliver} function recording what it was given and when.

    @ivar outcome: C{True}/C{False}, or a function of the object returning
        a bool, a Deferred, or raising.
    """

    def __init__(self, clock: Clock, outcome=True) -> None:
        self.clock = clock
        self.outcome = outcome
        self.calls: list[tuple[float, EncodedObject]] = []

    def __call__(self, obj: EncodedObject):
        self.calls.append((self.clock.seconds(), obj))
        result = self.outcome(obj) if callable(self.outcome) else self.outcome
        return result if isinstance(result, Deferred) else succeed(result)

    @property
    def keys(self) -> list[str]:
        return [obj.key for _, obj in self.calls]

    @property
    def times(self) -> list[float]:
        return [t - START for t, _ in self.calls]


class DeadLetterQueueTestsMixin:
    """
    The L{IDeadLetterQueue} contract.  A test case using it provides
    C{make_dead_letters()} and C{kept()} (the objects kept, oldest first).
    """

    def setUp(self) -> None:
        self.dead_letters = self.make_dead_letters()

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IDeadLetterQueue, self.dead_letters))

    def test_putKeeps(self) -> None:
        """
        C{put} fires with C{True} and the object is kept, unchanged.
        """
        obj = make_object("a", count=3)
        self.assertIs(self.successResultOf(self.dead_letters.put(obj)), True)
        self.assertEqual(self.kept(), [obj])

    def test_putKeepsEach(self) -> None:
        """
        Every object put is kept, even two with the same key.
        """
        objects = [make_object("a"), make_object("b", count=5), make_object("a", count=1)]
        for obj in objects:
            self.assertIs(self.successResultOf(self.dead_letters.put(obj)), True)
        self.assertEqual(self.kept(), objects)


class DiskQueueMixin:
    def make_queue(self, directory: str | None = None, deliver=None,
                   run_in_thread=run_synchronously, **kwargs) -> DiskDeadLetterQueue:
        if not hasattr(self, "clock"):
            self.clock = Clock()
            self.clock.advance(START)
        if directory is None:
            directory = os.path.join(temp_dir(self), "dlq")
        self.directory = directory
        self.metrics = Metrics(CollectorRegistry())
        kwargs.setdefault("interval", INTERVAL)
        kwargs.setdefault("max_backoff", MAX_BACKOFF)
        queue = DiskDeadLetterQueue(directory=directory, metrics=self.metrics, clock=self.clock,
                                    run_in_thread=run_in_thread, deliver=deliver, **kwargs)
        self.queue = queue
        self.addCleanup(self.stop_if_running, queue)
        return queue

    def stop_if_running(self, queue: DiskDeadLetterQueue) -> None:
        if queue.running:
            queue.stopService()

    def sample(self, name: str, labels: dict | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def names(self, directory: str | None = None) -> list[str]:
        directory = directory or self.directory
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if n != QUARANTINE)

    def kept(self) -> list[EncodedObject]:
        return [read_dlq_file(os.path.join(self.directory, n)) for n in self.names()]

    def sizes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, n)) for n in self.names())

    def advance(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


class DiskDeadLetterQueueContractTests(DiskQueueMixin, DeadLetterQueueTestsMixin,
                                       SynchronousTestCase):
    def make_dead_letters(self) -> DiskDeadLetterQueue:
        return self.make_queue()


class MemoryDeadLetterQueueContractTests(DeadLetterQueueTestsMixin, SynchronousTestCase):
    def make_dead_letters(self) -> MemoryDeadLetterQueue:
        return MemoryDeadLetterQueue()

    def kept(self) -> list[EncodedObject]:
        return self.dead_letters.kept


class PutTests(DiskQueueMixin, SynchronousTestCase):
    """
    Writing dead-letter files.
    """

    def test_oneFileNamedByCreationTime(self) -> None:
        """
        A put writes one file named C{<creation time in ns>-<random hex>.dlq}
        and nothing else.
        """
        self.make_queue(entropy=lambda n: b"\xab" * n)
        self.successResultOf(self.queue.put(make_object("a")))
        [name] = os.listdir(self.directory)
        m = NAME.match(name)
        self.assertIsNotNone(m, name)
        self.assertEqual(int(m.group(1)), int(START * 1e9))
        self.assertEqual(m.group(2), "abababab")

    def test_namesSortByCreation(self) -> None:
        """
        File names sort in the order the objects were put, whatever the
        random part and even within one clock tick.
        """
        entropy = iter([b"\xff" * 4, b"\x80" * 4, b"\x00" * 4, b"\x11" * 4])
        self.make_queue(entropy=lambda n: next(entropy))
        objects = [make_object(k) for k in ("d", "c", "b", "a")]
        self.successResultOf(self.queue.put(objects[0]))
        self.successResultOf(self.queue.put(objects[1]))  # same clock time
        self.clock.advance(0.5)
        self.successResultOf(self.queue.put(objects[2]))
        self.clock.advance(1)
        self.successResultOf(self.queue.put(objects[3]))
        self.assertEqual(len(set(self.names())), 4)
        self.assertEqual([obj.key for obj in self.kept()], [obj.key for obj in objects])

    def test_readBack(self) -> None:
        """
        L{read_dlq_file} gives back the key, body, count, MD5 and poison
        flag that were put.
        """
        self.make_queue()
        objects = [make_object("a", count=7), make_object("b", count=1, poison=True)]
        for obj in objects:
            self.successResultOf(self.queue.put(obj))
        read = self.kept()
        self.assertEqual(read, objects)
        self.assertEqual([(o.key, o.body, o.count, o.content_md5, o.poison) for o in read],
                         [(o.key, o.body, o.count, o.content_md5, o.poison) for o in objects])

    def test_atomic(self) -> None:
        """
        No temporary file is left after writes.
        """
        self.make_queue()
        for n in range(5):
            self.successResultOf(self.queue.put(make_object(str(n))))
        self.assertEqual(len(self.names()), 5)
        self.assertFalse([n for n in os.listdir(self.directory) if n.startswith(TEMP_PREFIX)])

    def test_metrics(self) -> None:
        """
        The gauges follow the files and bytes on disk; enqueued events are
        counted.
        """
        self.make_queue()
        self.queue.startService()
        self.successResultOf(self.queue.put(make_object("a", count=3)))
        self.successResultOf(self.queue.put(make_object("b", count=4)))
        self.assertEqual(self.sample("dlq_files_current"), 2)
        self.assertEqual(self.sample("dlq_bytes_current"), self.sizes())
        self.assertEqual(self.sample("dlq_events_enqueued_total"), 7)

    def test_putRunsInThread(self) -> None:
        """
        The file is written by the thread runner: nothing on disk, and no
        answer, until it runs.
        """
        runner = DeferredThreadRunner()
        self.make_queue(run_in_thread=runner)
        d = self.queue.put(make_object("a"))
        self.assertNoResult(d)
        self.assertEqual(self.names(), [])
        runner.run_all()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(self.names()), 1)

    def test_full(self) -> None:
        """
        A put that would take the queue over C{max_bytes} writes nothing,
        fires with C{False}, and counts its events as dropped (C{dlq_full})
        with a log line; exactly reaching the limit is allowed.
        """
        first, second = make_object("a", count=3), make_object("b", count=4)
        size = len(encode_dlq_file(first, START))
        self.make_queue(max_bytes=2 * size - 1)
        self.assertIs(self.successResultOf(self.queue.put(first)), True)
        with capturedLogs() as events:
            self.assertIs(self.successResultOf(self.queue.put(second)), False)
        self.assertEqual([o.key for o in self.kept()], [first.key])
        self.assertEqual(self.sample("events_dropped_total", {"reason": "dlq_full"}), 4)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 4)
        self.assertEqual(self.sample("dlq_events_enqueued_total"), 3)
        [event] = [e for e in events if e.get("reason") == "dlq_full"]
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(second.key, formatEvent(event))

    def test_fullBoundary(self) -> None:
        """
        Filling the queue to exactly C{max_bytes} is allowed.
        """
        first, second = make_object("a", count=3), make_object("b", count=3)
        size = len(encode_dlq_file(first, START))
        self.make_queue(max_bytes=2 * size)
        self.assertIs(self.successResultOf(self.queue.put(first)), True)
        self.assertIs(self.successResultOf(self.queue.put(second)), True)
        self.assertIs(self.successResultOf(self.queue.put(make_object("c", count=1))), False)

    def test_fullCountsWritesInFlight(self) -> None:
        """
        Writes not yet finished count towards the limit.
        """
        runner = DeferredThreadRunner()
        first = make_object("a", count=3)
        size = len(encode_dlq_file(first, START))
        self.make_queue(run_in_thread=runner, max_bytes=size)
        d = self.queue.put(first)
        self.assertIs(self.successResultOf(self.queue.put(make_object("b", count=3))), False)
        runner.run_all()
        self.assertIs(self.successResultOf(d), True)

    def test_writeFailure(self) -> None:
        """
        When the file cannot be written the put fires with C{False} and
        counts the events (C{dlq_write_failed}); the space it reserved is
        given back, so the next put works once the disk does.
        """
        obj = make_object("a", count=3)
        directory = os.path.join(temp_dir(self), "dlq")
        with open(directory, "wb"):
            pass  # a regular file where the directory should be
        self.make_queue(directory=directory, max_bytes=len(encode_dlq_file(obj, START)))
        with capturedLogs() as events:
            self.assertIs(self.successResultOf(self.queue.put(obj)), False)
        self.assertEqual(self.sample("events_dropped_total", {"reason": "dlq_write_failed"}), 3)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 3)
        self.assertEqual(self.sample("dlq_files_current"), 0)
        self.assertTrue([e for e in events if e.get("reason") == "dlq_write_failed"])
        os.remove(directory)
        self.assertIs(self.successResultOf(self.queue.put(obj)), True)
        self.assertEqual(self.kept(), [obj])
        self.assertEqual(self.sample("dlq_events_enqueued_total"), 3)

    def test_stopWaitsForWrites(self) -> None:
        """
        C{stopService} fires only once the writes begun have finished.
        """
        runner = DeferredThreadRunner()
        self.make_queue(run_in_thread=runner)
        self.queue.startService()
        runner.run_all()  # recovery
        write = self.queue.put(make_object("a"))
        stopped = self.queue.stopService()
        self.assertNoResult(stopped)
        runner.run_all()
        self.assertIs(self.successResultOf(write), True)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(len(self.names()), 1)


class RetryLoopTests(DiskQueueMixin, SynchronousTestCase):
    """
    The retry loop, from C{startService} on.
    """

    def start(self, outcome=True, **kwargs) -> Deliveries:
        self.clock = Clock()
        self.clock.advance(START)
        deliveries = Deliveries(self.clock, outcome)
        self.make_queue(deliver=deliveries, **kwargs)
        self.queue.startService()
        return deliveries

    def test_recoveryRunsInThread(self) -> None:
        """
        C{startService} does no disk work on the reactor thread.
        """
        runner = DeferredThreadRunner()
        self.make_queue(run_in_thread=runner, deliver=Deliveries(Clock()))
        self.queue.startService()
        self.assertFalse(os.path.exists(self.directory))
        runner.run_all()
        self.assertTrue(os.path.isdir(os.path.join(self.directory, QUARANTINE)))

    def test_oldestFirstWithItsKey(self) -> None:
        """
        A pass retries the oldest file first (not the first key in order)
        under its own key; a failed file stays.
        """
        deliveries = self.start(outcome=False)
        objects = [make_object(k) for k in ("z", "a", "m")]
        for obj in objects:
            self.successResultOf(self.queue.put(obj))
            self.clock.advance(1)
        self.advance(INTERVAL - 3)
        self.assertEqual(deliveries.calls[0], (START + INTERVAL, objects[0]))
        self.assertEqual(len(self.names()), 3)
        self.assertEqual(self.sample("dlq_files_current"), 3)
        self.assertEqual(self.sample("dlq_events_recovered_total"), 0)

    def test_storedFileDeleted(self) -> None:
        """
        A file the store takes is deleted, its events counted as recovered.
        """
        deliveries = self.start()
        obj = make_object("a", count=3)
        self.successResultOf(self.queue.put(obj))
        with capturedLogs() as events:
            self.clock.advance(INTERVAL)
        self.assertEqual(deliveries.keys, [obj.key])
        self.assertEqual(self.names(), [])
        self.assertEqual(self.sample("dlq_events_recovered_total"), 3)
        self.assertEqual(self.sample("dlq_files_current"), 0)
        self.assertEqual(self.sample("dlq_bytes_current"), 0)
        self.assertTrue([e for e in events if e.get("key") == obj.key
                         and "stored" in formatEvent(e)])

    def test_drainsBackToBack(self) -> None:
        """
        While the store takes files, one pass sends them all, oldest first,
        without waiting between them.
        """
        deliveries = self.start()
        objects = [make_object(str(n), count=n + 1) for n in range(6)]
        for obj in objects:
            self.successResultOf(self.queue.put(obj))
        self.clock.advance(INTERVAL)
        self.assertEqual(deliveries.keys, [obj.key for obj in objects])
        self.assertEqual(deliveries.times, [INTERVAL] * 6)
        self.assertEqual(self.names(), [])
        self.assertEqual(self.sample("dlq_events_recovered_total"), sum(range(1, 7)))
        # Then back to waiting one interval.
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), START + 2 * INTERVAL)

    def test_backoffDoubles(self) -> None:
        """
        While the store refuses, the wait between attempts doubles from the
        interval up to C{max_backoff}.
        """
        deliveries = self.start(outcome=False)
        self.successResultOf(self.queue.put(make_object("a")))
        self.advance(300)
        times = deliveries.times
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(times[0], INTERVAL)
        self.assertGreaterEqual(gaps[0], INTERVAL)
        for before, after in zip(gaps, gaps[1:]):
            self.assertEqual(after, min(2 * before, MAX_BACKOFF), gaps)
        self.assertEqual(gaps[-2:], [MAX_BACKOFF, MAX_BACKOFF])
        # With these settings: 5, 10, 20, 40, then 60 s.
        self.assertLessEqual(len(times), 9)
        self.assertEqual(len(self.names()), 1)

    def test_backoffResetsAfterSuccess(self) -> None:
        """
        Once the store takes a file again, the backoff is over: the next
        failure waits one interval, not the longest wait reached before.
        """
        outcomes = iter([False, False, False, True, False, True])
        deliveries = self.start(outcome=lambda obj: next(outcomes))
        first, second = make_object("a"), make_object("b")
        self.successResultOf(self.queue.put(first))
        self.advance(41)
        self.assertEqual(deliveries.times, [5, 10, 20, 40])
        self.assertEqual(self.names(), [])
        self.successResultOf(self.queue.put(second))
        self.advance(20)
        self.assertEqual(deliveries.times, [5, 10, 20, 40, 45, 50])
        self.assertEqual(deliveries.keys, [first.key] * 4 + [second.key] * 2)
        self.assertEqual(self.names(), [])

    def test_failingFileDoesNotHoldUpOthers(self) -> None:
        """
        One file the store keeps refusing waits in its own backoff while the
        files behind it are stored.
        """
        stuck = make_object("stuck")
        deliveries = self.start(outcome=lambda obj: obj.key != stuck.key)
        others = [make_object("b"), make_object("c")]
        self.successResultOf(self.queue.put(stuck))
        self.clock.advance(1)
        for obj in others:
            self.successResultOf(self.queue.put(obj))
        self.advance(300)
        self.assertEqual(deliveries.keys[0], stuck.key)
        self.assertEqual([k for k in deliveries.keys if k != stuck.key],
                         [obj.key for obj in others])
        self.assertEqual([o.key for o in self.kept()], [stuck.key])

    def test_scanLimit(self) -> None:
        """
        A scan reads at most C{scan_limit} directory entries.
        """
        self.make_queue(scan_limit=10)
        for n in range(30):
            self.successResultOf(self.queue.put(make_object(str(n))))
        result = self.queue.scan()
        self.assertEqual(result.scanned, 10)
        self.assertIsNotNone(result.oldest)
        self.assertIn(result.oldest.name, self.names())
        self.queue.scan_limit = 1000
        self.assertEqual(self.queue.scan().scanned, 30)

    def test_scanLimitStillDrains(self) -> None:
        """
        With a small scan limit, a pass still drains every file.
        """
        deliveries = self.start(scan_limit=10)
        objects = [make_object(str(n)) for n in range(30)]
        for obj in objects:
            self.successResultOf(self.queue.put(obj))
        self.clock.advance(INTERVAL)
        self.assertEqual(sorted(deliveries.keys), sorted(obj.key for obj in objects))
        self.assertEqual(self.names(), [])

    def test_scanSkipsOtherEntries(self) -> None:
        """
        Temporary files, other files, other names and the quarantine
        directory are never retried nor removed.
        """
        deliveries = self.start()
        self.clock.advance(0)
        others = [TEMP_PREFIX + "1-abc", "README", "notanumber-0000.dlq"]
        for name in others:
            with open(os.path.join(self.directory, name), "wb") as f:
                f.write(b"x")
        self.assertIsNone(self.queue.scan().oldest)
        self.advance(3 * INTERVAL)
        self.assertEqual(deliveries.calls, [])
        self.assertEqual(self.names(), sorted(others))

    def test_expired(self) -> None:
        """
        Files older than C{max_age} are deleted, their events counted as
        dropped (C{dlq_expired}) with a log line; younger ones stay.
        """
        deliveries = self.start(outcome=False, max_age=3600)
        old, young = make_object("old", count=3), make_object("young", count=2)
        self.successResultOf(self.queue.put(old))
        self.advance(3000, step=10)
        self.successResultOf(self.queue.put(young))
        [old_name, young_name] = self.names()
        with capturedLogs() as events:
            self.advance(700, step=10)
        self.assertIn(old.key, deliveries.keys)
        self.assertEqual(self.names(), [young_name])
        self.assertEqual(self.sample("dlq_events_dropped_total"), 3)
        self.assertEqual(self.sample("events_dropped_total", {"reason": "dlq_expired"}), 3)
        self.assertEqual(self.sample("dlq_files_current"), 1)
        self.assertEqual(self.sample("dlq_bytes_current"), self.sizes())
        [event] = [e for e in events if e.get("reason") == "dlq_expired"]
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual((event["name"], event["count"]), (old_name, 3))
        self.assertIn(old_name, formatEvent(event))

    def test_restart(self) -> None:
        """
        A new queue on the same directory counts what it finds at start,
        removes unfinished writes, and retries the old files at once under
        their keys.
        """
        self.clock = Clock()
        self.clock.advance(START)
        writer = self.make_queue()
        objects = [make_object(str(n), count=n + 2) for n in range(3)]
        for obj in objects:
            self.successResultOf(writer.put(obj))
            self.clock.advance(1)
        size = self.sizes()
        leftover = os.path.join(self.directory, TEMP_PREFIX + "4242-0123456789ab")
        with open(leftover, "wb") as f:
            f.write(b'{"key":"half')
        self.clock.advance(100)

        deliveries = Deliveries(self.clock)
        reader = self.make_queue(directory=self.directory, deliver=deliveries)
        with capturedLogs() as events:
            reader.startService()
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual(self.sample("dlq_files_current"), 3)
        self.assertEqual(self.sample("dlq_bytes_current"), size)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("removed 1 unfinished", text)
        self.assertIn("holds 3 files", text)
        self.clock.advance(0)
        self.assertEqual(deliveries.keys, [obj.key for obj in objects])
        self.assertEqual(deliveries.times, [103.0] * 3)
        self.assertEqual(self.names(), [])
        self.assertEqual(self.sample("dlq_files_current"), 0)
        self.assertEqual(self.sample("dlq_bytes_current"), 0)
        self.assertEqual(self.sample("dlq_events_recovered_total"), 2 + 3 + 4)

    def test_quarantine(self) -> None:
        """
        Truncated, altered and foreign files are moved to the quarantine
        directory and counted, and the pass goes on to the next file.
        """
        self.clock = Clock()
        self.clock.advance(START)
        writer = self.make_queue()
        truncated, altered, good = make_object("t", 5), make_object("x", 5), make_object("g", 5)
        for obj in (truncated, altered):
            self.successResultOf(writer.put(obj))
            self.clock.advance(1)
        garbage = f"{int(self.clock.seconds() * 1e9):020d}-0badf00d.dlq"
        with open(os.path.join(self.directory, garbage), "wb") as f:
            f.write(b"\x1f\x8b this is not a dead-letter file")
        self.clock.advance(1)
        self.successResultOf(writer.put(good))
        truncated_name, altered_name, garbage_name, good_name = self.names()
        self.assertEqual(garbage_name, garbage)
        with open(os.path.join(self.directory, truncated_name), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 7)
        with open(os.path.join(self.directory, altered_name), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            last = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))

        deliveries = Deliveries(self.clock)
        reader = self.make_queue(directory=self.directory, deliver=deliveries)
        with capturedLogs() as events:
            reader.startService()
            self.clock.advance(0)
        self.assertEqual(deliveries.keys, [good.key])
        self.assertEqual(self.names(), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.directory, QUARANTINE))),
                         sorted([truncated_name, altered_name, garbage_name]))
        self.assertEqual(self.sample("dlq_files_quarantined_total"), 3)
        self.assertEqual(self.sample("dlq_files_current"), 0)
        self.assertEqual(self.sample("dlq_bytes_current"), 0)
        quarantined = {e["name"] for e in events if "quarantine" in e}
        self.assertEqual(quarantined, {truncated_name, altered_name, garbage_name})

    def test_claimedFilePassedOver(self) -> None:
        """
        A file claimed by someone else (C{estat-dlq replay}) is neither
        uploaded nor deleted; the files behind it are, and it is retried
        once the claim is released.
        """
        deliveries = self.start()
        claimed, other = make_object("claimed"), make_object("other")
        self.successResultOf(self.queue.put(claimed))
        self.clock.advance(1)
        self.successResultOf(self.queue.put(other))
        claimed_name = self.names()[0]
        claim = Claim.take(os.path.join(self.directory, claimed_name))
        self.assertIsNotNone(claim)
        try:
            self.clock.advance(INTERVAL)
            self.assertEqual(deliveries.keys, [other.key])
            self.assertEqual(self.names(), [claimed_name])
        finally:
            claim.release()
        self.advance(2 * INTERVAL)
        self.assertEqual(deliveries.keys, [other.key, claimed.key])
        self.assertEqual(self.names(), [])

    def test_stopRetryingCancelsAttempt(self) -> None:
        """
        C{stop_retrying} cancels an upload in flight (its file stays), and
        nothing is scheduled afterwards; C{put} still works.
        """
        cancelled = []
        deliveries = self.start(outcome=lambda obj: Deferred(lambda d: cancelled.append(obj.key)))
        obj = make_object("a")
        self.successResultOf(self.queue.put(obj))
        self.clock.advance(INTERVAL)
        self.assertEqual(deliveries.keys, [obj.key])
        self.assertIsNone(self.successResultOf(self.queue.stop_retrying()))
        self.assertEqual(cancelled, [obj.key])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.kept(), [obj])
        self.advance(600, step=10)
        self.assertEqual(deliveries.keys, [obj.key])
        self.assertIs(self.successResultOf(self.queue.put(make_object("b"))), True)
        self.assertEqual(len(self.names()), 2)

    def test_stopRetryingCancelsUploaderAttempt(self) -> None:
        """
        With C{deliver} the uploader's C{put_with_retries} wired as
        L{estat.tap} does, stopping cancels the attempt in flight cleanly
        and keeps the file.
        """
        self.clock = Clock()
        self.clock.advance(START)
        self.make_queue()
        store = MemoryObjectStore(failures=["hang"])
        uploader = Uploader(store=store, dead_letters=self.queue, metrics=self.metrics,
                            clock=self.clock, run_in_thread=run_synchronously)
        self.queue.deliver = lambda obj: Deferred.fromCoroutine(uploader.put_with_retries(obj, 0))
        self.queue.startService()
        obj = make_object("a")
        self.successResultOf(self.queue.put(obj))
        self.clock.advance(INTERVAL)
        self.assertEqual(len(store.puts), 1)
        self.assertIsNone(self.successResultOf(self.queue.stopService()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.kept(), [obj])
        self.assertEqual(store.objects, {})

    def test_stopServiceLeavesNoTimer(self) -> None:
        """
        After C{stopService} nothing is left on the clock, whether the loop
        was idle or backing off.
        """
        self.start()
        self.clock.advance(1)
        self.successResultOf(self.queue.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

        deliveries = self.start(outcome=False)
        self.successResultOf(self.queue.put(make_object("a")))
        self.advance(100)
        self.assertTrue(self.clock.getDelayedCalls())
        self.successResultOf(self.queue.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        calls = len(deliveries.calls)
        self.advance(300, step=10)
        self.assertEqual(len(deliveries.calls), calls)

    def test_deliverRaises(self) -> None:
        """
        An exception from C{deliver}, raised or as a failed Deferred, is
        logged and counted, and the loop runs again after the interval.
        """
        outcomes = iter([RuntimeError("boom"), fail(RuntimeError("bang")), True])

        def outcome(obj):
            result = next(outcomes)
            if isinstance(result, Exception):
                raise result
            return result

        deliveries = self.start(outcome=outcome)
        obj = make_object("a")
        self.successResultOf(self.queue.put(obj))
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sample("loop_errors_total", {"loop": "dlq"}), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.names()), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sample("loop_errors_total", {"loop": "dlq"}), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual(deliveries.times, [5, 10, 15])
        self.assertEqual(self.names(), [])
        self.assertEqual(self.sample("dlq_events_recovered_total"), obj.count)

    def test_unusableDirectory(self) -> None:
        """
        When the directory cannot be opened at start, the error is logged
        and counted, the loop keeps trying, and stopping leaves no timer.
        """
        directory = os.path.join(temp_dir(self), "dlq")
        with open(directory, "wb"):
            pass
        self.clock = Clock()
        self.clock.advance(START)
        self.make_queue(directory=directory, deliver=Deliveries(self.clock))
        self.queue.startService()
        self.assertEqual(self.sample("loop_errors_total", {"loop": "dlq"}), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sample("loop_errors_total", {"loop": "dlq"}), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        self.successResultOf(self.queue.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StoreIsBackTests(SynchronousTestCase):
    """
    After an outage the retry loop backs off; the first successful live
    upload ends the wait at once.
    """

    def test_live_success_ends_the_backoff(self):
        from prometheus_client import CollectorRegistry
        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        from estat.dlq import DiskDeadLetterQueue
        from estat.encoder import encode_object
        from estat.metrics import Metrics
        from estat.testing import run_synchronously

        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="estat-dlq-back-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        clock.advance(1_800_000_000)
        accept = [False]
        tried = []

        def deliver(obj):
            tried.append(obj.key)
            return succeed(accept[0])

        dlq = DiskDeadLetterQueue(directory=directory, metrics=Metrics(CollectorRegistry()),
                                  clock=clock, run_in_thread=run_synchronously,
                                  deliver=deliver, interval=5.0, max_backoff=60.0)
        for i in range(3):
            self.assertTrue(self.successResultOf(
                dlq.put(encode_object(f"raw/k{i}.jsonl.gz", [b'{"a":1}'], 6))))
            clock.advance(1)
        dlq.startService()
        self.addCleanup(dlq.stopService)
        # Outage: passes fail and the wait between them grows.
        for _ in range(6):
            clock.advance(60)
        self.assertGreater(dlq._delay, dlq.interval)
        attempts = len(tried)
        # A live upload succeeds: the loop runs now, without waiting.
        accept[0] = True
        dlq.store_is_back()
        clock.advance(0)
        self.assertGreater(len(tried), attempts)
        self.assertEqual(dlq.files, 0)
        self.assertEqual(dlq._delay, dlq.interval)

    def test_no_effect_when_not_backing_off(self):
        from prometheus_client import CollectorRegistry
        from twisted.internet.task import Clock

        from estat.dlq import DiskDeadLetterQueue
        from estat.metrics import Metrics
        from estat.testing import run_synchronously

        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="estat-dlq-back-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        dlq = DiskDeadLetterQueue(directory=directory, metrics=Metrics(CollectorRegistry()),
                                  clock=clock, run_in_thread=run_synchronously,
                                  deliver=lambda obj: None, interval=5.0)
        dlq.startService()
        self.addCleanup(dlq.stopService)
        before = [c.getTime() for c in clock.getDelayedCalls()]
        dlq.store_is_back()
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], before)


class ExpiryRaceTests(DiskQueueMixin, SynchronousTestCase):
    """
    A file past C{DLQ_MAX_AGE} that C{estat-dlq replay} holds (uploading it
    at this moment) is neither deleted nor counted as dropped.
    """

    def test_claimed_expired_file_is_left_alone(self) -> None:
        queue = self.make_queue(deliver=lambda obj: succeed(False), max_age=3600)
        queue.startService()
        self.successResultOf(queue.put(make_object("old", count=3)))
        [name] = self.names()
        claim = Claim.take(os.path.join(self.directory, name))
        self.addCleanup(claim.release)
        self.advance(3700, step=10)
        self.assertEqual(self.names(), [name])
        self.assertEqual(self.sample("dlq_events_dropped_total"), 0)
        self.assertEqual(self.sample("events_dropped_total", {"reason": "dlq_expired"}), 0)
        # The replay stores it and deletes it: nothing dropped, ever.
        claim.remove()
        claim.release()
        self.advance(30, step=10)
        self.assertEqual(self.sample("dlq_events_dropped_total"), 0)

    def test_unclaimed_expired_file_is_dropped(self) -> None:
        queue = self.make_queue(deliver=lambda obj: succeed(False), max_age=3600)
        queue.startService()
        self.successResultOf(queue.put(make_object("old", count=3)))
        self.advance(3700, step=10)
        self.assertEqual(self.names(), [])
        self.assertEqual(self.sample("events_dropped_total", {"reason": "dlq_expired"}), 3)


class SharedDirectoryTests(DiskQueueMixin, SynchronousTestCase):
    """
    C{shared=True}: several workers of C{WORKERS=N} on one directory.
    """

    def test_a_live_writers_temporary_file_is_kept(self) -> None:
        """
        At start, a temporary file of another live process (a worker
        writing right now) stays; one of a dead process goes.
        """
        queue = self.make_queue(shared=True)
        os.makedirs(self.directory)
        live = os.path.join(self.directory, f"{TEMP_PREFIX}{os.getppid()}-0a0b")
        dead = os.path.join(self.directory, f"{TEMP_PREFIX}999999999-0a0b")
        for path in (live, dead):
            with open(path, "wb") as f:
                f.write(b"x")
        queue.startService()
        self.assertTrue(os.path.exists(live))
        self.assertFalse(os.path.exists(dead))

    def test_counts_what_the_others_add_and_remove(self) -> None:
        """
        The files and bytes gauges follow the directory, which the other
        workers change, within one C{interval}.
        """
        self.clock = Clock()
        self.clock.advance(START)
        deliveries = Deliveries(self.clock, False)
        queue = self.make_queue(deliver=deliveries, shared=True)
        directory = self.directory
        queue.startService()
        self.clock.advance(0)
        other = self.make_queue(directory=directory)
        self.queue = queue
        for n in range(3):
            self.successResultOf(other.put(make_object(str(n))))
        self.assertEqual(self.sample_of(queue, "dlq_files_current"), 0)
        self.advance(2 * INTERVAL)
        self.assertEqual(self.sample_of(queue, "dlq_files_current"), 3)
        self.assertEqual(self.sample_of(queue, "dlq_bytes_current"), self.sizes())
        for name in self.names():
            os.unlink(os.path.join(directory, name))
        self.advance(2 * MAX_BACKOFF)
        self.assertEqual(self.sample_of(queue, "dlq_files_current"), 0)

    def test_not_shared_does_not_recount(self) -> None:
        """
        A single process counts its directory once, at start.
        """
        self.clock = Clock()
        self.clock.advance(START)
        queue = self.make_queue(deliver=Deliveries(self.clock, False))
        queue.startService()
        self.clock.advance(0)
        other = self.make_queue(directory=self.directory)
        self.queue = queue
        self.successResultOf(other.put(make_object("x")))
        self.advance(2 * INTERVAL)
        self.assertEqual(len(self.names()), 1)
        self.assertEqual(self.sample_of(queue, "dlq_files_current"), 0)

    def sample_of(self, queue, name: str) -> float:
        value = queue.metrics.registry.get_sample_value(name, {})
        return 0.0 if value is None else value
