"""
Drive the httptools protocol (L{estat.http.protocol}) the way L{StubTreq}
drives a resource, so that a test of C{/collect} behaviour runs against
both front ends: a mixin whose C{request} sends the request's bytes to a
L{FastHTTPProtocol} over a L{StringTransport} (one connection per
request, peer 127.0.0.1, the test's L{Clock}) and parses the answer.

A test case class that builds C{self.core} (an L{IngestCore}),
C{self.api} (an L{IngestAPI}) and C{self.clock} in C{make_api} and sends
requests with C{self.request(method, path, body, headers)} gets its fast
twin as C{class XFastPathTests(FastPathRequests, XTests)}.

This module holds no tests.
"""

from __future__ import annotations

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from estat.http.protocol import FastHTTPFactory

__all__ = ["FastPathRequests", "FastPathResponse", "parse_response"]

HOST = b"estat.example"


@attr.s(frozen=True)
class FastPathResponse:
    """
    The parts of a treq response the tests read.
    """

    code: int = attr.ib()
    phrase: bytes = attr.ib()
    headers: Headers = attr.ib()
    body: bytes = attr.ib()


def parse_response(data: bytes, head: bool = False) -> tuple:
    """
    The one response at the start of C{data} (framed by C{Content-Length}
    or chunked; no body for C{head}, 1xx, 204, 304) and the bytes after it.
    """
    end = data.index(b"\r\n\r\n")
    lines = data[:end].split(b"\r\n")
    _, code, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
    code = int(code)
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, f"not a field line: {line!r}"
        headers.addRawHeader(name, value.strip(b" \t"))
    rest = data[end + 4:]
    if head or 100 <= code < 200 or code in (204, 304):
        return FastPathResponse(code, phrase, headers, b""), rest
    if headers.hasHeader(b"transfer-encoding"):
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                _, _, rest = rest.partition(b"\r\n")
                return FastPathResponse(code, phrase, headers, body), rest
            body += rest[:size]
            rest = rest[size + 2:]
    lengths = headers.getRawHeaders(b"content-length")
    assert lengths and len(lengths) == 1, f"no single Content-Length: {data[:300]!r}"
    length = int(lengths[0])
    assert len(rest) >= length, f"short body: {data[:300]!r}"
    return FastPathResponse(code, phrase, headers, rest[:length]), rest[length:]


def _header_lines(headers) -> list:
    lines = []
    for name, values in (headers or {}).items():
        if isinstance(values, (str, bytes)):
            values = [values]
        name = name.encode("latin-1") if isinstance(name, str) else name
        for value in values:
            value = value.encode("utf-8") if isinstance(value, str) else value
            lines.append(name + b": " + value)
    return lines


class FastPathRequests:
    """
    Mixin (first among the bases): C{request} goes through the httptools
    protocol instead of L{StubTreq}.  Returns C{(response, content)} as the
    StubTreq version does.
    """

    def fast_factory(self) -> FastHTTPFactory:
        return FastHTTPFactory(
            routes={b"/collect": self.core.handle},
            resource=self.api.resource(),
            clock=self.clock,
            max_body_size=self.core.limits.request_size,
        )

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        method = method.encode("ascii") if isinstance(method, str) else method
        target = path.encode("utf-8") if isinstance(path, str) else path
        target = b"/" + target.lstrip(b"/")
        lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: " + HOST,
                 *_header_lines(headers)]
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        data = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

        factory = self.fast_factory()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        written = transport.value()
        self.assertTrue(written, f"no answer to {data[:200]!r}")
        response, rest = parse_response(written, head=method == b"HEAD")
        self.assertEqual(rest, b"", f"more than one answer: {written[:500]!r}")
        protocol.connectionLost(None)
        return response, response.body
