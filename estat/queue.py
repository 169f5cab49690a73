# -*- test-case-name: estat.test.test_queue -*-
"""
The bounded in-memory event queue between the HTTP API and the batcher.

It is a L{DeferredQueue} with C{size=CHANNEL_SIZE}: a put on a full queue
fails at once (the API answers 503), never waits and never grows.  Two
additions keep the hot path cheap: L{EventQueue.offer} puts several events
all or nothing, and L{EventQueue.take} hands the batcher up to C{n} events
in one call instead of one Deferred per event.

With C{call_soon}, a waiting consumer is woken once per reactor turn, not
once per offer; but an offer that would find the queue full while a wake
is still to come wakes the consumer at once: one reactor turn can read
more requests than the queue holds (64 connections of 100 events each are
6,400 events against C{CHANNEL_SIZE=4000}), and a queue that is full only
because its consumer has not run yet is not full.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredQueue

__all__ = ["EventQueue"]


class EventQueue(DeferredQueue):
    """
    A bounded queue of L{estat.event.QueuedEvent}s with one consumer.
    """

    def __init__(self, size: int, call_soon=None) -> None:
        """
        @param call_soon: C{f -> None}, runs C{f} soon on the reactor thread
            (C{lambda f: reactor.callLater(0, f)}).  Given, a waiting
            consumer is woken once per reactor turn with everything offered
            in it, instead of once per offer (a Deferred and a coroutine step
            per request on the hot path).  Without it, at once.
        """
        # One waiting consumer: the batcher.
        super().__init__(size=size, backlog=1)
        self.closed = False
        self._call_soon = call_soon
        self._waking = False
        #: C{() -> None}, called after events leave the queue and when it
        #: closes: room may have appeared (L{estat.ingest.admission} admits
        #: the requests waiting for it).  It may run inside L{offer} or
        #: L{room_for}, when they wake the consumer early.
        self.on_room = None

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def free(self) -> int:
        return self.size - len(self.pending)

    def offer(self, events: list) -> bool:
        """
        Put all of C{events} or none of them.

        @return: C{False} when the queue is closed or has not room for all.
        """
        if self.closed:
            return False
        count = len(events)
        if count > self.size - len(self.pending) and not self.room_for(count):
            # (room_for's first test, made here: the common offer, which
            # fits, costs no call.)
            return False
        if not events:
            return True
        if self.waiting and self._call_soon is None:
            # The consumer waits only on an empty queue; queue the rest
            # first so that, woken, it finds them in order.
            self.pending.extend(events[1:])
            self.waiting.pop(0).callback(events[0])
            return True
        self.pending.extend(events)
        if self.waiting and not self._waking:
            self._waking = True
            self._call_soon(self._wake)
        return True

    def room_for(self, count: int) -> bool:
        """
        Whether C{count} more events fit now, once a consumer whose wake is
        still to come has taken what it will.
        """
        if count <= self.size - len(self.pending):
            return True
        if self.waiting and self.pending and count <= self.size:
            self._wake()
            return count <= self.size - len(self.pending)
        return False

    def _wake(self) -> None:
        # Run early (by a full offer), it leaves the scheduled call harmless.
        self._waking = False
        if self.waiting and self.pending:
            self.waiting.pop(0).callback(self.pending.pop(0))
            self._roomed()

    def _roomed(self) -> None:
        if self.on_room is not None:
            self.on_room()

    def take(self, n: int) -> list:
        """
        Remove and return up to C{n} events that are already waiting, without
        waiting for more.
        """
        pending = self.pending
        if n >= len(pending):
            taken = pending[:]
            del pending[:]
        else:
            taken = pending[:n]
            del pending[:n]
        if taken:
            self._roomed()
        return taken

    def close(self) -> None:
        """
        Refuse further events; those already queued stay to be taken.
        """
        self.closed = True
        self._roomed()

    def get(self) -> Deferred:
        """
        Wait for one event.  The returned Deferred may be cancelled.
        """
        d = super().get()
        if d.called:
            self._roomed()
        return d
