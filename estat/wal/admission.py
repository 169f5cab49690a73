# -*- test-case-name: estat.test.test_wal_admission -*-
"""
The durable acknowledgement modes, as L{IAdmission} providers, one per
event stream (each stream has its own queue, batcher and keys):

 - L{WalAdmission}, C{ACK_MODE=disk}: admitted once the request's events
   are in the write-ahead log and fdatasync'd.  Its L{WalAdmission.sink}
   sits between the batcher and the uploader: it logs each sealed batch's
   sequence range and key (durably, before the upload), and tells the log
   when the batch has a fate, which lets the checkpoint move.
 - L{StoredAdmission}, C{ACK_MODE=stored}: admitted once every event of
   the request is in the object store or fsync'd in the dead-letter queue.
   Its L{StoredAdmission.sink} answers the requests a batch completes.

Both do bookkeeping only on the reactor thread; the disk work is the
writer thread's.
"""

from __future__ import annotations

import collections
from typing import Callable

import attr
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from zope.interface import implementer

from ..encoder import Batch
from ..ingest.core import IAdmission, Refusal
from ..keys import KeyMaker
from ..metrics import Metrics
from ..queue import EventQueue
from .log import Ledger, WriteAheadLog
from .recovery import Recovered

__all__ = ["WalAdmission", "StoredAdmission", "DEFAULT_STREAM"]

#: The stream of C{POST /collect}.
DEFAULT_STREAM = "collect"


def _refusals(retry_after: int) -> dict:
    return {
        "queue_full": Refusal(503, "queue_full", "event queue is full, retry later", retry_after),
        "wal_full": Refusal(503, "wal_full", "the write-ahead log is full, retry later",
                            retry_after),
        "wal_failed": Refusal(503, "wal_failed", "the write-ahead log cannot be written; "
                              "events are not accepted", retry_after),
        "wal_starting": Refusal(503, "wal_starting", "the write-ahead log is being "
                                "recovered, retry later", retry_after),
        "ack_waiters_full": Refusal(503, "ack_waiters_full", "too many requests are waiting "
                                    "for their events to be stored, retry later", retry_after),
        "not_stored": Refusal(503, "not_stored", "the events could not be stored, retry later",
                              retry_after),
    }


@implementer(IAdmission)
@attr.s(eq=False)
class WalAdmission:
    """
    C{ACK_MODE=disk} for one stream.

    @ivar upload: C{Batch -> Deferred[bool]}, the uploader's C{upload}.
    @ivar replay_concurrency: replayed batches uploading at once.
    """

    log = Logger()

    wal: WriteAheadLog = attr.ib()
    queue: EventQueue = attr.ib()
    upload: Callable[[Batch], Deferred] = attr.ib()
    key_maker: KeyMaker = attr.ib()
    metrics: Metrics = attr.ib()
    stream: str = attr.ib(default=DEFAULT_STREAM)
    retry_after: int = attr.ib(default=1)
    replay_concurrency: int = attr.ib(default=4)

    #: C{(last seq, events, done)} of the requests waiting for their group
    #: commit, in log order.
    _waiters: collections.deque = attr.ib(factory=collections.deque, init=False)
    _reserved: int = attr.ib(default=0, init=False)
    _refusal: dict = attr.ib(init=False)
    _replayed: dict = attr.ib(factory=dict, init=False)

    @_refusal.default
    def _make_refusals(self) -> dict:
        return _refusals(self.retry_after)

    def __attrs_post_init__(self) -> None:
        self.metrics.ack_waiting_sources.append(lambda: self.waiting)
        self.wal.on_durable(self._durable)

    @property
    def waiting(self) -> int:
        """
        Requests waiting for their group commit.
        """
        return len(self._waiters)

    def refusal_for(self, count: int) -> Refusal | None:
        """
        The refusal L{admit} would give C{count} events for want of room on
        the queue now, or C{None} (the log may still refuse them).
        """
        queue = self.queue
        if queue.closed or not queue.room_for(count + self._reserved):
            return self._refusal["queue_full"]
        return None

    def admit(self, events: list, done: Callable) -> None:
        count = len(events)
        queue = self.queue
        # Room on the queue is kept for what is being logged: an event made
        # durable must never find the queue full.
        if queue.closed or not queue.room_for(count + self._reserved):
            done(self._refusal["queue_full"])
            return
        last = self.wal.append_events(self.stream, events)
        if last.__class__ is str:
            done(self._refusal[last])
            return
        self._reserved += count
        self._waiters.append((last, events, done))

    def _durable(self, max_seq: int, error) -> None:
        """
        After a group commit (L{WriteAheadLog.on_durable}): the requests
        whose events it held go on the queue in one offer, then are
        answered, in log order.
        """
        waiters = self._waiters
        if not waiters or waiters[0][0] > max_seq:
            return
        events: list = []
        answers = []
        while waiters and waiters[0][0] <= max_seq:
            _, logged, done = waiters.popleft()
            events += logged
            answers.append(done)
        self._reserved -= len(events)
        if error is not None:
            refusal = self._refusal["wal_failed"]
            for done in answers:
                done(refusal)
            return
        if not self.queue.offer(events):
            # Only when the queue closed for shutdown meanwhile: the events
            # are durable in the log, and the next start uploads them.
            self.log.warn("{count} events logged during shutdown are left in the "
                          "write-ahead log for the next start", count=len(events))
        for done in answers:
            done(None)

    # --- between the batcher and the uploader ---

    def sink(self, batch: Batch) -> Deferred:
        """
        The batcher's sink: give the batch its key from its sequence range,
        log the seal durably, then upload; tell the log when it has a fate.
        """
        stream = self.stream
        first, last = self.wal.seal(stream, batch.count)
        key = self.key_maker.batch_key(batch.first_event_at, batch.sealed_at,
                                       unique=self.wal.unique(stream, first, last),
                                       partition=batch.partition or "")
        batch = attr.evolve(batch, key=key, poison_key=self.key_maker.poison_key(key))
        d = self.wal.log_seal(stream, first, last, batch.count, batch.sealed_at, key,
                              batch.poison_key)
        d.addCallback(self._sealed, batch)
        d.addBoth(self._fated, first)
        return d

    def _sealed(self, error, batch: Batch) -> Deferred:
        if error is not None:
            # Upload anyway: the events are acknowledged.  Only a replay after
            # a crash could now give them a second key.
            self.log.error("could not log the seal of batch {key} ({error}); uploading it "
                           "anyway", key=batch.key, error=str(error))
        return self.upload(batch)

    def _fated(self, result, first: int):
        self.wal.batch_done(self.stream, first)
        return result

    # --- replay at start-up ---

    def replay(self, recovered: Recovered, batcher) -> str:
        """
        Hand what the log holds for this stream to C{batcher}, before any
        new event.  Returns the stream's name (it is claimed).
        """
        sealed = []
        for b in recovered.sealed.get(self.stream, ()):
            s = b.seal
            batch = Batch(key=s.key, poison_key=s.poison_key, events=b.events,
                          first_event_at=b.events[0][0], sealed_at=s.sealed_at)
            self._replayed[s.key] = s.first
            sealed.append(batch)
        events = [e for _, run in recovered.unsealed.get(self.stream, ()) for e in run]
        count = sum(b.count for b in sealed) + len(events)
        if count:
            self.metrics.wal_events_replayed.inc(count)
            self.log.info("replaying {count} events of stream {stream} from the write-ahead "
                          "log ({batches} batches under their keys, {unsealed} events to "
                          "batch)", count=count, stream=self.stream, batches=len(sealed),
                          unsealed=len(events))
        semaphore = DeferredSemaphore(max(1, self.replay_concurrency))

        def replay_sink(batch: Batch) -> Deferred:
            d = semaphore.run(self.upload, batch)
            d.addBoth(self._fated, self._replayed.pop(batch.key))
            return d

        batcher.replay(sealed, events, replay_sink)
        return self.stream


@implementer(IAdmission)
@attr.s(eq=False)
class StoredAdmission:
    """
    C{ACK_MODE=stored} for one stream.

    @ivar upload: C{Batch -> Deferred[bool]}, the uploader's C{upload}:
        C{True} when every event is stored or durably dead-lettered.
    @ivar max_waiting: requests that may wait at once; beyond, 503.
    """

    queue: EventQueue = attr.ib()
    upload: Callable[[Batch], Deferred] = attr.ib()
    metrics: Metrics = attr.ib()
    max_waiting: int = attr.ib(default=10000)
    retry_after: int = attr.ib(default=1)

    waiting: int = attr.ib(default=0, init=False)
    _ledger: Ledger = attr.ib(factory=Ledger, init=False)
    _refusal: dict = attr.ib(init=False)

    @_refusal.default
    def _make_refusals(self) -> dict:
        return _refusals(self.retry_after)

    def __attrs_post_init__(self) -> None:
        self.metrics.ack_waiting_sources.append(lambda: self.waiting)

    def refusal_for(self, count: int) -> Refusal | None:
        """
        The refusal L{admit} would give C{count} events now, or C{None}.
        """
        if self.waiting >= self.max_waiting:
            return self._refusal["ack_waiters_full"]
        queue = self.queue
        if queue.closed or not queue.room_for(count):
            return self._refusal["queue_full"]
        return None

    def admit(self, events: list, done: Callable) -> None:
        if self.waiting >= self.max_waiting:
            done(self._refusal["ack_waiters_full"])
            return
        # [done, events still without a fate, all kept so far]; in the
        # ledger first: the offer may seal a batch at once.
        self._ledger.append([done, len(events), True], len(events))
        if not self.queue.offer(events):
            self._ledger.entries.pop()
            done(self._refusal["queue_full"])
            return
        self.waiting += 1

    def sink(self, batch: Batch) -> Deferred:
        """
        The batcher's sink: upload, then answer every request whose last
        events this batch held.
        """
        parts = self._ledger.take(batch.count)
        d = self.upload(batch)
        d.addBoth(self._uploaded, parts)
        return d

    def _uploaded(self, kept, parts: list):
        for waiter, _, count in parts:
            waiter[1] -= count
            if kept is not True:
                waiter[2] = False
            if waiter[1] == 0:
                self.waiting -= 1
                waiter[0](None if waiter[2] else self._refusal["not_stored"])
        return kept
