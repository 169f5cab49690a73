# -*- test-case-name: estat.test.test_http_site -*-
"""
The HTTP server under the API: a L{Site} tuned for an ingest endpoint and
the service that listens with it and closes it gracefully.

 - Request bodies are capped: a C{Content-Length} above the limit is
   answered 413 before a byte of the body is read, and a chunked body is
   cut off the moment it passes the limit; never more than the limit is
   held in memory.
 - POST bodies are never parsed as forms (Twisted's default costs ~40 % of
   a small request).
 - No access log line per request.
 - On stop: stop listening, close idle keep-alive connections, let requests
   in flight finish with C{Connection: close}, abort what is left after a
   grace period.
"""

from __future__ import annotations

from io import BytesIO
from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

__all__ = ["EstatRequest", "EstatSite", "HTTPListenerService"]

_REASONS = {413: b"Payload Too Large"}


def _answer_and_close(channel, status: bytes, body: bytes) -> None:
    """
    Answer on C{channel}'s transport directly, outside Twisted's request
    machinery, and close: the write side at once, the socket a second
    later, so that the client reads the answer rather than a reset.
    """
    transport = channel.transport
    transport.write(
        b"HTTP/1.1 %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(body), body))
    channel.persistent = False
    channel.pauseProducing()
    try:
        transport.loseWriteConnection()
    except (AttributeError, NotImplementedError):
        transport.loseConnection()
    channel.callLater(1.0, transport.abortConnection)


_TOO_SLOW = b'{"error":"request not received in time"}'


class EstatRequest(Request):
    """
    A request whose body never grows past C{site.max_body_size}.
    """

    _too_large = False
    _received = 0
    _deadline = None

    def __init__(self, channel, *args, **kwargs) -> None:
        super().__init__(channel, *args, **kwargs)
        timeout = getattr(channel.site, "request_timeout", None)
        if timeout:
            # Headers and body must arrive within the deadline, however
            # slowly the bytes trickle in (the idle timeout resets on every
            # byte, so it alone would let a slowloris client hold a
            # connection forever).  The clock started with the request's
            # first byte (see EstatChannel.dataReceived).
            remaining = channel.take_head_deadline(timeout)
            self._deadline = channel.callLater(remaining, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._too_large:
            return
        self.channel.site.on_timeout()
        self._too_large = True  # ignore whatever else arrives
        _answer_and_close(self.channel, b"408 Request Timeout", _TOO_SLOW)

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        if site.draining:
            self._close_after_response()
        if length is not None and length > site.max_body_size:
            self.content = BytesIO()
            self._reject_too_large()
            return
        # Bodies are small and capped: always in memory, never a temp file.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:
            self._reject_too_large()
            return
        self.content.write(data)

    def _reject_too_large(self) -> None:
        """
        Answer 413 at once and close: the rest of the body is not read.
        The write side is closed first and the socket a little later, so
        the client reads the answer instead of a reset.
        """
        self._too_large = True  # nothing more of this request is processed
        site = self.channel.site
        site.on_too_large()
        _answer_and_close(
            self.channel, b"413 Payload Too Large",
            b'{"error":"request body too large","limit":%d}' % site.max_body_size)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_deadline()
        if self._too_large:
            return
        super().requestReceived(command, path, version)

    def _close_after_response(self) -> None:
        self.channel.persistent = False
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def process(self) -> None:
        if self.channel.site.draining:
            self._close_after_response()
        super().process()


class EstatChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that its site keeps track of, so that a shutdown
    can close it.
    """

    _head_deadline = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        timeout = self.site.request_timeout
        if timeout and self._head_deadline is None and not self.requests:
            # A request begins: its first line and headers count against
            # REQUEST_TIMEOUT too, before Twisted makes the request object.
            self._head_deadline = self.callLater(timeout, self._head_too_slow)
        super().dataReceived(data)

    def take_head_deadline(self, timeout: float) -> float:
        """
        The request object now exists: hand it what is left of the time
        its first bytes started.
        """
        call, self._head_deadline = self._head_deadline, None
        if call is None or not call.active():
            return timeout
        remaining = call.getTime() - self.site.reactor.seconds()
        call.cancel()
        return max(0.0, remaining)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.requests:
            return  # the request's own deadline governs
        self._refused = True
        self.site.on_timeout()
        _answer_and_close(self, b"408 Request Timeout", _TOO_SLOW)

    def connectionLost(self, reason) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None
        self.site.channels.discard(self)
        super().connectionLost(reason)
        self.site.channel_closed()


class EstatSite(Site):
    """
    The L{Site} of Estat's API.

    @ivar max_body_size: the largest request body accepted, in bytes.
    @ivar on_too_large: called once per request refused with 413.
    """

    protocol = EstatChannel
    requestFactory = EstatRequest

    def __init__(
        self,
        resource,
        max_body_size: int,
        on_too_large: Callable[[], None] = lambda: None,
        idle_timeout: float = 75.0,
        reactor=None,
        request_timeout: float | None = None,
        max_connections: int | None = None,
        on_timeout: Callable[[], None] = lambda: None,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False,
                         timeout=idle_timeout, reactor=reactor)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.on_timeout = on_timeout
        self.on_refused = on_refused
        self.noisy = False
        self.max_body_size = max_body_size
        self.on_too_large = on_too_large
        self.channels: set = set()
        self.draining = False
        self._all_closed: list = []

    def log(self, request) -> None:
        """
        No access log: a line per request is a line per event.
        """

    def buildProtocol(self, addr):
        if self.max_connections is not None and len(self.channels) >= self.max_connections:
            # Returning None makes Twisted close the new socket at once.
            self.on_refused()
            return None
        return super().buildProtocol(addr)

    def channel_closed(self) -> None:
        if not self.channels:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def close_connections(self) -> Deferred:
        """
        Begin draining: idle keep-alive connections close now, busy ones
        after their response.  Fires when none is left.
        """
        self.draining = True
        for channel in list(self.channels):
            if not channel.requests:
                channel.loseConnection()
            else:
                channel.persistent = False
                for request in channel.requests:
                    if not request.startedWriting:
                        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        d = Deferred()
        if self.channels:
            self._all_closed.append(d)
        else:
            d.callback(None)
        return d

    def abort_connections(self) -> None:
        for channel in list(self.channels):
            channel.transport.abortConnection()


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
    site: EstatSite = attr.ib()
    clock: IReactorTime = attr.ib()
    grace: float = attr.ib(default=5.0)
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
