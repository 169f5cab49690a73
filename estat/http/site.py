# -*- test-case-name: estat.test.test_http_site -*-
"""
The listener: the service that listens with the HTTP factory
(L{estat.http.protocol.FastHTTPFactory}) and, on stop, closes gracefully:
stop listening, close idle keep-alive connections, let requests in flight
finish with C{Connection: close}, abort what is left after a grace period.
"""

from __future__ import annotations

from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["HTTPListenerService"]


@attr.s(eq=False)
class HTTPListenerService(Service):
    """
    Listens on an endpoint with a site and, on stop, closes gracefully:
    the listener first, idle connections next, busy ones after their
    response or after C{grace} seconds.

    Listening happens in C{startService}, so a bad or taken port stops
    start-up with an error.

    @ivar on_stopping: called first thing in C{stopService} (turns
        C{/readyz} to 503).
    """

    log = Logger()

    endpoint = attr.ib()
    #: the factory: C{channels}, C{close_connections()}, C{abort_connections()}
    site = attr.ib()
    clock: IReactorTime = attr.ib()
    grace: float = attr.ib(default=5.0)
    #: Awaited after the listener closed and before the grace period
    #: starts: ACK_MODE=stored drains the pipeline here, so that requests
    #: waiting for the store get their answers before connections close.
    settle: Callable[[], Deferred] | None = attr.ib(default=None)
    on_stopping: Callable[[], None] = attr.ib(default=lambda: None)

    port = attr.ib(default=None, init=False)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        failures = []
        d = self.endpoint.listen(self.site)
        d.addCallbacks(self._listened, failures.append)
        if failures:
            # A bad or taken port fails start-up, as strports.service does.
            failures[0].raiseException()

    def _listened(self, port) -> None:
        self.port = port
        address = port.getHost()
        self.log.info("listening on {host}:{port}",
                      host=getattr(address, "host", address),
                      port=getattr(address, "port", ""))

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        self.on_stopping()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        closed = self.site.close_connections()
        if self.settle is not None:
            await self.settle()
        timer = self.clock.callLater(self.grace, self._abort, closed)
        await closed
        if timer.active():
            timer.cancel()
        self.log.info("HTTP listener closed")

    def _abort(self, closed: Deferred) -> None:
        left = len(self.site.channels)
        if left:
            self.log.warn("aborting {count} HTTP connections still open", count=left)
            self.site.abort_connections()
        if not closed.called:
            # Aborted channels report connectionLost asynchronously; do not
            # wait for them forever.
            self.clock.callLater(1.0, lambda: closed.called or closed.callback(None))
