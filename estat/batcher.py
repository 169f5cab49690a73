# -*- test-case-name: estat.test.test_batcher -*-
"""
The batcher: takes events off the L{EventQueue} and seals them into
batches of C{BATCH_SIZE} events, or sooner when a batch's first event is
C{FLUSH_INTERVAL} old.  An idle server seals nothing.

Memory stays bounded: at most C{MAX_PENDING_BATCHES} sealed batches may be
on their way to the store; while that many are, the batcher takes no more
events, the queue fills, and the API answers 503.

On stop it seals what it holds and what is still queued, and waits for
every batch to be stored or dead-lettered.

With a C{partitioner} (C{PARTITION_BY}, C{ACK_MODE=memory}) each
partition's events batch apart, by the same rules; C{BATCH_SIZE} then
bounds the unsealed events of all partitions together (when they reach it
the largest partition is sealed), so memory keeps the same bound, and at
most C{max_partitions} partitions hold unsealed events at once: an event
of one more goes to the C{__other__} partition, and is counted.
"""

from __future__ import annotations

from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .encoder import Batch
from .keys import KeyMaker
from .metrics import Metrics
from .pipeline.partitions import Partitioner
from .queue import EventQueue

__all__ = ["Batcher"]


@attr.s(eq=False)
class Batcher(Service):
    """
    @ivar sink: C{Batch -> Deferred}, firing when the batch has a fate (the
        uploader's C{upload}); it should never fail.
    @ivar tick: how often the age of the open batch is checked, seconds.
    """

    log = Logger()

    queue: EventQueue = attr.ib()
    sink: Callable[[Batch], Deferred] = attr.ib()
    key_maker: KeyMaker = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    batch_size: int = attr.ib(default=5000)
    flush_interval: float = attr.ib(default=120.0)
    max_pending: int = attr.ib(default=2)
    tick: float = attr.ib(default=1.0)
    partitioner: Partitioner | None = attr.ib(default=None)
    #: The stream's name, for the partition overflow metric.
    stream: str = attr.ib(default="collect")

    _events: list | None = attr.ib(default=None, init=False)
    _inflight: dict = attr.ib(factory=dict, init=False)
    _slot_waiters: list = attr.ib(factory=list, init=False)
    _idle_waiters: list = attr.ib(factory=list, init=False)
    _getting: Deferred | None = attr.ib(default=None, init=False)
    _loop: LoopingCall | None = attr.ib(default=None, init=False)
    _consuming: Deferred | None = attr.ib(default=None, init=False)
    _stopping: bool = attr.ib(default=False, init=False)
    #: With a partitioner: partition path -> its unsealed events.
    _parts: dict = attr.ib(factory=dict, init=False)
    _part_total: int = attr.ib(default=0, init=False)

    # --- service ---

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = LoopingCall(self._check_age)
        self._loop.clock = self.clock
        # A quarter of FLUSH_INTERVAL at most, so a batch is sealed at most
        # 1.25 x FLUSH_INTERVAL after its first event (ACK_MODE=stored
        # answers then), not up to twice it.
        self._loop.start(min(self.tick, self.flush_interval / 4), now=False)
        self._consuming = Deferred.fromCoroutine(self._consume())
        self._consuming.addErrback(self._consume_died)

    def stopService(self) -> Deferred:
        super().stopService()
        return self.drain()

    def _consume_died(self, failure) -> None:
        self.metrics.loop_errors.labels("batcher").inc()
        self.log.failure("the batcher's consume loop died", failure)

    # --- the state of the open batch ---

    @property
    def open_count(self) -> int:
        if self.partitioner is not None:
            return self._part_total
        return len(self._events) if self._events else 0

    @property
    def open_partitions(self) -> int:
        return len(self._parts)

    @property
    def pending_batches(self) -> int:
        return len(self._inflight)

    @property
    def pending_events(self) -> int:
        """
        Events in sealed batches not yet stored or dead-lettered.
        """
        return sum(self._inflight.values())

    def _has_slot(self) -> bool:
        return len(self._inflight) < self.max_pending

    def _wait_for_slot(self) -> Deferred:
        if self._has_slot():
            d = Deferred()
            d.callback(None)
            return d
        d = Deferred(lambda d: self._slot_waiters.remove(d))
        self._slot_waiters.append(d)
        return d

    def _add(self, events: list) -> None:
        if self.partitioner is not None:
            self._add_partitioned(events)
        elif self._events is None:
            self._events = events
        else:
            self._events.extend(events)

    def _add_partitioned(self, events: list) -> None:
        parts = self._parts
        path_of = self.partitioner.path_of
        limit = self.partitioner.max_partitions
        overflow = 0
        for event in events:
            path = path_of(event[1])
            group = parts.get(path)
            if group is None:
                if len(parts) >= limit:
                    path = self.partitioner.other
                    group = parts.get(path)
                    overflow += 1
                if group is None:
                    group = parts[path] = []
            group.append(event)
        self._part_total += len(events)
        if overflow:
            self.metrics.partition_overflow_events.labels(self.stream).inc(overflow)

    def _seal(self, trigger: str) -> None:
        """
        Seal the open batch; with partitions, the largest partition's.
        """
        if self.partitioner is not None:
            if self._parts:
                self._seal_partition(max(self._parts, key=lambda p: len(self._parts[p])),
                                     trigger)
            return
        events, self._events = self._events, None
        if not events:
            return
        self._make_batch(events, None, trigger)

    def _seal_partition(self, path: str, trigger: str) -> None:
        events = self._parts.pop(path)
        self._part_total -= len(events)
        self._make_batch(events, path, trigger)

    def _make_batch(self, events: list, partition: str | None, trigger: str) -> None:
        sealed_at = self.clock.seconds()
        first_at = events[0][0]
        key = self.key_maker.batch_key(first_at, sealed_at, partition=partition or "")
        batch = Batch(
            key=key,
            poison_key=self.key_maker.poison_key(key),
            events=events,
            first_event_at=first_at,
            sealed_at=sealed_at,
            partition=partition,
        )
        self.metrics.batches_sealed.labels(trigger).inc()
        self._dispatch(batch, self.sink)

    def _dispatch(self, batch: Batch, sink: Callable[[Batch], Deferred]) -> None:
        # Only the batch's count and key are kept here: once the sink has
        # encoded the batch, its raw events can be freed while the encoded
        # object waits for the store.
        token = object()
        self._inflight[token] = batch.count
        self.metrics.batches_pending.set(len(self._inflight))
        d = maybeDeferred(sink, batch)
        d.addErrback(self._sink_failed, batch.key, batch.count)
        d.addBoth(self._batch_done, token)

    def replay(self, sealed: list, events: list, sink: Callable[[Batch], Deferred]) -> None:
        """
        Take up what a crashed process left (from the write-ahead log),
        before any new event: C{sealed} batches go to C{sink} as they are
        (their keys were fixed before the crash); C{events}, never sealed,
        are batched as if they had just been taken off the queue.  Batches
        beyond C{max_pending} make the batcher wait before it takes new
        events; C{sink} bounds how many upload at once.
        """
        for batch in sealed:
            self.metrics.batches_sealed.labels("replay").inc()
            self._dispatch(batch, sink)
        for start in range(0, len(events), self.batch_size):
            self._add(events[start:start + self.batch_size])
            while self.open_count >= self.batch_size:
                self._seal("replay")

    def _sink_failed(self, failure, key: str, count: int) -> None:
        # The uploader promises never to fail; if it does, say so loudly.
        self.metrics.loop_errors.labels("uploader").inc()
        self.metrics.dlq_events_dropped.inc(count)
        self.metrics.events_dropped.labels("unexpected_error").inc(count)
        self.log.failure("batch {key} failed unexpectedly; {count} events lost",
                         failure, key=key, count=count)

    def _batch_done(self, _, token) -> None:
        del self._inflight[token]
        self.metrics.batches_pending.set(len(self._inflight))
        if not self._inflight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
        while self._slot_waiters and self._has_slot():
            self._slot_waiters.pop(0).callback(None)

    # --- the two triggers ---

    async def _consume(self) -> None:
        try:
            await self._consume_until_stopped()
        except CancelledError:
            if not self._stopping:
                raise

    async def _consume_until_stopped(self) -> None:
        while not self._stopping:
            if self.open_count >= self.batch_size:
                await self._interruptible(self._wait_for_slot())
                self._seal("size")
                continue
            if not self.open_count:
                # Never open a batch that could not be sealed.
                await self._interruptible(self._wait_for_slot())
            self._getting = self.queue.get()
            try:
                first = await self._getting
            finally:
                self._getting = None
            self._add([first])
            room = self.batch_size - self.open_count
            if room > 0 and len(self.queue):
                self._add(self.queue.take(room))

    async def _interruptible(self, d: Deferred) -> None:
        self._getting = d
        try:
            await d
        finally:
            self._getting = None

    def _check_age(self) -> None:
        try:
            if self.partitioner is not None:
                now = self.clock.seconds()
                for path in [p for p, events in self._parts.items()
                             if now - events[0][0] >= self.flush_interval]:
                    if not self._has_slot():
                        break
                    self._seal_partition(path, "interval")
                return
            if (
                self._events
                and self.clock.seconds() - self._events[0][0] >= self.flush_interval
                and self._has_slot()
            ):
                self._seal("interval")
        except Exception:
            self.metrics.loop_errors.labels("batcher_tick").inc()
            self.log.failure("error in the batcher's age check")

    # --- shutdown ---

    def drain(self) -> Deferred:
        """
        Stop taking part in the flow: seal the open batch and everything
        still queued, and fire once every batch has a fate.  Call it after
        the API has stopped accepting events.
        """
        self._stopping = True
        self.queue.close()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._getting is not None:
            self._getting.cancel()
        self._seal_all("shutdown")
        while len(self.queue):
            self._add(self.queue.take(self.batch_size))
            self._seal_all("shutdown")
        self.log.info("draining: {batches} batches to store",
                      batches=len(self._inflight))
        return self.idle()

    def _seal_all(self, trigger: str) -> None:
        if self.partitioner is not None:
            for path in list(self._parts):
                self._seal_partition(path, trigger)
        else:
            self._seal(trigger)

    def idle(self) -> Deferred:
        """
        Fire once no batch is on its way to the store.
        """
        d = Deferred()
        if self._inflight:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d
