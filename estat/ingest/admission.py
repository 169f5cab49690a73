# -*- test-case-name: estat.test.test_ingest_admission -*-
"""
C{ACK_MODE=memory} admission that lets a request wait a little for room
on the event queue instead of answering 503 at once.

The queue fills for moments that say nothing about overload: while every
one of C{MAX_PENDING_BATCHES} slots is being encoded and the encoder
thread shares the reactor's CPU, the batcher takes nothing for tens of
milliseconds, then a whole batch at once.  A client told C{Retry-After: 1}
comes back in a second anyway; holding its request up to
C{QUEUE_MAX_WAIT} costs it no more and spares it the refusal and the
second upload.  Only a queue still full after that, or more waiting events
than C{QUEUE_MAX_WAITING_EVENTS}, is answered 503 C{queue_full}.

Waiters are admitted first come, first served (a later request never
overtakes one waiting, so events keep their order on the queue), as the
batcher takes events.  Memory stays bounded: the queue's C{CHANNEL_SIZE}
plus the waiting events.  When the queue closes for shutdown every waiter
is answered 503 at once; none was acknowledged, so nothing is lost.

Everything here runs on the reactor thread and does no I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attr
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..metrics import Metrics
from ..queue import EventQueue
from .core import IAdmission, Refusal

__all__ = ["WaitingQueueAdmission"]


@implementer(IAdmission)
@attr.s(eq=False)
class WaitingQueueAdmission:
    """
    Admitted means on the bounded event queue, as L{QueueAdmission}, but a
    request that finds no room waits up to C{max_wait} seconds for it.

    @ivar max_wait: seconds a request may wait for room; 0 refuses at once.
    @ivar max_waiting_events: events that may wait at once; a request that
        would pass it is refused at once.
    """

    queue: EventQueue = attr.ib()
    clock: IReactorTime = attr.ib()
    metrics: Metrics = attr.ib()
    max_wait: float = attr.ib(default=1.0)
    max_waiting_events: int = attr.ib(default=4000)
    retry_after: int = attr.ib(default=1)

    #: Events of the waiting requests.
    waiting_events: int = attr.ib(default=0, init=False)
    #: [events, done, deadline], oldest first.
    _waiters: deque = attr.ib(factory=deque, init=False)
    _timer = attr.ib(default=None, init=False)
    _admitting: bool = attr.ib(default=False, init=False)
    _full: Refusal = attr.ib(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._full = Refusal(503, "queue_full", "event queue is full, retry later",
                             self.retry_after)
        self.queue.on_room = self._room
        self.metrics.event_queue_waiting_requests.set_function(lambda: len(self._waiters))
        self.metrics.event_queue_waiting_events.set_function(lambda: self.waiting_events)

    @property
    def waiting(self) -> int:
        """
        Requests waiting for room.
        """
        return len(self._waiters)

    def admit(self, events: list, done: Callable) -> None:
        queue = self.queue
        if not self._waiters and queue.offer(events):
            done(None)
            return
        count = len(events)
        if (queue.closed or self.max_wait <= 0 or count > queue.size
                or self.waiting_events + count > self.max_waiting_events):
            done(self._full)
            return
        deadline = self.clock.seconds() + self.max_wait
        self._waiters.append([events, done, deadline])
        self.waiting_events += count
        if self._timer is None:
            self._timer = self.clock.callLater(
                max(0.0, self._waiters[0][2] - self.clock.seconds()), self._expire)
        # Room may have appeared between the failed offer and now (the
        # offer woke the batcher): this request may be the head.
        self._room()

    def try_admit(self, events: list) -> bool:
        """
        Admit C{events} at once if there is room and nobody waits
        (C{True}); C{False} means nothing was taken and L{admit} decides.
        """
        return not self._waiters and self.queue.offer(events)

    def refusal_for(self, count: int) -> Refusal | None:
        """
        The refusal this admission gives C{count} events if they cannot be
        admitted now, or C{None}.  A request that would wait counts as
        refused: L{estat.ingest.validation.admit_both} asks so that a
        request goes to both its streams or to neither, which a wait ending
        in a refusal after the other stream took its events would break.
        """
        queue = self.queue
        if queue.closed or self._waiters or not queue.room_for(count):
            return self._full
        return None

    def _room(self) -> None:
        """
        The queue has taken events or closed: admit the waiters that now
        fit, oldest first.
        """
        if self._admitting or not self._waiters:
            return
        self._admitting = True
        try:
            waiters, queue = self._waiters, self.queue
            while waiters:
                if queue.closed:
                    self._refuse_all()
                    break
                events, done, deadline = waiters[0]
                if not queue.offer(events):
                    break
                waiters.popleft()
                self.waiting_events -= len(events)
                self.metrics.event_queue_waits.labels("admitted").inc()
                self.metrics.event_queue_wait_duration.observe(
                    self.max_wait - (deadline - self.clock.seconds()))
                done(None)
        finally:
            self._admitting = False
        if not self._waiters:
            self._stop_timer()

    def _expire(self) -> None:
        """
        Refuse the waiters whose time is up, then look again for room for
        the next ones.
        """
        self._timer = None
        waiters, now = self._waiters, self.clock.seconds()
        while waiters and waiters[0][2] <= now:
            events, done, _ = waiters.popleft()
            self.waiting_events -= len(events)
            self.metrics.event_queue_waits.labels("timed_out").inc()
            done(self._full)
        self._room()
        if waiters and self._timer is None:
            self._timer = self.clock.callLater(max(0.0, waiters[0][2] - now), self._expire)

    def _refuse_all(self) -> None:
        waiters = self._waiters
        while waiters:
            events, done, _ = waiters.popleft()
            self.waiting_events -= len(events)
            self.metrics.event_queue_waits.labels("shutdown").inc()
            done(self._full)
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
