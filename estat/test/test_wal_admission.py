"""
Tests for the acknowledgement modes: L{WalAdmission} (ACK_MODE=disk) and
L{StoredAdmission} (ACK_MODE=stored), each with the real batcher and
uploader over in-memory fakes, on a L{Clock}.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from estat.batcher import Batcher
from estat.ingest.core import IAdmission, Refusal
from estat.interfaces import StoreError
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.test.harness import temp_dir
from estat.testing import (
    DeferredThreadRunner, ManualCommitter, MemoryDeadLetterQueue, MemoryObjectStore, read_lines,
    run_synchronously,
)
from estat.uploader import Uploader
from estat.wal.admission import StoredAdmission, WalAdmission
from estat.wal.files import list_segments, read_checkpoint
from estat.wal.log import WriteAheadLog

START = 1_764_000_000.0


def events(n: int, tag: str = "e") -> list:
    return [(START, b'{"id":"%s-%d"}' % (tag.encode(), i)) for i in range(n)]


class PipelineMixin:
    batch_size = 4

    def pipeline(self, failures=(), dlq_accepts=True, channel=100):
        self.clock = Clock()
        self.clock.advance(START)
        self.metrics = Metrics(CollectorRegistry())
        self.store = MemoryObjectStore(failures=list(failures))
        self.dead_letters = MemoryDeadLetterQueue(accept=dlq_accepts)
        self.uploader = Uploader(store=self.store, dead_letters=self.dead_letters,
                                 metrics=self.metrics, clock=self.clock,
                                 run_in_thread=run_synchronously, retries=0)
        self.queue = EventQueue(channel)
        self.keys = KeyMaker("raw", "raw_dlq", "host", entropy=lambda n: b"\x00" * n)
        self.batcher = Batcher(queue=self.queue, sink=None, key_maker=self.keys,
                               metrics=self.metrics, clock=self.clock,
                               batch_size=self.batch_size, flush_interval=10.0, max_pending=4)

    def answers(self):
        answers = []
        return answers, answers.append

    def sample(self, name, labels=None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def stored_ids(self) -> list:
        return sorted(line for key in self.store.objects for line in read_lines(self.store.objects[key]))


class StoredAdmissionTests(PipelineMixin, SynchronousTestCase):
    def make(self, **kwargs):
        self.pipeline(**{k: kwargs.pop(k) for k in ("failures", "dlq_accepts") if k in kwargs})
        self.admission = StoredAdmission(queue=self.queue, upload=self.uploader.upload,
                                         metrics=self.metrics, **kwargs)
        self.batcher.sink = self.admission.sink
        self.batcher.startService()
        self.addCleanup(lambda: self.batcher.running and self.batcher.stopService())
        verifyObject(IAdmission, self.admission)

    def test_answered_once_stored(self) -> None:
        self.make()
        answers, done = self.answers()
        self.admission.admit(events(2), done)
        self.assertEqual(answers, [])
        self.assertEqual(self.sample("ack_requests_waiting"), 1)
        self.clock.advance(10)
        self.assertEqual(answers, [None])
        self.assertEqual(len(self.stored_ids()), 2)
        self.assertEqual(self.sample("ack_requests_waiting"), 0)

    def test_split_across_two_batches(self) -> None:
        """
        A request whose events fall in two batches is answered once both
        are stored, not when the first is.
        """
        self.make()
        answers, done = self.answers()
        first = []
        self.admission.admit(events(3, "a"), first.append)
        self.admission.admit(events(3, "b"), done)   # 1 in batch 1, 2 in batch 2
        self.assertEqual(first, [None])               # batch 1 (size 4) sealed and stored
        self.assertEqual(answers, [])
        self.clock.advance(10)                        # batch 2 sealed by age
        self.assertEqual(answers, [None])
        self.assertEqual(len(self.stored_ids()), 6)

    def test_dead_lettered_batch_is_acknowledged(self) -> None:
        self.make(failures=[StoreError("AccessDenied", retryable=False)])
        answers, done = self.answers()
        self.admission.admit(events(4), done)
        self.assertEqual(answers, [None])
        self.assertEqual(len(self.dead_letters.kept), 1)

    def test_dropped_batch_is_refused(self) -> None:
        """
        Events the dead-letter queue could not keep were not stored: the
        client gets a 503 to retry, not a 202.
        """
        self.make(failures=[StoreError("AccessDenied", retryable=False)], dlq_accepts=False)
        answers, done = self.answers()
        self.admission.admit(events(4), done)
        [refusal] = answers
        self.assertIsInstance(refusal, Refusal)
        self.assertEqual((refusal.status, refusal.reason), (503, "not_stored"))

    def test_waiting_is_bounded(self) -> None:
        self.make(max_waiting=2)
        answers, done = self.answers()
        self.admission.admit(events(1), done)
        self.admission.admit(events(1), done)
        self.admission.admit(events(1), done)
        [refusal] = answers
        self.assertEqual((refusal.status, refusal.reason, refusal.retry_after),
                         (503, "ack_waiters_full", 1))

    def test_shutdown_answers_waiting_requests(self) -> None:
        """
        Draining the batcher (what the listener's settle does on shutdown)
        answers every waiting request, even with a store that hangs until
        the uploader is hurried into the dead-letter queue.
        """
        self.make(failures=["hang"])
        answers, done = self.answers()
        self.admission.admit(events(1), done)
        self.admission.admit(events(1), done)
        drained = self.batcher.drain()
        self.assertNoResult(drained)
        self.assertEqual(answers, [])
        self.uploader.hurry()
        self.successResultOf(drained)
        self.assertEqual(answers, [None, None])
        self.assertEqual(len(self.dead_letters.kept), 1)


class WalAdmissionTests(PipelineMixin, SynchronousTestCase):
    def make(self, directory=None, **kwargs):
        self.pipeline(**kwargs)
        self.directory = directory or getattr(self, "directory", None) or temp_dir(self)
        self.committers = []

        def factory(*args, **kw):
            c = ManualCommitter(*args, **kw)
            self.committers.append(c)
            return c

        self.wal = WriteAheadLog(directory=self.directory, metrics=self.metrics, clock=self.clock,
                                 call_from_thread=lambda f, *a: f(*a),
                                 run_in_thread=run_synchronously, committer_factory=factory,
                                 new_id=lambda: "wal-id")
        self.admission = WalAdmission(wal=self.wal, queue=self.queue, upload=self.uploader.upload,
                                      key_maker=self.keys, metrics=self.metrics)
        verifyObject(IAdmission, self.admission)
        self.batcher.sink = self.admission.sink
        with capturedLogs():
            self.wal.startService()
            self.admission.replay(self.wal.recovered, self.batcher)
        self.batcher.startService()

    def crash(self) -> None:
        """
        SIGKILL: nothing is stopped; the lock goes with the process.
        """
        os.close(self.wal._lock_fd)
        self.wal._lock_fd = None
        self.wal._loop.stop()
        self.batcher._loop.stop()
        self.batcher._stopping = True

    def commit(self) -> None:
        self.committers[-1].flush()

    def test_acknowledged_after_the_commit(self) -> None:
        self.make()
        answers, done = self.answers()
        self.admission.admit(events(2), done)
        self.admission.admit(events(1), done)
        self.assertEqual(answers, [])
        self.assertEqual(len(self.queue), 0)
        self.commit()
        self.assertEqual(answers, [None, None])
        self.assertEqual(self.batcher.open_count, 3)

    def test_queue_room_reserved(self) -> None:
        """
        Events being logged hold their room on the queue: a durable event
        never finds it full.
        """
        self.make(channel=3)
        self.batcher.stopService()
        answers, done = self.answers()
        self.admission.admit(events(2), done)
        self.admission.admit(events(2), done)
        self.assertEqual(answers[0].reason, "queue_full")

    def test_full_log(self) -> None:
        self.make()
        self.wal.max_bytes = 10
        answers, done = self.answers()
        self.admission.admit(events(1), done)
        [refusal] = answers
        self.assertEqual((refusal.status, refusal.reason, refusal.retry_after),
                         (503, "wal_full", 1))

    def test_seal_logged_before_upload(self) -> None:
        """
        A sealed batch is uploaded only once its seal record is durable,
        under the key the log derives from its sequence range.
        """
        self.make()
        self.admission.admit(events(4), lambda r: None)
        self.commit()                     # the events: the batcher seals
        self.assertEqual(self.store.puts, [])
        self.commit()                     # the seal: now the upload
        [(key, _)] = self.store.puts
        self.assertTrue(key.endswith(self.wal.unique("collect", 0, 3) + ".jsonl.gz"), key)

    def test_crash_replay_overwrites(self) -> None:
        """
        After a crash, a batch that was sealed (and maybe stored) is
        uploaded again under the same key with the same bytes; events never
        sealed are batched afresh; the log is then checkpointed away.
        """
        self.make()
        self.admission.admit(events(4, "a"), lambda r: None)
        self.admission.admit(events(2, "b"), lambda r: None)
        self.commit()
        self.commit()
        stored = dict(self.store.objects)
        self.assertEqual(len(stored), 1)
        self.crash()
        directory = self.directory
        self.make(directory=directory)
        self.assertEqual(self.sample("wal_events_replayed_total"), 6)
        # The replayed sealed batch went straight to the store.
        for key, body in stored.items():
            self.assertEqual(self.store.objects[key], body)
        self.clock.advance(10)            # the 2 unsealed events: by age
        self.commit()
        self.assertEqual(len(self.stored_ids()), 6)
        self.clock.advance(1)
        self.assertEqual(read_checkpoint(directory)["low_water"], 6)
        self.assertEqual(len(list_segments(directory)), 1)

    def test_fsync_failure(self) -> None:
        self.make()

        def broken(fd):
            raise OSError(5, "EIO")

        self.committers[-1].writer._sync = broken
        answers, done = self.answers()
        self.admission.admit(events(1), done)
        with capturedLogs():
            self.commit()
        self.assertEqual(answers[0].reason, "wal_failed")
        self.admission.admit(events(1), done)
        self.assertEqual(answers[1].reason, "wal_failed")
        self.assertEqual(len(self.queue) + self.batcher.open_count, 0)


    def test_a_group_goes_on_the_queue_in_one_offer(self) -> None:
        """
        The requests of one group commit go on the queue in one offer, in
        log order, and only then are answered, in the same order.
        """
        self.make()
        offers = []
        offer = self.queue.offer

        def counting_offer(evs):
            offers.append((list(evs), list(answers)))
            return offer(evs)

        self.queue.offer = counting_offer
        answers = []
        for i in range(3):
            self.admission.admit(events(i + 1, f"r{i}"), lambda r, i=i: answers.append((i, r)))
        self.assertEqual(self.admission.waiting, 3)
        self.commit()
        self.assertEqual(offers, [(events(1, "r0") + events(2, "r1") + events(3, "r2"), [])])
        self.assertEqual(answers, [(0, None), (1, None), (2, None)])
        self.assertEqual((self.admission.waiting, self.admission._reserved), (0, 0))

    def test_only_the_requests_a_group_holds_are_answered(self) -> None:
        """
        A group that holds only a seal (its sequence numbers below the
        waiting requests') answers none of them; the next group does.
        """
        self.make()
        answers, done = self.answers()
        self.admission.admit(events(2), done)
        self.commit()
        self.admission.admit(events(1), done)
        committer = self.committers[-1]
        queued, committer.queued = committer.queued, []
        d = self.wal.log_seal("collect", 0, 1, 2, START, "k", "p")
        committer.flush()                 # the seal alone
        self.assertEqual((self.successResultOf(d), answers), (None, [None]))
        self.assertEqual(self.admission.waiting, 1)
        committer.queued = queued
        committer.flush()
        self.assertEqual(answers, [None, None])
        self.assertEqual(self.admission.waiting, 0)

    def test_a_failed_group_refuses_all_its_requests(self) -> None:
        """
        A write error refuses every request of the group (none is queued
        or acknowledged), frees their room on the queue, and every later
        request is refused as well.
        """
        self.make()

        def broken(fd):
            raise OSError(5, "EIO")

        self.committers[-1].writer._sync = broken
        answers, done = self.answers()
        for _ in range(3):
            self.admission.admit(events(2), done)
        with capturedLogs():
            self.commit()
        self.assertEqual([a.reason for a in answers], ["wal_failed"] * 3)
        self.assertEqual((self.admission.waiting, self.admission._reserved), (0, 0))
        self.assertEqual(len(self.queue) + self.batcher.open_count, 0)
        self.admission.admit(events(1), done)
        self.assertEqual(answers[3].reason, "wal_failed")

    def test_stop_with_a_group_in_flight(self) -> None:
        """
        Stopping the log while requests wait for their group: the writer
        commits what is queued before it stops, so each is answered; once
        the queue is closed their events stay durable in the log only, and
        they are still acknowledged (the next start replays them).
        """
        self.make()
        answers, done = self.answers()
        self.admission.admit(events(2), done)
        self.admission.admit(events(1), done)
        self.queue.close()
        with capturedLogs() as logged:
            self.wal.stopService()
        self.assertEqual(answers, [None, None])
        self.assertEqual(self.admission.waiting, 0)
        self.assertTrue(any("left in the write-ahead log" in str(e.get("log_format"))
                            for e in logged))

    def test_events_of_a_stream_no_longer_served_are_let_go(self) -> None:
        """
        Events of a stream nobody replays (switched off since the crash)
        are counted as dropped and stop holding the log's low-water mark.
        """
        self.make()
        other = WalAdmission(wal=self.wal, queue=EventQueue(10), upload=self.uploader.upload,
                             key_maker=self.keys, metrics=self.metrics, stream="segment")
        other.admit(events(3, "s"), lambda r: None)
        self.commit()
        self.crash()
        self.make(directory=self.directory)
        self.assertEqual(self.wal.low_water(), 0)
        with capturedLogs() as logged:
            self.assertEqual(self.wal.release_unclaimed({"collect"}), 3)
        self.assertEqual(self.wal.low_water(), 3)
        self.assertEqual(self.sample("events_dropped_total", {"reason": "wal_stream_unknown"}), 3)
        self.assertTrue(any(e.get("stream") == "segment" for e in logged))


class _Reactor:
    """
    Just enough reactor for L{estat.tap.build_service} to wire (nothing is
    started): a clock, a thread pool that is never started, callFromThread.
    """

    def __init__(self) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.threadpool import ThreadPool

        self._memory = MemoryReactorClock()
        self._pool = ThreadPool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._memory, name)


class WiringTests(SynchronousTestCase):
    """
    L{estat.tap.build_service} wires each ACK_MODE; memory adds nothing.
    """

    def build(self, **overrides):
        from estat.config import Config
        from estat.tap import build_service

        base = temp_dir(self)
        config = Config.defaults(http_addr="tcp:0:interface=127.0.0.1",
                                 wal_dir=os.path.join(base, "wal"),
                                 dlq_dir=os.path.join(base, "dlq"),
                                 local_store_dir=os.path.join(base, "store"), **overrides)
        return build_service(config, _Reactor(), environ={"HOSTNAME": "h"})

    def test_memory(self) -> None:
        from estat.ingest.admission import WaitingQueueAdmission

        service = self.build(queue_max_wait=0.5, queue_max_waiting_events=321)
        admission = service.core.admission
        self.assertIsInstance(admission, WaitingQueueAdmission)
        self.assertIs(admission.queue, service.queue)
        self.assertEqual((admission.max_wait, admission.max_waiting_events), (0.5, 321))
        self.assertEqual(service.queue.on_room, admission._room)
        self.assertIsNone(service.wal)
        self.assertIsNone(service.http.settle)
        self.assertEqual(service.batcher.sink, service.uploader.upload)

    def test_disk(self) -> None:
        service = self.build(ack_mode="disk", wal_max_size_bytes=12345,
                             wal_segment_size_bytes=999)
        admission = service.core.admission
        self.assertIsInstance(admission, WalAdmission)
        self.assertIsNone(service.queue.on_room)
        self.assertIs(service.wal, admission.wal)
        self.assertEqual((service.wal.max_bytes, service.wal.segment_size), (12345, 999))
        self.assertEqual(service.batcher.sink, admission.sink)
        # /collect's stream and the Segment routes' own, in the same log.
        self.assertEqual(len(service.replays), 2)
        segment = service.segment.admission
        self.assertIsInstance(segment, WalAdmission)
        self.assertIs(segment.wal, service.wal)
        self.assertEqual(segment.stream, "segment")
        # The log starts after the dead-letter queue and before the batcher.
        self.assertEqual(list(service)[:3], [service.dead_letters, service.wal, service.batcher])

    def test_stored(self) -> None:
        service = self.build(ack_mode="stored", ack_max_waiting=7)
        admission = service.core.admission
        self.assertIsInstance(admission, StoredAdmission)
        self.assertEqual(admission.max_waiting, 7)
        self.assertEqual(service.batcher.sink, admission.sink)
        self.assertIsInstance(service.segment.admission, StoredAdmission)
        # The listener's settle drains both streams before the grace period.
        [(_, segment_batcher)] = service.streams
        self.assertEqual(segment_batcher.sink, service.segment.admission.sink)
        self.successResultOf(service.http.settle())
        self.assertTrue(service.batcher.queue.closed)
        self.assertTrue(segment_batcher.queue.closed)


class _Port:
    def stopListening(self):
        return succeed(None)


class _Site:
    def __init__(self) -> None:
        self.channels = {"one"}
        self.aborted = 0
        self.closed = Deferred()

    def close_connections(self):
        return self.closed

    def abort_connections(self) -> None:
        self.aborted += 1


class SettleTests(SynchronousTestCase):
    def test_grace_starts_after_settle(self) -> None:
        """
        With a settle (ACK_MODE=stored), the listener stops listening, then
        waits for it (requests waiting for the store get their answers)
        before the grace period that ends with aborting connections.
        """
        from estat.http.site import HTTPListenerService

        clock = Clock()
        settled = Deferred()
        site = _Site()
        listener = HTTPListenerService(endpoint=None, site=site, clock=clock, grace=5.0,
                                       settle=lambda: settled)
        listener.port = _Port()
        listener.running = True
        with capturedLogs():
            d = listener.stopService()
            clock.advance(30)
            self.assertEqual(site.aborted, 0)
            settled.callback(None)
            clock.advance(5)
        self.assertEqual(site.aborted, 1)
        site.closed.callback(None)
        self.successResultOf(d)


class ServiceWithWalTests(PipelineMixin, SynchronousTestCase):
    def wal_on(self, directory: str):
        """
        C{(wal, runner, committers)}: a log in C{directory}/wal whose
        recovery runs when C{runner} says and whose commits are manual.
        """
        runner = DeferredThreadRunner()
        committers = []

        def factory(*args, **kw):
            committers.append(ManualCommitter(*args, **kw))
            return committers[-1]

        wal = WriteAheadLog(directory=os.path.join(directory, "wal"), metrics=self.metrics,
                            clock=self.clock, call_from_thread=lambda f, *a: f(*a),
                            run_in_thread=runner, committer_factory=factory)
        return wal, runner, committers

    def test_ready_after_replay_and_the_log_stops_last(self) -> None:
        """
        /readyz turns 200 only once the log is recovered and its events are
        handed to the batcher; on stop, the log closes after everything else,
        with a final checkpoint.
        """
        from estat.dlq import DiskDeadLetterQueue
        from estat.service import Readiness
        from estat.service import EstatService
        from estat.test.test_service import StubListener

        self.pipeline()
        directory = temp_dir(self)
        wal, runner, committers = self.wal_on(directory)
        admission = WalAdmission(wal=wal, queue=self.queue, upload=self.uploader.upload,
                                 key_maker=self.keys, metrics=self.metrics)
        self.batcher.sink = admission.sink
        dlq = DiskDeadLetterQueue(directory=os.path.join(directory, "dlq"), metrics=self.metrics,
                                  clock=self.clock, run_in_thread=run_synchronously)
        readiness = Readiness(ready=False)
        order = []
        http = StubListener(lambda: order.append("http"))
        service = EstatService(http=http, batcher=self.batcher, uploader=self.uploader,
                               dead_letters=dlq, queue=self.queue, store=self.store,
                               readiness=readiness, metrics=self.metrics, clock=self.clock,
                               wal=wal, replays=[lambda r: order.append("replay") or "collect"])
        with capturedLogs():
            service.startService()
            self.assertFalse(readiness.ready)
            answers = []
            admission.admit(events(1), answers.append)
            self.assertEqual(answers[0].reason, "wal_starting")
            runner.run_all()
        self.assertTrue(readiness.ready)
        self.assertEqual(order, ["replay"])
        admission.admit(events(3), answers.append)
        committers[0].flush()
        self.assertEqual(answers[1:], [None])
        with capturedLogs():
            d = service.stopService()
            for _ in range(5):
                committers[0].flush()
                runner.run_all()
        self.successResultOf(d)
        self.assertEqual(order, ["replay", "http"])
        self.assertTrue(committers[0].stopped)
        self.assertEqual(read_checkpoint(wal.directory)["low_water"], 3)
        self.assertEqual(len(self.stored_ids()), 3)



    def test_a_stop_while_the_log_opens_replays_it_first(self) -> None:
        """
        SIGTERM while the log is still being recovered (a worker stopped
        just after it was restarted): the replay runs before the drain, so
        what the log holds is stored by this stop, not left for a next start.
        """
        from estat.dlq import DiskDeadLetterQueue
        from estat.service import EstatService, Readiness
        from estat.test.test_service import StubListener

        self.pipeline()
        directory = temp_dir(self)
        wal, runner, committers = self.wal_on(directory)
        dlq = DiskDeadLetterQueue(directory=os.path.join(directory, "dlq"), metrics=self.metrics,
                                  clock=self.clock, run_in_thread=run_synchronously)
        order = []
        http = StubListener(lambda: order.append("http"))
        service = EstatService(http=http, batcher=self.batcher, uploader=self.uploader,
                               dead_letters=dlq, queue=self.queue, store=self.store,
                               readiness=Readiness(ready=False), metrics=self.metrics,
                               clock=self.clock, wal=wal,
                               replays=[lambda r: order.append("replay") or "collect"])
        with capturedLogs():
            service.startService()
            d = service.stopService()
            self.assertEqual(order, [])
            for _ in range(5):
                runner.run_all()
                for committer in committers:
                    committer.flush()
        self.successResultOf(d)
        self.assertEqual(order, ["replay", "http"])
