# -*- test-case-name: estat.test.test_http_protocol -*-
"""
Tests for L{estat.http.protocol}: the httptools protocol driven byte by
byte over L{StringTransport}s with a L{Clock}; handlers are plain
functions, the other routes a twisted.web resource.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from estat.http.protocol import MAX_HEADER_BYTES, MAX_TARGET_BYTES, FastHTTPFactory
from estat.ingest.core import Answer


class Pages(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def render(self, request):
        self.seen.append((request.method, request.uri, request.content.read()))
        request.setHeader(b"content-type", b"text/plain")
        return b"page " + request.path


def parse_all(data: bytes) -> list:
    """
    Every response in C{data}: C{(status, headers, body)}, bodies framed
    by C{Content-Length}.
    """
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.handled: list = []
        self.held: list = []
        self.hold = False
        self.pages = Pages()
        self.errors: list = []
        self.timeouts: list = []
        self.factory = FastHTTPFactory(
            routes={b"/collect": self.handler}, resource=self.pages, clock=self.clock,
            max_body_size=100, idle_timeout=60.0, request_timeout=10.0,
            on_timeout=lambda: self.timeouts.append(1),
            on_protocol_error=self.errors.append)
        self.factory.startFactory()
        self.addCleanup(self.factory.stopFactory)

    def handler(self, request, respond) -> None:
        self.handled.append(request)
        if self.hold:
            self.held.append(respond)
            return
        respond(Answer(202, ((b"content-type", b"application/json"),),
                       b'{"n":%d}' % len(self.handled)))

    def connect(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
        protocol.makeConnection(transport)
        return protocol, transport

    def exchange(self, data: bytes):
        protocol, transport = self.connect()
        protocol.dataReceived(data)
        return parse_all(transport.value()), transport

    def test_collect_is_served_by_the_handler(self):
        """
        The handler gets the request as an L{IngestRequest}: method, path,
        query, lower-case header names, body, peer and time.
        """
        [(status, headers, body)], transport = self.exchange(
            b"POST /collect?write_key=k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n"
            b"Content-Length: 7\r\n\r\n{\"a\":1}")
        self.assertEqual((status, body), (202, b'{"n":1}'))
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"date"], b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertNotIn(b"connection", headers)
        [request] = self.handled
        self.assertEqual((request.method, request.path, request.query),
                         (b"POST", b"/collect", b"write_key=k"))
        self.assertEqual(request.headers[b"content-type"], b"text/plain")
        self.assertEqual(request.headers[b"x-forwarded-for"], b"1.1.1.1, 2.2.2.2")
        self.assertEqual(request.body, b'{"a":1}')
        self.assertEqual(request.peer, "192.0.2.9")
        self.assertEqual(request.received_at, 1700000000)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.pages.seen, [])

    def test_answer_written_in_one_write(self):
        protocol, transport = self.connect()
        writes = []
        transport.write = writes.append
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(len(writes), 1)

    def test_returned_answer(self):
        """
        A handler may return its answer instead of calling C{respond}: it
        is written at once, and an answer object returned again within the
        same second is the same bytes; the next second brings its C{Date}.
        """
        answer = Answer(202, ((b"content-type", b"application/json"),), b'{"accepted":1}')
        self.factory.routes[b"/collect"] = lambda request, respond: answer
        protocol, transport = self.connect()
        post = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        protocol.dataReceived(post)
        first = transport.value()
        transport.clear()
        self.clock.advance(0.5)
        protocol.dataReceived(post)
        self.assertEqual(transport.value(), first)
        transport.clear()
        self.clock.advance(0.5)
        protocol.dataReceived(post)
        [(status, headers, body)] = parse_all(transport.value())
        self.assertEqual((status, body), (202, b'{"accepted":1}'))
        self.assertEqual(headers[b"date"], b"Tue, 14 Nov 2023 22:13:21 GMT")
        [(_, headers, _)] = parse_all(first)
        self.assertEqual(headers[b"date"], b"Tue, 14 Nov 2023 22:13:20 GMT")

    def test_returned_answer_framing(self):
        """
        A returned answer to HEAD, to an HTTP/1.0 keep-alive request or to
        one that closes the connection is framed for that request, not
        taken from the kept bytes.
        """
        answer = Answer(202, ((b"content-type", b"application/json"),), b'{"accepted":1}')
        self.factory.routes[b"/collect"] = lambda request, respond: answer
        [(status, headers, body)], _ = self.exchange(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertNotIn(b"connection", headers)
        [(status, headers, body)], transport = self.exchange(
            b"POST /collect HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(headers[b"connection"], b"keep-alive")
        self.assertFalse(transport.disconnecting)
        [(status, headers, body)], transport = self.exchange(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 2\r\n\r\n{}")
        self.assertEqual((status, headers[b"connection"]), (202, b"close"))
        self.assertTrue(transport.disconnecting)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HEAD /collect HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"), transport.value())
        self.assertIn(b"Content-Length: 14\r\n", transport.value())

    def test_chunked_body(self):
        self.exchange(b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(self.handled[0].body, b"abcde")

    def test_absolute_form(self):
        [(status, _, _)], _ = self.exchange(
            b"POST http://estat.example:8080/collect?a=1 HTTP/1.1\r\nHost: estat.example\r\n"
            b"Content-Length: 2\r\n\r\n{}")
        self.assertEqual(status, 202)
        self.assertEqual((self.handled[0].path, self.handled[0].query), (b"/collect", b"a=1"))

    def test_other_paths_go_to_twisted_web(self):
        """
        Any other path is served by the resource through twisted.web, on
        the same connection, with its own headers.
        """
        responses, transport = self.exchange(
            b"GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual([(s, b) for s, _, b in responses],
                         [(200, b"page /healthz"), (200, b"page /elsewhere")])
        self.assertEqual(responses[0][1][b"content-type"], b"text/plain")
        self.assertEqual(self.pages.seen, [(b"GET", b"/healthz?x=1", b""),
                                           (b"POST", b"/elsewhere", b"hi")])
        self.assertFalse(transport.disconnecting)

    def test_pipelined_answers_in_order(self):
        """
        Pipelined requests to both front ends are answered in order, even
        when the handler answers late.
        """
        self.hold = True
        protocol, transport = self.connect()
        post = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        protocol.dataReceived(post + b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + post)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.held), 2)
        second = self.held[1]
        second(Answer(202, (), b"second"))
        self.assertEqual(transport.value(), b"")
        self.held[0](Answer(202, (), b"first"))
        self.assertEqual([b for _, _, b in parse_all(transport.value())],
                         [b"first", b"page /a"])
        # The answers after a twisted.web route go out in the next turn.
        self.clock.advance(0)
        self.assertEqual([b for _, _, b in parse_all(transport.value())],
                         [b"first", b"page /a", b"second"])

    def test_late_answer_after_disconnect_is_dropped(self):
        self.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.held[0](Answer(202, (), b"late"))
        self.assertEqual(transport.value(), b"")

    def test_expect_100_continue(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 2\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"{}")
        self.assertEqual(parse_all(transport.value()[25:])[0][0], 202)

    def test_expect_with_too_large_body(self):
        """
        A body over the limit with C{Expect: 100-continue}: the final 413,
        no 100, nothing read.
        """
        [(status, headers, body)], transport = self.exchange(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 101\r\n\r\n")
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["limit"], 100)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_content_length_at_the_limit(self):
        """
        The body limit (100 here) is decided on the Content-Length's
        value, whatever its digits: leading zeros and trailing spaces
        included.
        """
        for length, status in ((b"99", 202), (b"100", 202), (b"101", 413), (b"0100", 202),
                               (b"00101", 413), (b"0000000000000000000002", 202),
                               (b"7  ", 202), (b"1000", 413), (b"9999999999", 413)):
            body = b"{}" if status == 202 else b""
            data = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n%s"
                    % (length, body))
            protocol, transport = self.connect()
            protocol.dataReceived(data)
            if status == 202 and int(length) != 2:
                # the body is still arriving: no answer yet
                self.assertEqual(transport.value(), b"", length)
                continue
            [(got, _, _)] = parse_all(transport.value())
            self.assertEqual(got, status, length)

    def test_http10(self):
        """
        HTTP/1.0 closes after the answer unless keep-alive was asked for.
        """
        [(_, headers, _)], transport = self.exchange(
            b"POST /collect HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        [(_, headers, _)], transport = self.exchange(
            b"POST /collect HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(headers[b"connection"], b"keep-alive")
        self.assertFalse(transport.disconnecting)

    def test_http10_keep_alive_on_twisted_web_routes(self):
        """
        An HTTP/1.0 client that asks for keep-alive keeps its connection on
        the twisted.web routes too: the answer has a length and says so.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                              b"POST /collect HTTP/1.0\r\nConnection: keep-alive\r\n"
                              b"Content-Length: 2\r\n\r\n{}")
        [(_, first, body), (status, second, _)] = parse_all(transport.value())
        self.assertEqual((body, first[b"connection"], first[b"content-length"]),
                         (b"page /healthz", b"keep-alive", b"13"))
        self.assertEqual((status, second[b"connection"]), (202, b"keep-alive"))
        self.assertFalse(transport.disconnecting)

    def test_head_has_no_body(self):
        [(status, headers, body)], _ = self.exchange(
            b"HEAD /collect HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(body, b"")
        self.assertEqual(headers[b"content-length"], b'%d' % len(b'{"n":1}'))

    def assertRefused(self, data: bytes, status: int, reason: str | None = "bad_request"):
        """
        C{data} is refused with C{status} and a JSON body, the connection
        closes, and a valid request smuggled after it is never served.
        """
        smuggled = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        responses, transport = self.exchange(data + smuggled)
        self.assertEqual([s for s, _, _ in responses], [status], (data, responses))
        [(_, headers, body)] = responses
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertIn("error", json.loads(body))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.handled, [])
        if reason is not None:
            self.assertEqual(self.errors[-1], reason)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_framing_errors_are_400(self):
        head = b"POST /collect HTTP/1.1\r\nHost: x\r\n"
        for bad in [
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n",
            b"Transfer-Encoding: chunked, gzip\r\n\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"Transfer-Encoding: foo\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"X-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
            b"X-A: b\x00c\r\nContent-Length: 0\r\n\r\n",
            b"X-A : b\r\nContent-Length: 0\r\n\r\n",
            b"Content-Length: +2\r\n\r\n{}",
            b"Content-Length: -2\r\n\r\n{}",
        ]:
            self.assertRefused(head + bad, 400)

    def test_host_required(self):
        self.assertRefused(b"POST /collect HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400)
        self.assertRefused(b"GET /healthz HTTP/1.1\r\n\r\n", 400)
        self.assertRefused(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)

    def test_upgrades_refused(self):
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                           b"Upgrade: websocket\r\n\r\n", 400, "upgrade_refused")
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n", 400,
                           "upgrade_refused")
        self.assertRefused(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501,
                           "upgrade_refused")

    def test_http2_preface(self):
        self.assertRefused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400)

    def test_unknown_method(self):
        self.assertRefused(b"BREW /collect HTTP/1.1\r\nHost: x\r\n\r\n", 501, "unknown_method")

    def test_header_section_too_large(self):
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * MAX_HEADER_BYTES
                           + b"\r\n\r\n", 431, "header_too_large")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n", 431,
                           "header_too_large")

    def test_header_line_without_end_is_bounded(self):
        """
        A header value that never ends is refused once the header section
        passes the limit, however it trickles in.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(MAX_HEADER_BYTES // 1000 + 1):
            protocol.dataReceived(b"v" * 1000)
        [(status, _, _)] = parse_all(transport.value())
        self.assertEqual(status, 431)

    def test_target_too_long(self):
        self.assertRefused(b"GET /" + b"a" * MAX_TARGET_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                           414, "uri_too_long")

    def test_chunked_body_cut_at_limit(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        protocol.dataReceived(b"64\r\n" + b"a" * 100 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"1\r\nb\r\n")
        [(status, _, _)] = parse_all(transport.value())
        self.assertEqual(status, 413)
        self.assertLessEqual(sum(map(len, protocol._body)), 100)

    def test_request_timeout_from_first_byte(self):
        """
        A request must arrive within C{request_timeout} of its first byte,
        however slowly it trickles: 408, then close.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"P")
        for _ in range(9):
            self.clock.advance(1)
            protocol.dataReceived(b"O" if _ == 0 else b"")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1.5)
        [(status, headers, body)] = parse_all(transport.value())
        self.assertEqual(status, 408)
        self.assertIn("error", json.loads(body))
        self.assertEqual(self.timeouts, [1])
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timeouts, [])

    def test_idle_after_a_request_in_two_reads(self):
        """
        A request that arrived in two reads, answered at once (its answer
        returned), leaves the connection idle: closed after the idle
        timeout without a 408; a request begun in the read that completed
        another gets its own request deadline.
        """
        answer = Answer(202, ((b"content-type", b"application/json"),), b"{}")
        self.factory.routes[b"/collect"] = lambda request, respond: answer
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(5)
        protocol.dataReceived(b"Content-Length: 2\r\n\r\n{}")
        self.assertEqual(parse_all(transport.value())[0][0], 202)
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timeouts, [])
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                              b"POST /collect HTTP/1.1\r\n")
        self.clock.advance(11)
        self.assertEqual([a[0] for a in parse_all(transport.value())], [202, 408])
        self.assertEqual(self.timeouts, [1])

    def test_waiting_answer_is_not_idle(self):
        """
        A connection waiting for its answer is not closed as idle.
        """
        self.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.clock.advance(120)
        self.assertFalse(transport.disconnecting)
        self.held[0](Answer(202, (), b"ok"))
        self.assertEqual(parse_all(transport.value())[0][0], 202)

    def test_draining_answers_say_close(self):
        """
        Once draining, a waiting answer goes out with C{Connection: close}
        and the connection closes after it; idle ones close at once.
        """
        self.hold = True
        busy, busy_transport = self.connect()
        idle, idle_transport = self.connect()
        busy.dataReceived(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        d = self.factory.close_connections()
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        self.held[0](Answer(202, (), b"ok"))
        [(status, headers, _)] = parse_all(busy_transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(busy_transport.disconnecting)
        idle.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(d)
        busy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)

    def test_max_connections(self):
        refused = []
        factory = FastHTTPFactory(routes={}, resource=self.pages, clock=self.clock,
                                  max_body_size=10, max_connections=1,
                                  on_refused=lambda: refused.append(1))
        first = factory.buildProtocol(None)
        first.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual(refused, [1])

    def test_unread_answers_stop_reading(self):
        """
        A client that pipelines and never reads: once the transport's
        buffer is full it pauses the protocol, which stops reading; reading
        resumes when the buffer drains.
        """
        protocol, transport = self.connect()
        self.assertIs(transport.producer, protocol)
        protocol.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        protocol.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_nothing_after_a_closing_request_is_served(self):
        """
        Requests pipelined after one that ends the connection (HTTP/1.1
        C{Connection: close}, HTTP/1.0, and HTTP/1.0 to a twisted.web
        route) are never handled.
        """
        post = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        for first in (b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: 2\r\n\r\n{}",
                      b"POST /collect HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
                      b"GET /healthz HTTP/1.0\r\n\r\n"):
            self.handled[:] = []
            responses, transport = self.exchange(first + post)
            self.assertEqual(len(responses), 1, first)
            self.assertLessEqual(len(self.handled), 1, first)
            self.assertTrue(transport.disconnecting, first)

    def test_burst_across_heads_is_not_431(self):
        """
        One read that ends inside a header section after many pipelined
        requests does not count those requests against the section.
        """
        post = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"
                + b"{" + b" " * 58 + b"}")
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /collect HTTP/1.1\r\nHo")
        protocol.dataReceived(b"st: x\r\nContent-Length: 2\r\n\r\n{}" + post * 200
                              + b"POST /collect HTTP/1.1\r\nHo")
        protocol.dataReceived(b"st: x\r\nContent-Length: 2\r\n\r\n{}")
        statuses = [s for s, _, _ in parse_all(transport.value())]
        self.assertEqual(statuses, [202] * 202)


class HTTPVersionTests(SynchronousTestCase):
    """
    L{_http_version} gives what C{get_http_version} would, without asking
    it in the common case: checked on llhttp itself for every version it
    accepts, with and without each C{Connection} field.
    """

    def parsed(self, head: bytes):
        import httptools

        from estat.http.protocol import _http_version

        seen: dict = {}

        class Probe:
            def __init__(self) -> None:
                self.headers: dict = {}

            def on_header(self, name, value):
                self.headers[name.lower()] = value

            def on_headers_complete(self):
                seen["ours"] = _http_version(parser, self.headers)
                seen["llhttp"] = parser.get_http_version()

        parser = httptools.HttpRequestParser(Probe())
        parser.feed_data(head)
        return seen

    def test_same_as_llhttp(self):
        checked = 0
        for version in (b"0.9", b"1.0", b"1.1", b"2.0"):
            for connection in (None, b"close", b"keep-alive", b"upgrade", b"Keep-Alive, x",
                               b"CLOSE"):
                for method, body in ((b"POST", b"Content-Length: 2\r\n"), (b"GET", b"")):
                    head = b"%s /collect HTTP/%s\r\nHost: a\r\n%s" % (method, version, body)
                    if connection is not None:
                        head += b"Connection: " + connection + b"\r\n"
                    seen = self.parsed(head + b"\r\n")
                    self.assertEqual(seen["ours"], seen["llhttp"], head)
                    checked += 1
        self.assertEqual(checked, 48)

    def test_the_shortcut_is_taken(self):
        """
        HTTP/1.1 without a C{Connection} field is answered without the
        parser's C{get_http_version}.
        """
        from estat.http.protocol import _http_version

        class Parser:
            def should_keep_alive(self):
                return True

            def get_http_version(self):
                raise AssertionError("asked")

        self.assertEqual(_http_version(Parser(), {b"host": b"a"}), "1.1")

    def test_no_other_version_reaches_it(self):
        """
        The reasoning holds only while llhttp refuses every version but
        0.9, 1.0, 1.1 and 2.0 before the header section completes.
        """
        import httptools

        for version in (b"1.2", b"1.9", b"2.1", b"3.0", b"0.0", b"9.9"):
            parser = httptools.HttpRequestParser(self)
            with self.assertRaises(httptools.HttpParserError, msg=version):
                parser.feed_data(b"GET / HTTP/%s\r\nHost: a\r\n\r\n" % version)
