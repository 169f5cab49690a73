# -*- test-case-name: estat.test.test_http_protocol -*-
"""
The HTTP/1.1 server protocol: every request on a connection is framed by
llhttp (httptools, the parser of Node.js), strictly, as RFC 9112 asks.

 - The event routes (C{/collect}, ...) are served here: the request becomes
   an L{IngestRequest}, a handler of the ingest core decides, and the
   answer is written whole in one C{write}.  No twisted.web C{Request},
   C{Headers} or C{Deferred} per request.
 - Every other route (C{/healthz}, C{/readyz}, C{/metrics},
   C{/openapi.json}, 404s) goes to the Klein resource through a twisted.web
   L{HTTPChannel} attached to the connection, which is handed the request
   llhttp already framed (re-serialised with a C{Content-Length} body), so
   those routes keep full twisted.web behaviour on the same port.
 - Answers go out in request order, whichever front end produced them and
   however late (pipelining; acknowledgement modes that wait).
 - A request that breaks the framing rules (C{Content-Length} with
   C{Transfer-Encoding}, two lengths, a bad chunk, obsolete folding, bad
   characters, ...) is answered 400 and the connection closed; nothing
   after it on the connection is ever served (no request smuggling).
 - Limits: the body is capped (decided from C{Content-Length} before a
   byte is read; a chunked body is cut off as it passes the cap), the
   header section (431) and the request target (414) too; a request must
   arrive within C{REQUEST_TIMEOUT} of its first byte (408), and an idle
   keep-alive connection is closed after C{HTTP_IDLE_TIMEOUT}.  One timer
   sweeps every connection's deadline, instead of a timer per request.

The protocol decides nothing about events: that is L{estat.ingest.core}.
"""

from __future__ import annotations

import email.utils
import re
from collections import deque
from typing import Callable, Mapping

import httptools
import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ILoggingContext, IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request, Site
from zope.interface import classImplements

from ..ingest.core import Answer, IngestRequest

__all__ = ["FastHTTPFactory", "FastHTTPProtocol", "MAX_HEADER_BYTES", "MAX_TARGET_BYTES"]

#: The largest request header section (request line included), as Node.js.
MAX_HEADER_BYTES = 16384
#: The most header fields a request may have (Twisted allows 500, Node.js 2,000;
#: browsers send about 20).
MAX_HEADER_FIELDS = 100
#: The longest request target.
MAX_TARGET_BYTES = 8192
#: Answers that may wait on one connection before it stops being read.
MAX_PIPELINED = 32

_STATUS_LINES: dict = {}


#: Reasons twisted.web's table lacks.
_REASONS = {431: b"Request Header Fields Too Large"}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = _REASONS.get(status) or RESPONSES.get(status, b"Unknown")
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


for _status in (100, 200, 202, 204, 400, 401, 404, 405, 408, 413, 414, 415, 417, 429,
                431, 500, 501, 503, 505):
    _status_line(_status)

_FIELD_NAMES: dict = {}
#: The rendered header fields of the answers seen (a few kinds: 202, 503, ...).
_HEADER_BLOCKS: dict = {}


def _field_name(name: bytes) -> bytes:
    canonical = _FIELD_NAMES.get(name)
    if canonical is None:
        canonical = name.title()
        if len(_FIELD_NAMES) < 256:
            _FIELD_NAMES[name] = canonical
    return canonical


class _Ended(Exception):
    """
    Raised when a request begins after one that ends the connection: it
    is never read.
    """


class _Refused(Exception):
    """
    Raised inside a parser callback: answer C{status} with C{body}, then close.
    """

    def __init__(self, status: int, reason: str, message: bytes) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.message = message


def _http_version(parser, headers: dict) -> str:
    """
    The request's HTTP version, as C{parser.get_http_version()} gives it,
    once its header section is parsed; without that call (2.5k
    instructions, a third of the header section's, for its
    C{str.format}) in the common case.

    llhttp accepts only the versions 0.9, 1.0, 1.1 and 2.0 (no leniency is
    set here); and, for a request, C{llhttp_should_keep_alive} is true
    without a C{Connection} field only when both the major and the minor
    version are above zero (an HTTP/1.0 or 0.9 connection persists only
    with C{Connection: keep-alive}, an HTTP/1.1 one unless
    C{Connection: close}).  So a request with no C{Connection} field that
    should be kept alive is HTTP/1.1.  Any other asks the parser.
    """
    if b"connection" not in headers and parser.should_keep_alive():
        return "1.1"
    return parser.get_http_version()


def _json_error(message: str, **extra) -> bytes:
    body = {"error": message}
    body.update(extra)
    return orjson.dumps(body)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_new_tuple = tuple.__new__


class _Slot:
    """
    One answer in the connection's order: bytes to write once ready, or
    a request for the twisted.web channel once it is this slot's turn.
    (No C{__init__}: one is made per request, and an C{__init__} with
    arguments triples the cost.)
    """

    data: bytes | None
    close: bool
    keep_alive_10: bool
    head: bool
    #: (method, target, version, headers, body) for the twisted.web channel
    slow: tuple | None
    #: the connection, for an answer given later (L{__call__})
    protocol: "FastHTTPProtocol"

    def __call__(self, answer: Answer) -> None:
        """
        The handler's C{respond}: the answer, given later (or before the
        handler returns, when it did not return it).
        """
        protocol = self.protocol
        protocol._answer(self, answer, protocol._seconds())


def _defaults(cls: type, **values) -> None:
    """
    Give C{cls} class attributes as defaults, unless compiled: there
    (C{protocol.pxd}) it is a C struct, whose fields start as C{None} and
    C{False} anyway, and whose class takes no attributes.
    """
    for name, value in values.items():
        if name not in cls.__dict__:
            setattr(cls, name, value)


_defaults(_Slot, data=None, close=False, keep_alive_10=False, head=False, slow=None,
          protocol=None)


def _slot(data: bytes | None = None, close: bool = False, slow: tuple | None = None) -> _Slot:
    slot = _Slot()
    if data is not None:
        slot.data = data
    if close:
        slot.close = True
    if slow is not None:
        slot.slow = slow
    return slot


class _RouteRequest(Request):
    """
    A twisted.web request whose answer is written whole, with a
    C{Content-Length}: these routes answer small documents, and a length
    (never chunked) lets an HTTP/1.0 keep-alive client keep its connection.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parts: list = []

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return super().write(data)
        self._parts.append(data)

    def finish(self) -> None:
        if not self.finished and not self._disconnected:
            body = b"".join(self._parts)
            self._parts = []
            if self.responseHeaders.getRawHeaders(b"content-length") is None:
                self.setHeader(b"content-length", b"%d" % len(body))
            super().write(body)
        return super().finish()


class _RouteSite(Site):
    """
    The twisted.web site of the other routes: no access log, no timeouts
    (the protocol keeps the connection's deadlines), no form parsing.
    """

    requestFactory = _RouteRequest

    def __init__(self, resource, reactor=None) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=None,
                         reactor=reactor)
        self.requestFactory = _RouteRequest
        self.noisy = False

    def log(self, request) -> None:
        pass


class _RouteChannel(HTTPChannel):
    """
    A twisted.web channel fed requests by a L{FastHTTPProtocol}; tells it
    when each answer is complete.
    """

    owner: "FastHTTPProtocol" = None  # type: ignore[assignment]

    def checkPersistence(self, request, version: bytes) -> bool:
        # twisted.web ends every HTTP/1.0 connection; here an HTTP/1.0
        # client that asked for keep-alive keeps it (the answer has a
        # Content-Length: _RouteRequest), as on the event routes.
        if version == b"HTTP/1.0":
            connection = request.requestHeaders.getRawHeaders(b"connection") or [b""]
            if b"keep-alive" in connection[0].lower():
                request.responseHeaders.setRawHeaders(b"connection", [b"keep-alive"])
                return True
            return False
        return super().checkPersistence(request, version)

    def requestDone(self, request) -> None:
        super().requestDone(request)
        self.owner._slow_done()


class _ChannelTransport:
    """
    The transport a L{_RouteChannel} writes to: the connection's own, with
    closing routed through the protocol.
    """

    disconnecting = False

    def __init__(self, protocol: "FastHTTPProtocol") -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._protocol._channel_closes()

    def abortConnection(self) -> None:
        self._transport.abortConnection()

    def getPeer(self):
        return self._transport.getPeer()

    def getHost(self):
        return self._transport.getHost()

    def registerProducer(self, producer, streaming) -> None:
        # The protocol is the connection's producer; the routes twisted.web
        # serves here answer whole and never stream.
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class FastHTTPProtocol:
    """
    One HTTP/1.1 connection.  See the module docstring.

    A plain class with what Twisted asks of a protocol (L{IProtocol}),
    not a subclass of L{Protocol}: so that, compiled (L{estat._compiled}),
    its state is a C struct (C{protocol.pxd}) rather than a dictionary.
    """

    def __init__(self) -> None:
        self.factory: "FastHTTPFactory" = None  # type: ignore[assignment]
        self.transport = None
        self.connected = False
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque = deque()
        self._headers: dict = {}
        self._url = b""
        self._body: list = []
        self._body_size = 0
        self._head_bytes = 0
        self._in_head = False
        self._in_message = False
        self._completed = 0        # requests framed on this connection
        self._head_raw = 0
        self._begun = 0            # requests begun on this connection
        self._ending = False       # a request that ends the connection was read
        self._method = b""
        self._version = "1.1"
        self._path = b""
        self._query = b""
        self._route = None
        self._broken = False       # nothing more is parsed or served
        self._closing = False      # close once the pending answers are written
        self._channel = None
        self._slow_busy = False
        self._paused = False         # too many answers waiting
        self._write_blocked = False  # the transport's buffer is full
        self.peer = ""
        self._seconds = None       # the factory's clock.seconds (connectionMade)
        self._routes: dict = {}
        self._max_body_size = 0
        self._max_body_digits = 1
        #: clock seconds when this connection's deadline passes (0: none)
        self.deadline = 0.0
        self._deadline_is_request = False

    # --- connection ---

    def logPrefix(self) -> str:
        return "FastHTTPProtocol"

    def makeConnection(self, transport) -> None:
        self.connected = True
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        factory = self.factory
        # What every request reads of the factory, which it never changes.
        self._seconds = factory.clock.seconds
        self._routes = factory.routes
        self._max_body_size = factory.max_body_size
        self._max_body_digits = len(str(factory.max_body_size))
        factory.channels.add(self)
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError):
            pass
        self.peer = getattr(transport.getPeer(), "host", "") or ""
        # Answers a client does not read back up in the transport: it then
        # pauses us, and we stop reading its requests (pauseProducing).
        transport.registerProducer(self, True)
        self._idle(self._seconds())

    def connectionLost(self, reason) -> None:
        self._broken = True
        self.deadline = 0.0
        self._pending.clear()
        factory = self.factory
        factory.channels.discard(self)
        if self._channel is not None:
            self._channel.connectionLost(reason)
        factory.channel_closed()

    def _idle(self, now: float) -> None:
        timeout = self.factory.idle_timeout
        self.deadline = now + timeout if timeout else 0.0
        self._deadline_is_request = False

    def deadline_passed(self, now: float) -> None:
        """
        Called by the factory's sweep once C{now} is past L{deadline}.
        """
        self.deadline = 0.0
        if self._deadline_is_request:
            self.factory.on_timeout()
            self._refuse(408, b'{"error":"request not received in time"}')
        elif not self._pending:
            self.transport.loseConnection()

    # --- bytes in ---

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        in_head = self._in_head
        completed = self._completed
        begun = self._begun
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or a valid Upgrade: refused in on_headers_complete;
            # what follows is not HTTP and is never read.
            self._broken = True
            return
        except httptools.HttpParserError as e:
            refused = e.__context__
            if isinstance(refused, _Ended):
                return  # bytes after a request that ends the connection
            if isinstance(refused, _Refused):
                if refused.reason:
                    self.factory.on_protocol_error(refused.reason)
                self._refuse(refused.status, refused.message)
            elif not self._broken:
                if (isinstance(e, httptools.parser.errors.HttpParserInvalidMethodError)
                        and self._completed == completed and _REQUEST_LINE.match(data)):
                    # RFC 9110, 9.1: an unrecognised method is 501.
                    self.factory.on_protocol_error("unknown_method")
                    self._refuse(501, _json_error("request method not implemented; use POST"))
                    return
                self.factory.on_protocol_error("bad_request")
                self._refuse(400, _json_error("malformed HTTP request: " + _reason(e)))
            return
        if self._in_message and not self._deadline_is_request and not self._broken:
            timeout = self.factory.request_timeout
            if timeout:
                self.deadline = self._seconds() + timeout
                self._deadline_is_request = True
        if self._in_head and not self._broken:
            # A header section still arriving: bound what it may hold
            # (llhttp accumulates a header's value until it ends).
            if in_head and self._begun == begun:
                # This read was all inside one header section (one that
                # began here is bounded by this read's size).
                self._head_raw += len(data)
            if self._head_raw > MAX_HEADER_BYTES:
                self.factory.on_protocol_error("header_too_large")
                self._refuse(431, _HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        if self._ending:
            raise _Ended()
        self._begun += 1
        self._in_head = True
        self._in_message = True
        self._head_bytes = 0
        self._head_raw = 0
        self._headers = {}
        self._url = b""
        self._body = []
        self._body_size = 0
        self._route = None
        # REQUEST_TIMEOUT runs from this first byte: armed by dataReceived
        # if the request is still arriving when this read is parsed (most
        # arrive whole, and need no deadline).
        self.deadline = 0.0
        self._deadline_is_request = False

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        self._url = url
        if len(url) > MAX_TARGET_BYTES:
            raise _Refused(414, "uri_too_long", _URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        # The sizes are checked once the section is complete (and, while it
        # arrives, by dataReceived): llhttp has already bounded this field
        # by the bytes of one read.
        self._head_bytes += len(name) + len(value)
        name = name.lower()
        headers = self._headers
        if name in headers:
            if name == b"host":
                raise _Refused(400, "bad_request", _json_error("more than one Host field"))
            headers[name] += b", " + value
            self._head_bytes += 4  # one more field than the dictionary shows
        else:
            headers[name] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        factory = self.factory
        headers = self._headers
        url = self._url
        if (self._head_bytes + 4 * len(headers) + len(url) > MAX_HEADER_BYTES
                or len(headers) > MAX_HEADER_FIELDS):
            raise _Refused(431, "header_too_large", _HEADERS_TOO_LARGE)
        version = self._version = _http_version(parser, headers)
        if version != "1.1" and version != "1.0":
            raise _Refused(505, "bad_version", _json_error(
                "HTTP version not supported; use HTTP/1.1"))
        method = self._method = parser.get_method()
        if method == b"CONNECT":
            raise _Refused(501, "upgrade_refused", _json_error("CONNECT is not supported"))
        if b"upgrade" in headers:
            raise _Refused(400, "upgrade_refused", _json_error(
                "protocol upgrades are not supported; use HTTP/1.1"))
        if b"host" not in headers and version == "1.1":
            raise _Refused(400, "bad_request", _json_error("HTTP/1.1 requests need a Host field"))
        coding = headers.get(b"transfer-encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            raise _Refused(400, "bad_request", _json_error(
                "unsupported Transfer-Encoding; only chunked is accepted"))
        length = headers.get(b"content-length")
        # llhttp lets only digits (and trailing spaces) through in a
        # Content-Length: one with fewer characters than the limit has
        # digits is below it, and needs no int().
        if (length is not None and len(length) >= self._max_body_digits
                and int(length) > self._max_body_size):
            factory.on_too_large()
            raise _Refused(413, "", _too_large(factory.max_body_size))
        expect = headers.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise _Refused(417, "bad_request", _json_error(
                    "unsupported Expect; only 100-continue is understood"))
            if version == "1.1":
                self._push(_slot(_CONTINUE))
                self._flush()
        if url[:1] != b"/":
            url = self._url = _origin_form(url)
        path, _, self._query = url.partition(b"?")
        self._path = path
        self._route = self._routes.get(path)

    def on_body(self, data: bytes) -> None:
        size = self._body_size + len(data)
        if size > self._max_body_size:
            self.factory.on_too_large()
            raise _Refused(413, "", _too_large(self.factory.max_body_size))
        self._body_size = size
        self._body.append(data)

    def on_message_complete(self) -> None:
        factory = self.factory
        self.deadline = 0.0
        self._deadline_is_request = False
        self._in_message = False
        self._completed += 1
        keep_alive = self._parser.should_keep_alive() and not factory.draining
        body = self._body
        body = body[0] if len(body) == 1 else b"".join(body)
        route = self._route
        if route is None:
            close = not keep_alive
            self._ending = close
            self._push(_slot(close=close, slow=(
                self._method, self._url, self._version, self._headers, body)))
            self._flush()
            return
        slot = _Slot()
        slot.protocol = self
        if not keep_alive:
            slot.close = True
            self._ending = True
        if self._version == "1.0" and keep_alive:
            slot.keep_alive_10 = True
        if self._method == b"HEAD":
            slot.head = True
        pending = self._pending
        pending.append(slot)
        if len(pending) > MAX_PIPELINED and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        now = self._seconds()
        # tuple.__new__: an IngestRequest without the Python-level __new__.
        answer = route(_new_tuple(IngestRequest, (self._method, self._path, self._query,
                                                  self._headers, body, self.peer, now)), slot)
        if answer is None:
            return
        # Decided at once (the common case): no callback.
        if (pending[0] is slot and len(pending) == 1 and not slot.close
                and not slot.keep_alive_10 and not slot.head and not self._paused
                and not factory.draining):
            # The only answer due, on a connection that stays: written at
            # once, its bytes those kept for this second (FastHTTPFactory.rendered).
            pending.clear()
            if int(now) == factory._date_second:
                kept = factory._rendered.get(id(answer))
                data = kept[1] if kept is not None and kept[0] is answer else \
                    factory.rendered(answer, now)
            else:
                data = factory.rendered(answer, now)
            self.transport.write(data)
            if not self._in_message:
                timeout = factory.idle_timeout
                self.deadline = now + timeout if timeout else 0.0
            return
        self._answer(slot, answer, now)

    def _answer(self, slot: _Slot, answer: Answer, now: float) -> None:
        """
        C{slot}'s answer is C{answer}: write it now if it is the next due,
        else keep it until the answers before it are out.
        """
        factory = self.factory
        if factory.draining:
            slot.close = True
        close = slot.close
        if close or slot.keep_alive_10 or slot.head:
            data = factory.render(answer, close, slot.keep_alive_10, slot.head)
        else:
            data = factory.rendered(answer, now)
        pending = self._pending
        if pending and pending[0] is slot:
            if len(pending) == 1 and not close and not self._paused:
                # The common case: the only answer due, written at once.
                pending.clear()
                self.transport.write(data)
                if not self._in_message:
                    self._idle(now)
                return
            slot.data = data
            self._flush()
        else:
            slot.data = data

    @staticmethod
    def _serialise(request: tuple, close: bool) -> bytes:
        """
        A request llhttp framed, for the twisted.web channel: its own
        fields in order, the body as a C{Content-Length} body, and
        C{Connection: close} when the connection ends after it.
        """
        method, url, version, headers, body = request
        parts = [b"%s %s HTTP/%s\r\n" % (method, url, version.encode("ascii"))]
        for name, value in headers.items():
            if name in _FRAMING or (close and name == b"connection"):
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        if close:
            parts.append(b"connection: close\r\n")
        if body or method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        parts.append(body)
        return b"".join(parts)

    # --- IPushProducer, for the transport ---

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if not self._paused and not self._broken:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # --- answers out, in order ---

    def _push(self, slot: _Slot) -> None:
        pending = self._pending
        pending.append(slot)
        if len(pending) > MAX_PIPELINED and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _flush(self) -> None:
        pending = self._pending
        transport = self.transport
        while pending:
            slot = pending[0]
            if slot.slow is not None:
                if not self._slow_busy:
                    self._start_slow(slot)
                return
            if slot.data is None:
                return
            pending.popleft()
            transport.write(slot.data)
            if slot.close:
                self._close_after_answers()
                return
        if self._paused and not self._broken:
            self._paused = False
            if not self._write_blocked:
                transport.resumeProducing()
        if not self._in_message and not self._broken:
            self._idle(self._seconds())

    def _start_slow(self, slot: _Slot) -> None:
        channel = self._channel
        if channel is None:
            channel = self._channel = _RouteChannel()
            channel.owner = self
            site = self.factory.route_site
            channel.site = channel.factory = site
            channel.requestFactory = site.requestFactory
            channel.callLater = self.factory.clock.callLater
            channel.timeOut = None
            channel.makeConnection(_ChannelTransport(self))
        self._slow_busy = True
        request, slot.slow = slot.slow, None
        close = slot.close or self.factory.draining
        slot.close = close
        channel.dataReceived(self._serialise(request, close))

    def _slow_done(self) -> None:
        self._slow_busy = False
        if self._pending:
            slot = self._pending.popleft()
            if slot.close or self.factory.draining:
                self._close_after_answers()
                return
        if self._pending:
            # Go on in the next reactor turn: a pipeline of /metrics
            # requests must not keep every other connection waiting.
            self._slow_busy = True
            self.factory.clock.callLater(0, self._resume_after_slow)
            return
        self._flush()

    def _resume_after_slow(self) -> None:
        self._slow_busy = False
        if not self._broken:
            self._flush()

    def _channel_closes(self) -> None:
        # The twisted.web channel decided the connection ends (HTTP/1.0,
        # Connection: close): end it once its answer is out.
        self._pending.clear()
        self._close_after_answers()

    def _close_after_answers(self) -> None:
        self._broken = True
        self.deadline = 0.0
        self._pending.clear()
        self.transport.loseConnection()

    def _refuse(self, status: int, body: bytes) -> None:
        """
        Answer C{status} after the answers already due, and close: the
        write side first, the socket a second later, so that the client
        reads the answer rather than a reset while it is still sending.
        """
        self._broken = True
        self.deadline = 0.0
        factory = self.factory
        data = factory.render(Answer(status, _JSON_ONLY, body), True, False, False)
        pending = self._pending
        if not pending or all(s.data is not None for s in pending):
            transport = self.transport
            for slot in pending:
                transport.write(slot.data)
            pending.clear()
            transport.write(data)
            transport.pauseProducing()  # nothing more is read
            try:
                transport.loseWriteConnection()
            except (AttributeError, NotImplementedError):
                transport.loseConnection()
            factory.clock.callLater(1.0, transport.abortConnection)
        else:
            # Earlier answers are still to come: queue the refusal behind them.
            pending.append(_slot(data, close=True))
            self._broken = True

    # --- shutdown ---

    def close_when_idle(self) -> bool:
        """
        The listener is stopping: close now if idle (C{True}), else after
        the answers due (their C{Connection: close}).
        """
        if not self._pending and not self._in_message:
            self.transport.loseConnection()
            return True
        if self._channel is not None:
            for request in self._channel.requests:
                if not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        for slot in self._pending:
            slot.close = True
        return False


# Not a decorator: a compiled (cdef) class takes none.
classImplements(FastHTTPProtocol, IProtocol, ILoggingContext)

#: A request line with a method llhttp does not know (BREW), as opposed to garbage.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[01]\r\n")

_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"expect"))
_JSON_ONLY = ((b"content-type", b"application/json"),)
_HEADERS_TOO_LARGE = _json_error("request header fields too large",
                                 limit=MAX_HEADER_BYTES, max_fields=MAX_HEADER_FIELDS)
_URI_TOO_LONG = _json_error("request target too long", limit=MAX_TARGET_BYTES)


def _too_large(limit: int) -> bytes:
    return b'{"error":"request body too large","limit":%d}' % limit


def _reason(error: Exception) -> str:
    text = str(error)
    return text[:120] if text else type(error).__name__


def _origin_form(target: bytes) -> bytes:
    """
    C{/path?query} of an absolute-form target (C{http://host/path}); a
    target that is neither (C{*}) stays as it is.
    """
    lower = target[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash < 0 or (0 <= query < slash):
            return b"/" + (rest[query:] if query >= 0 else b"")
        return rest[slash:]
    return target


class FastHTTPFactory(Factory):
    """
    Builds the connections of one listener and keeps what they share: the
    routes, the limits, the cached C{Date}, the deadline sweep, and the
    set of open connections a shutdown closes.

    @ivar routes: path to ingest handler (L{estat.ingest.core.IngestCore.handle}, ...):
        C{handler(request, respond)} returns the L{Answer} when it is decided
        at once, or C{None} and calls C{respond(answer)} exactly once.
    @ivar resource: the Klein resource for every other path.
    """

    protocol = FastHTTPProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        routes: Mapping[bytes, Callable],
        resource,
        clock: IReactorTime,
        max_body_size: int,
        idle_timeout: float | None = 75.0,
        request_timeout: float | None = None,
        max_connections: int | None = None,
        on_too_large: Callable[[], None] = lambda: None,
        on_timeout: Callable[[], None] = lambda: None,
        on_refused: Callable[[], None] = lambda: None,
        on_protocol_error: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.routes = dict(routes)
        self.clock = clock
        self.route_site = _RouteSite(resource, reactor=clock)
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.on_too_large = on_too_large
        self.on_timeout = on_timeout
        self.on_refused = on_refused
        self.on_protocol_error = on_protocol_error
        self.channels: set = set()
        self.draining = False
        self._all_closed: list = []
        self._date_second = -1
        self._date = b""
        self._rendered: dict = {}
        self._sweep: LoopingCall | None = None
        timeouts = [t for t in (idle_timeout, request_timeout) if t]
        self.sweep_interval = min([1.0] + [t / 4 for t in timeouts])

    # --- the listener's life ---

    def startFactory(self) -> None:
        if self._sweep is None:
            self._sweep = LoopingCall(self.sweep)
            self._sweep.clock = self.clock
            self._sweep.start(self.sweep_interval, now=False)

    def stopFactory(self) -> None:
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None

    def buildProtocol(self, addr):
        if self.max_connections is not None and len(self.channels) >= self.max_connections:
            # Returning None makes Twisted close the new socket at once.
            self.on_refused()
            return None
        return super().buildProtocol(addr)

    def sweep(self) -> None:
        """
        Every connection whose deadline has passed: 408 for a request
        still arriving, close for an idle one.
        """
        try:
            now = self.clock.seconds()
            for protocol in [p for p in self.channels if p.deadline and p.deadline <= now]:
                protocol.deadline_passed(now)
        except Exception:
            self.log.failure("error in the HTTP deadline sweep")

    # --- answers ---

    def date_header(self, now: float) -> bytes:
        second = int(now)
        if second != self._date_second:
            self._date = b"Date: " + email.utils.formatdate(
                second, usegmt=True).encode("ascii") + b"\r\n"
            self._date_second = second
        return self._date

    def rendered(self, answer: Answer, now: float) -> bytes:
        """
        L{render} of C{answer} on a keep-alive connection, at C{now}: the
        bytes are kept for the rest of the second (the C{Date} changes with
        it), so an answer object the core hands out again (its 202s) is
        rendered once a second.
        """
        if int(now) != self._date_second:
            self._rendered.clear()
            self.date_header(now)
        kept = self._rendered.get(id(answer))
        if kept is not None and kept[0] is answer:
            return kept[1]
        data = self.render(answer, False, False, False, now)
        if len(self._rendered) < 64:
            # The answer is kept with its bytes: its id cannot be reused.
            self._rendered[id(answer)] = (answer, data)
        return data

    def render(self, answer: Answer, close: bool, keep_alive_10: bool, head: bool,
               now: float | None = None) -> bytes:
        """
        The bytes of C{answer}: status line, C{Date}, C{Content-Length},
        its fields, C{Connection} when it matters, and the body.
        """
        body = answer.body
        headers = answer.headers
        block = _HEADER_BLOCKS.get(headers)
        if block is None:
            block = b"".join(_field_name(name) + b": " + value + b"\r\n"
                             for name, value in headers)
            if len(_HEADER_BLOCKS) < 1024:
                _HEADER_BLOCKS[headers] = block
        if close:
            block += b"Connection: close\r\n"
        elif keep_alive_10:
            block += b"Connection: keep-alive\r\n"
        length = b"" if answer.status == 204 else b"Content-Length: %d\r\n" % len(body)
        if now is None:
            now = self.clock.seconds()
        return b"".join((_status_line(answer.status), self.date_header(now),
                         length, block, b"\r\n", b"" if head else body))

    # --- shutdown ---

    def channel_closed(self) -> None:
        if not self.channels:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def close_connections(self):
        """
        Begin draining: idle connections close now, busy ones after their
        answers (with C{Connection: close}).  Fires when none is left.
        """
        self.draining = True
        for protocol in list(self.channels):
            protocol.close_when_idle()
        d = Deferred()
        if self.channels:
            self._all_closed.append(d)
        else:
            d.callback(None)
        return d

    def abort_connections(self) -> None:
        for protocol in list(self.channels):
            protocol.transport.abortConnection()
