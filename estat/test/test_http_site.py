# -*- test-case-name: estat.test.test_http_site -*-
"""
Tests for L{estat.http.site}'s listener service (with a fake endpoint and
port and a L{Clock}) and for what L{estat.http.protocol}'s factory keeps of
the old twisted.web site's promises on the routes it hands to twisted.web
(body caps, no form parsing, graceful close), driven byte by byte over
L{StringTransport}s.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from estat.http.protocol import FastHTTPFactory
from estat.http.site import HTTPListenerService


class RecordingResource(Resource):
    """
    A leaf resource that records what it was given; with C{hold}, it
    leaves the response open for the test to finish.
    """

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.seen: list = []
        self.held: list = []

    def render(self, request):
        self.seen.append({
            "method": request.method,
            "path": request.path,
            "body": request.content.read(),
            "args": dict(request.args),
        })
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"


def post(path: bytes, body: bytes, headers: dict | None = None) -> bytes:
    headers = {b"Host": b"estat.example", b"Content-Length": b"%d" % len(body),
               **(headers or {})}
    head = b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers.items())
    return b"POST " + path + b" HTTP/1.1\r\n" + head + b"\r\n" + body


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: estat.example\r\n\r\n"


def parse_response(data: bytes):
    """
    Status code, headers (lower-cased names) and body of one response.
    """
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return code, headers, body


class SiteTestsMixin:
    def make_site(self, max_body_size=100, hold=False):
        self.clock = Clock()
        self.resource = RecordingResource(hold=hold)
        self.too_large_calls = []
        self.site = FastHTTPFactory(
            routes={}, resource=self.resource, clock=self.clock,
            max_body_size=max_body_size,
            on_too_large=lambda: self.too_large_calls.append(1))
        return self.site

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def lose(self, channel):
        """
        What the reactor does once a closed transport is gone.
        """
        channel.connectionLost(Failure(ConnectionDone()))


class BodyLimitTests(SiteTestsMixin, SynchronousTestCase):
    def test_content_length_too_large_refused_before_body(self):
        """
        A C{Content-Length} above the limit is answered 413 as soon as the
        headers are in, before any body byte is sent; the connection is
        closed and aborted a moment later.
        """
        self.make_site(max_body_size=100)
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
        code, headers, body = parse_response(transport.value())
        self.assertEqual(code, 413)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(int(headers[b"content-length"][0]), len(body))
        error = json.loads(body)
        self.assertIn("error", error)
        self.assertEqual(error["limit"], 100)
        self.assertEqual(self.too_large_calls, [1])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.seen, [])

        answered = transport.value()
        channel.dataReceived(b"x" * 101)
        self.assertEqual(transport.value(), answered)
        self.assertEqual(self.too_large_calls, [1])
        self.assertEqual(self.resource.seen, [])
        self.assertEqual(channel._body, [])

        self.assertFalse(transport.disconnected)
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnected)

    def test_chunked_body_refused_when_it_passes_limit(self):
        """
        A chunked body is refused with 413 the moment it passes the limit;
        no more than the limit is kept.
        """
        self.make_site(max_body_size=10)
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"6\r\nabcdef\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"4\r\nghij\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.too_large_calls, [])

        channel.dataReceived(b"1\r\nk\r\n")
        code, headers, body = parse_response(transport.value())
        self.assertEqual(code, 413)
        self.assertEqual(json.loads(body)["limit"], 10)
        self.assertEqual(self.too_large_calls, [1])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(b"".join(channel._body), b"abcdefghij")

        answered = transport.value()
        channel.dataReceived(b"10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n")
        self.assertEqual(transport.value(), answered)
        self.assertEqual(self.too_large_calls, [1])
        self.assertEqual(self.resource.seen, [])
        self.assertEqual(b"".join(channel._body), b"abcdefghij")

    def test_body_at_limit_accepted(self):
        """
        A body of exactly C{max_body_size} bytes reaches the resource.
        """
        self.make_site(max_body_size=10)
        channel, transport = self.connect()
        channel.dataReceived(post(b"/collect", b"0123456789"))
        code, _, body = parse_response(transport.value())
        self.assertEqual(code, 200)
        self.assertEqual(self.resource.seen[0]["body"], b"0123456789")
        self.assertEqual(self.too_large_calls, [])
        self.assertFalse(transport.disconnecting)

    def test_chunked_body_at_limit_accepted(self):
        self.make_site(max_body_size=10)
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n")
        code, _, _ = parse_response(transport.value())
        self.assertEqual(code, 200)
        self.assertEqual(self.resource.seen[0]["body"], b"abcdefghij")
        self.assertEqual(self.too_large_calls, [])

    def test_one_call_per_refused_request(self):
        """
        C{on_too_large} runs once for each refused request.
        """
        self.make_site(max_body_size=5)
        for _ in range(3):
            channel, transport = self.connect()
            channel.dataReceived(post(b"/collect", b"123456"))
            self.assertEqual(parse_response(transport.value())[0], 413)
        self.assertEqual(self.too_large_calls, [1, 1, 1])
        self.assertEqual(self.resource.seen, [])


class FormTests(SiteTestsMixin, SynchronousTestCase):
    def test_form_body_not_parsed(self):
        """
        A POST with a form content type is not parsed into
        C{request.args}; its body is left intact.
        """
        self.make_site()
        channel, transport = self.connect()
        channel.dataReceived(post(
            b"/collect", b"a=1&b=2",
            {b"Content-Type": b"application/x-www-form-urlencoded"}))
        self.assertEqual(parse_response(transport.value())[0], 200)
        [seen] = self.resource.seen
        self.assertEqual(seen["args"], {})
        self.assertEqual(seen["body"], b"a=1&b=2")

    def test_plain_site_would_parse(self):
        """
        (Control.)  Twisted's own L{Site} does parse such a body, so the
        test above does show a difference.
        """
        self.clock = Clock()
        self.resource = RecordingResource()
        self.site = Site(self.resource, reactor=self.clock)
        channel, transport = self.connect()
        channel.dataReceived(post(
            b"/collect", b"a=1&b=2",
            {b"Content-Type": b"application/x-www-form-urlencoded"}))
        [seen] = self.resource.seen
        self.assertEqual(seen["args"], {b"a": [b"1"], b"b": [b"2"]})

    def test_query_string_still_parsed(self):
        self.make_site()
        channel, transport = self.connect()
        channel.dataReceived(get(b"/x?a=1"))
        self.assertEqual(self.resource.seen[0]["args"], {b"a": [b"1"]})


class CloseConnectionsTests(SiteTestsMixin, SynchronousTestCase):
    def test_no_connections(self):
        self.make_site()
        self.successResultOf(self.site.close_connections())
        self.assertTrue(self.site.draining)

    def test_idle_keep_alive_closed_at_once(self):
        """
        A keep-alive connection between requests is closed at once.
        """
        self.make_site()
        channel, transport = self.connect()
        channel.dataReceived(get(b"/a"))
        self.assertEqual(parse_response(transport.value())[0], 200)
        self.assertFalse(transport.disconnecting)
        never_used, never_used_transport = self.connect()

        d = self.site.close_connections()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(never_used_transport.disconnecting)
        self.assertNoResult(d)
        self.lose(channel)
        self.assertNoResult(d)
        self.lose(never_used)
        self.successResultOf(d)
        self.assertEqual(self.site.channels, set())

    def test_busy_connection_closes_after_response(self):
        """
        A connection whose request is being handled is not cut: its
        response goes out whole and the connection is closed after it.
        """
        self.make_site(hold=True)
        channel, transport = self.connect()
        channel.dataReceived(post(b"/collect", b"{}"))
        [request] = self.resource.held

        d = self.site.close_connections()
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)

        request.write(b"done")
        request.finish()
        code, headers, body = parse_response(transport.value())
        self.assertEqual(code, 200)
        self.assertIn(b"done", body)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        self.lose(channel)
        self.successResultOf(d)

    def test_busy_connection_response_says_close(self):
        """
        The response of a request in flight when draining began carries
        C{Connection: close}, so the client knows not to reuse the
        connection.
        """
        self.make_site(hold=True)
        channel, transport = self.connect()
        channel.dataReceived(post(b"/collect", b"{}"))
        [request] = self.resource.held
        self.site.close_connections()
        request.write(b"done")
        request.finish()
        code, headers, _ = parse_response(transport.value())
        self.assertEqual(code, 200)
        self.assertEqual(headers.get(b"connection"), [b"close"])

    def test_request_arriving_while_draining(self):
        """
        A request whose headers were still arriving when draining began is
        answered with C{Connection: close}, and the connection then closes.
        """
        self.make_site()
        channel, transport = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\n")
        d = self.site.close_connections()
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"Host: x\r\n\r\n")
        code, headers, _ = parse_response(transport.value())
        self.assertEqual(code, 200)
        self.assertEqual(headers.get(b"connection"), [b"close"])
        self.assertTrue(transport.disconnecting)
        self.lose(channel)
        self.successResultOf(d)

    def test_abort_connections(self):
        self.make_site(hold=True)
        channel, transport = self.connect()
        channel.dataReceived(post(b"/collect", b"{}"))
        self.site.abort_connections()
        self.assertTrue(transport.disconnected)


class FakePort:
    def __init__(self, events: list) -> None:
        self.events = events
        self.stopped = Deferred()

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def stopListening(self) -> Deferred:
        self.events.append("stopListening")
        return self.stopped


class FakeEndpoint:
    def __init__(self, events: list, error: Exception | None = None) -> None:
        self.events = events
        self.error = error
        self.factories: list = []
        self.port = FakePort(events)

    def listen(self, factory):
        self.events.append("listen")
        self.factories.append(factory)
        if self.error is not None:
            return fail(self.error)
        return succeed(self.port)


class ListenerServiceTests(SiteTestsMixin, SynchronousTestCase):
    def make_service(self, grace=5.0, hold=True, error=None):
        self.make_site(hold=hold)
        self.events: list = []
        self.endpoint = FakeEndpoint(self.events, error)
        self.service = HTTPListenerService(
            endpoint=self.endpoint, site=self.site, clock=self.clock, grace=grace,
            on_stopping=lambda: self.events.append("on_stopping"))
        return self.service

    def test_listens_on_start(self):
        self.make_service()
        self.service.startService()
        self.assertEqual(self.endpoint.factories, [self.site])
        self.assertIs(self.service.port, self.endpoint.port)
        self.assertTrue(self.service.running)

    def test_listen_failure_fails_start(self):
        """
        A port that cannot be listened on makes start-up fail.
        """
        self.make_service(error=CannotListenError("127.0.0.1", 8080, OSError("in use")))
        self.assertRaises(CannotListenError, self.service.startService)
        self.assertFalse(self.service.running)

    def test_stop_order_and_grace(self):
        """
        Stopping calls C{on_stopping}, stops listening, and only then closes
        connections: idle ones at once, busy ones after C{grace} seconds.
        """
        self.make_service(grace=5.0)
        self.service.startService()
        idle, idle_transport = self.connect()
        busy, busy_transport = self.connect()
        busy.dataReceived(post(b"/collect", b"{}"))

        d = self.service.stopService()
        self.assertEqual(self.events, ["listen", "on_stopping", "stopListening"])
        self.assertFalse(self.service.running)
        # The listener has not stopped yet: connections are untouched.
        self.assertFalse(self.site.draining)
        self.assertFalse(idle_transport.disconnecting)
        self.clock.advance(10)
        self.assertFalse(busy_transport.disconnecting)

        self.endpoint.port.stopped.callback(None)
        self.assertTrue(self.site.draining)
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        self.lose(idle)
        self.assertNoResult(d)

        self.clock.advance(4.9)
        self.assertFalse(busy_transport.disconnected)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTrue(busy_transport.disconnected)
        # The aborted connection reports its loss: the stop completes.
        self.lose(busy)
        self.successResultOf(d)

    def test_stop_completes_even_if_abort_is_not_reported(self):
        """
        An aborted connection whose loss is never reported does not hold
        the stop forever.
        """
        self.make_service(grace=5.0)
        self.service.startService()
        busy, busy_transport = self.connect()
        busy.dataReceived(post(b"/collect", b"{}"))
        self.endpoint.port.stopped.callback(None)
        d = self.service.stopService()
        self.clock.advance(5.0)
        self.assertTrue(busy_transport.disconnected)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.successResultOf(d)

    def test_stop_completes_when_last_connection_closes(self):
        """
        When every connection closes within the grace period the stop
        completes then, and no abort is left scheduled.
        """
        self.make_service(grace=5.0)
        self.service.startService()
        self.endpoint.port.stopped.callback(None)
        busy, busy_transport = self.connect()
        busy.dataReceived(post(b"/collect", b"{}"))
        [request] = self.resource.held

        d = self.service.stopService()
        self.clock.advance(2)
        self.assertNoResult(d)
        request.write(b"ok")
        request.finish()
        self.assertTrue(busy_transport.disconnecting)
        self.lose(busy)
        self.successResultOf(d)
        self.assertFalse(busy_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_without_connections(self):
        self.make_service()
        self.service.startService()
        self.endpoint.port.stopped.callback(None)
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

