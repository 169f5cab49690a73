# -*- test-case-name: estat.test.test_service -*-
"""
The Estat service: the pieces of the pipeline started in order and, unlike
a plain L{MultiService} (which stops its children concurrently), stopped in
an explicit order so that a SIGTERM loses nothing:

 1. C{/readyz} turns 503, the dead-letter retry loop stops (its files
    stay on disk; S3 capacity goes to the live drain) and the plan
    reloader puts the previous C{SIGHUP} handler back;
 2. the HTTP listener closes: no new connection, idle keep-alive
    connections closed, requests in flight finish;
 3. the batcher seals its open batch and everything queued, and waits for
    every upload; when the shutdown deadline nears, the uploader stops
    retrying and what is left goes to the dead-letter queue;
 4. the dead-letter queue finishes its writes.

C{SHUTDOWN_TIMEOUT} bounds the whole; whatever is still only in memory then
is counted in C{shutdown_events_unsaved_total} and logged.

With C{ACK_MODE=disk} the write-ahead log starts before the batcher and
stops last (its final checkpoint); C{/readyz} turns 200 only once the log
is recovered and what it held is handed to the batchers, ahead of any new
event.  With C{ACK_MODE=stored} step 3 happens inside step 2 (the
listener's C{settle}), so that requests waiting for the store are answered
before their connections close.
"""

from __future__ import annotations

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .batcher import Batcher
from .dlq import DiskDeadLetterQueue
from .interfaces import IObjectStore
from .metrics import Metrics
from .queue import EventQueue
from .uploader import Uploader

__all__ = ["EstatService", "hurry_delay"]


def hurry_delay(shutdown_timeout: float) -> float:
    """
    When, after shutdown begins, the uploader stops retrying: late enough
    to let slow uploads finish, early enough to write the rest to disk.
    """
    return max(shutdown_timeout * 0.7, shutdown_timeout - 3.0)


@attr.s
class Readiness:
    """
    Whether the process wants traffic: false once shutdown has begun
    (C{/readyz} answers from it).
    """

    ready: bool = attr.ib(default=True)


@attr.s(eq=False)
class EstatService(MultiService):
    log = Logger()

    #: the HTTP listener (L{estat.http.site.HTTPListenerService}): a child
    #: service, stopped first.
    http: Service = attr.ib()
    batcher: Batcher = attr.ib()
    uploader: Uploader = attr.ib()
    dead_letters: DiskDeadLetterQueue = attr.ib()
    queue: EventQueue = attr.ib()
    store: IObjectStore = attr.ib()
    readiness: Readiness = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    shutdown_timeout: float = attr.ib(default=25.0)
    #: Called once a shutdown drained everything in time.
    on_clean_shutdown: object = attr.ib(default=lambda: None)
    #: Further streams, each C{(queue, batcher)} (the Segment messages under
    #: SEGMENT_PREFIX): started and drained like the first, sharing its
    #: uploader and dead-letter queue.
    streams: list = attr.ib(factory=list)
    #: ACK_MODE=disk: the write-ahead log, and C{Recovered -> stream name}
    #: callables that hand each stream's replay to its batcher.
    wal: object = attr.ib(default=None)
    replays: list = attr.ib(factory=list)
    #: With a tracking plan: the L{estat.schema.reloader.PlanReloader}
    #: (started after the listener; stopped first, so its SIGHUP handler
    #: is put back and no reload runs during the drain).
    reloader: object = attr.ib(default=None)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        # Start order; stop order is in stopService.
        self.dead_letters.setServiceParent(self)
        if self.wal is not None:
            self.wal.setServiceParent(self)
        self.batcher.setServiceParent(self)
        for _, batcher in self.streams:
            batcher.setServiceParent(self)
        self.http.setServiceParent(self)
        if self.reloader is not None:
            self.reloader.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        if self.wal is None:
            self.readiness.ready = True
        else:
            self.wal.when_open().addCallback(self._replay)
        self.log.info("storing events in {store}", store=self.store.description)
        self._checking = self.store.check()
        self._checking.addCallbacks(self._store_ok, self._store_failed)

    def _replay(self, recovered) -> None:
        if recovered is None:
            # The log could not be opened: POSTs get 503 and /readyz stays
            # 503, but the process runs (no crash loop) for a person to see.
            return
        claimed = set()
        for replay in self.replays:
            try:
                claimed.add(replay(recovered))
            except Exception:
                self.metrics.loop_errors.labels("wal_replay").inc()
                self.log.failure("could not replay the write-ahead log")
        self.wal.release_unclaimed(claimed)
        if self.running:
            self.readiness.ready = True

    def _store_ok(self, _) -> None:
        self.log.info("store check passed: {store} is writable", store=self.store.description)

    def _store_failed(self, failure) -> None:
        if failure.check(CancelledError):
            return  # shutdown began before the check answered
        self.log.error(
            "store check FAILED for {store}: {error}. The server is running; batches "
            "that cannot be stored are kept in the dead-letter queue.",
            store=self.store.description, error=failure.getErrorMessage())

    def stopService(self) -> Deferred:
        Service.stopService(self)
        d = Deferred.fromCoroutine(self._stop_in_order())
        d.addTimeout(self.shutdown_timeout, self.clock, onTimeoutCancel=self._too_late)
        return d

    async def _stop_in_order(self) -> None:
        self.log.info("shutting down (deadline {timeout}s)", timeout=self.shutdown_timeout)
        self.readiness.ready = False
        if self.wal is not None:
            # Stopped while starting: the log's replay comes first, so that
            # what it holds is drained and stored now, as on any stop, not
            # left for the next start.
            await self.wal.when_open()
        checking = getattr(self, "_checking", None)
        if checking is not None and not checking.called:
            checking.cancel()  # no start-up work outlives the service
        retry_stopped = self.dead_letters.stop_retrying()
        hurry = self.clock.callLater(hurry_delay(self.shutdown_timeout), self._hurry)
        try:
            if self.reloader is not None:
                # The SIGHUP handler goes first; a reload in flight is
                # waited for (it only swaps the plan).
                await maybeDeferred(self.reloader.stopService)
            await self.http.stopService()
            # Every stream drains at once; the first one's result (or
            # cancellation, at the deadline) comes first.
            draining = [maybeDeferred(self.batcher.stopService)] + \
                [maybeDeferred(b.stopService) for _, b in self.streams]
            for stopped in draining:
                await stopped
            await retry_stopped
            await self.dead_letters.stopService()
            if self.wal is not None:
                await self.wal.stopService()
        finally:
            if hurry.active():
                hurry.cancel()
        self.log.info("shutdown complete: every accepted event is stored or in the "
                      "dead-letter queue")
        self.on_clean_shutdown()

    def _hurry(self) -> None:
        self.log.warn("shutdown deadline near: uploads still failing go to the "
                      "dead-letter queue now")
        self.uploader.hurry()

    def _too_late(self, result, timeout) -> None:
        if isinstance(getattr(result, "value", None), CancelledError):
            unsaved = sum(len(q) + b.open_count + b.pending_events
                          for q, b in [(self.queue, self.batcher)] + list(self.streams))
            self.metrics.shutdown_events_unsaved.inc(unsaved)
            self.log.critical(
                "shutdown deadline of {timeout}s passed; about {count} events were "
                "neither stored nor written to the dead-letter queue",
                timeout=timeout, count=unsaved)
            return None
        return result
