# -*- test-case-name: estat.test.test_e2e_http_conformance -*-
"""
HTTP/1.1 conformance of the real C{twistd estat} process, byte for byte on
raw sockets: message framing and request smuggling (RFC 9112 sections 5,
6 and 7), the request line and C{Host} (section 3), size limits (431 and
414), pipelining, C{Expect: 100-continue}, HTTP/1.0 persistence,
C{Upgrade}, C{CONNECT} and an HTTP/2 preface, the connection limits and
timeouts, graceful shutdown, and the shape of every answer (C{Date},
C{Content-Length} or chunked, short JSON errors).

Each case is tried on C{/collect} (the hot path) and on a route that
twisted.web/Klein serves (C{/healthz}) wherever it applies: both share
one port and must behave alike.

Where RFC 9112 leaves a choice the tests accept every allowed answer
(400 or 505 for an HTTP/2 preface, a C{Connection: close} header or just
the close); where the project chose (obsolete line folding and a NUL in a
field are refused with 400 rather than replaced by spaces; C{Upgrade} is
refused rather than ignored) the tests hold it to that choice.

One server per test class.  Everything talks to 127.0.0.1; every process
is ended by its PID; every wait is bounded.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import re
import select
import socket
import time

import attr
import pytest

from estat.http.protocol import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_TARGET_BYTES
from estat.test.harness import EstatProcess, LOOPBACK, stored_events_local, wait_until

pytestmark = pytest.mark.e2e

MAX_BODY_SIZE = 4096
MAX_BATCH_BODY_SIZE = 65536
REQUEST_TIMEOUT = 2.0
HTTP_IDLE_TIMEOUT = 3.0

ENV = {
    "MAX_BODY_SIZE": str(MAX_BODY_SIZE),
    "MAX_BATCH_BODY_SIZE": str(MAX_BATCH_BODY_SIZE),
    "REQUEST_TIMEOUT": "2s",
    "HTTP_IDLE_TIMEOUT": "3s",
    "FLUSH_INTERVAL": "1s",
    "SHUTDOWN_TIMEOUT": "15s",
}

#: Far past any header-section or request-target limit a server may pick,
#: and sizes a demanding client sends every day (big cookies, long
#: referrers, beacon data in the query string) that must be served.  The
#: server's own limits (MAX_HEADER_BYTES, MAX_HEADER_FIELDS,
#: MAX_TARGET_BYTES) are tested at their edges too.
HEADERS_TOO_LARGE = 64 * 1024
TARGET_TOO_LONG = 32 * 1024
HEADERS_SERVED = 8 * 1024
TARGET_SERVED = 4 * 1024

#: How long to wait for an answer or a close that should come at once.
PROMPT = 2.0

#: The other route: served by twisted.web/Klein beside the hot path.
OTHER = b"/healthz"

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


# --- a raw HTTP/1.1 client ------------------------------------------------------------


@attr.s(frozen=True)
class Response:
    """
    One response as it came off the wire.

    @ivar headers: C{((lower-case name, value), ...)} in order.
    @ivar framing: C{"length"}, C{"chunked"}, C{"close"} (delimited by the
        close) or C{"none"} (1xx, 204, 304).
    """

    version: bytes = attr.ib()
    status: int = attr.ib()
    reason: bytes = attr.ib()
    headers: tuple = attr.ib()
    body: bytes = attr.ib()
    framing: str = attr.ib()

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return b", ".join(values) if values else None

    def header_values(self, name: bytes) -> list:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def has_token(self, name: bytes, token: bytes) -> bool:
        value = self.header(name) or b""
        return token.lower() in [t.strip().lower() for t in value.split(b",")]

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        headers = b"".join(b"\r\n%s: %s" % h for h in self.headers)
        return (f"<{self.version.decode()} {self.status} {self.reason!r} "
                f"{headers!r} body={self.body[:300]!r}>")


_STATUS_LINE = re.compile(rb"^(HTTP/\d\.\d) (\d{3})(?: (.*))?$")


def _dechunk(data: bytes, pos: int):
    """
    The body of a chunked message starting at C{pos}, and where it ends;
    C{None} if it is not complete yet.
    """
    body = b""
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            while True:  # trailer fields, then the empty line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    return None
                line, pos = data[pos:end], end + 2
                if not line:
                    return body, pos
        if len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        pos += size + 2


def parse_responses(data: bytes, closed: bool, heads=frozenset()) -> tuple:
    """
    The complete responses at the start of C{data}, in order, and the
    bytes after them (an incomplete response, or anything that is not a
    response).  C{closed}: the server has closed, so a response without a
    length ends with the data.  C{heads}: the indices of the final
    responses that answer C{HEAD} requests (no body, whatever the length).
    """
    responses = []
    final = 0
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = data[pos:end].split(b"\r\n")
        m = _STATUS_LINE.match(lines[0])
        if m is None:
            break
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return responses, data[pos:]
            headers.append((name.lower(), value.strip(b" \t")))
        version, status, reason = m.group(1), int(m.group(2)), m.group(3) or b""
        names = {n for n, _ in headers}
        start = end + 4
        if 100 <= status < 200 or status in (204, 304):
            body, pos, framing = b"", start, "none"
        elif final in heads:
            body, pos = b"", start
            framing = ("chunked" if b"transfer-encoding" in names else
                       "length" if b"content-length" in names else "none")
        elif b"transfer-encoding" in names:
            decoded = _dechunk(data, start)
            if decoded is None:
                break
            (body, pos), framing = decoded, "chunked"
        elif b"content-length" in names:
            n = int(dict(headers)[b"content-length"])
            if len(data) < start + n:
                break
            body, pos, framing = data[start:start + n], start + n, "length"
        elif closed:
            body, pos, framing = data[start:], len(data), "close"
        else:
            break
        responses.append(Response(version, status, reason, tuple(headers), body, framing))
        if not 100 <= status < 200:
            final += 1
    return responses, data[pos:]


class Wire:
    """
    One client connection: send raw bytes, read raw responses.

    Sending and reading go together, so that a server that answers early
    and closes (413 before the body, 431) is heard before its close.

    @ivar received: every byte received so far.
    @ivar closed: the server closed (end of stream or reset).
    @ivar send_failed: the server stopped taking bytes (pipe broken or reset).
    """

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setblocking(False)
        self.received = b""
        self.closed = False
        self.reset = False
        self.send_failed = False
        self.opened_at = time.monotonic()
        self.closed_at = None
        #: indices of the final responses that answer HEAD requests
        self.heads: set = set()

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except (ConnectionResetError, ConnectionAbortedError):
            chunk, self.reset = b"", True
        if chunk:
            self.received += chunk
        else:
            self.closed, self.closed_at = True, time.monotonic()

    def _pump(self, wait: float) -> None:
        if self.closed:
            return
        readable, _, _ = select.select([self.sock], [], [], max(wait, 0.0))
        if readable:
            self._recv()

    def send(self, data: bytes, timeout: float = 5.0) -> int:
        """
        Send C{data}, reading meanwhile; stop early if the server stops
        taking bytes.  The number of bytes sent.
        """
        view = memoryview(data)
        sent = 0
        deadline = time.monotonic() + timeout
        while sent < len(data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server took only {sent} of {len(data)} bytes "
                                     f"in {timeout}s")
            readable, writable, _ = select.select(
                [] if self.closed else [self.sock], [self.sock], [], left)
            if readable:
                self._recv()
            if writable:
                try:
                    sent += self.sock.send(view[sent:sent + 65536])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.send_failed = True
                    break
        return sent

    def parsed(self) -> tuple:
        return parse_responses(self.received, self.closed, self.heads)

    def until(self, predicate, timeout: float = PROMPT) -> list:
        """
        Read until C{predicate(responses)} is true, the server closes or
        C{timeout} passes; every complete response so far.
        """
        deadline = time.monotonic() + timeout
        while True:
            parsed, _ = self.parsed()
            if predicate(parsed):
                return parsed
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return parsed
            self._pump(left)

    def responses(self, count: int | None = None, timeout: float = PROMPT) -> list:
        """
        Read until C{count} final (non-1xx) responses are complete, the
        server closes or C{timeout} passes; every complete response so far.
        With no C{count}, read until the close or the timeout.
        """
        return self.until(lambda parsed: count is not None and len(finals(parsed)) >= count,
                          timeout)

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pump(left)
        return self.closed

    def is_open_after(self, seconds: float) -> bool:
        """
        Read for C{seconds}: true if the server neither sent anything nor
        closed meanwhile.
        """
        before = len(self.received)
        self.wait_closed(seconds)
        return not self.closed and len(self.received) == before


def exchange(port: int, data: bytes, timeout: float = PROMPT) -> Wire:
    """
    Send C{data} on a new connection and read until the server closes or
    C{timeout} passes.  The closed L{Wire}: its C{received}, C{closed},
    C{parsed()}.
    """
    wire = Wire(port)
    try:
        wire.send(data)
        wire.responses(timeout=timeout)
    finally:
        wire.close()
    return wire


# --- requests ------------------------------------------------------------------------


def request(method: bytes = b"GET", target: bytes = OTHER, headers=(), body: bytes = b"",
            version: bytes = b"HTTP/1.1", host: bytes | None = b"estat.test",
            length: bool | None = None) -> bytes:
    """
    One request's bytes.  C{Content-Length} is added when there is a body
    (or C{length} is true), unless C{length} is false.
    """
    lines = [b"%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.extend(headers)
    if length or (length is None and body):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def with_head_size(method: bytes, target: bytes, body: bytes, size: int) -> bytes:
    """
    A request whose head (request line to the empty line) is exactly
    C{size} bytes, filled with fields of at most about 1000 bytes.
    """
    fields: list = []
    while True:
        data = request(method, target, [b"Content-Type: application/json", *fields], body)
        missing = size - (len(data) - len(body))
        if missing == 0:
            return data
        assert missing > 0, missing
        name = b"X-Fill-%d: " % len(fields)
        room = missing - len(name) - 2
        if room >= 1:
            fields.append(name + b"f" * min(room, 1000))
        else:
            fields[-1] += b"f" * missing


def event_body(event_id: str) -> bytes:
    return json.dumps({"id": event_id, "kind": "conformance"},
                      separators=(",", ":")).encode("ascii")


def post_event(event_id: str, target: bytes = b"/collect", headers=(), **kwargs) -> bytes:
    return request(b"POST", target, [b"Content-Type: application/json", *headers],
                   event_body(event_id), **kwargs)


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


# --- what every answer must be --------------------------------------------------------

_IMF_FIXDATE = re.compile(rb"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|"
                          rb"Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$")


def assert_well_formed(response: Response) -> None:
    """
    RFC 9110/9112: the length is declared (C{Content-Length}, exact, or
    chunked; none on a 1xx or 204) and a final answer carries a C{Date} in
    IMF-fixdate within a minute of now.
    """
    if response.interim or response.status == 204:
        assert response.header(b"content-length") is None, response
        assert response.header(b"transfer-encoding") is None, response
    else:
        assert response.framing in ("length", "chunked"), (
            f"no Content-Length and not chunked: {response!r}")
        assert len(response.header_values(b"content-length")) <= 1, response
    if response.status == 405:
        # RFC 9110 15.5.6: a 405 lists the methods the target allows.
        assert response.header(b"allow"), f"405 without Allow: {response!r}"
    if response.status == 401:
        # RFC 9110 15.5.2: a 401 names its challenge.
        assert response.header(b"www-authenticate"), f"401 without WWW-Authenticate: {response!r}"
    if response.interim:
        return
    date = response.header(b"date")
    assert date is not None, f"no Date: {response!r}"
    assert _IMF_FIXDATE.match(date), date
    age = time.time() - email.utils.parsedate_to_datetime(date.decode("ascii")).timestamp()
    assert -60 < age < 60, (date, age)


def assert_json_error(response: Response, statuses) -> dict:
    """
    The status is one of C{statuses}; the body is a short JSON object
    with an C{"error"} string, typed C{application/json}; the answer is
    well formed.
    """
    statuses = (statuses,) if isinstance(statuses, int) else tuple(statuses)
    assert response.status in statuses, response
    assert_well_formed(response)
    ctype = response.header(b"content-type") or b""
    assert ctype.split(b";")[0].strip().lower() == b"application/json", response
    assert 0 < len(response.body) <= 512, response
    error = response.json()
    assert isinstance(error, dict) and isinstance(error.get("error"), str), error
    return error


def finals(responses: list) -> list:
    return [r for r in responses if not r.interim]


def statuses(responses: list) -> list:
    return [r.status for r in responses]


# --- the server --------------------------------------------------------------------------


@attr.s
class Server:
    """
    A test class's Estat process and the events it must and must not
    store.
    """

    estat: EstatProcess = attr.ib()
    must_store: set = attr.ib(factory=set)
    never_store: set = attr.ib(factory=set)

    @property
    def port(self) -> int:
        return self.estat.port

    def wire(self) -> Wire:
        return Wire(self.port)

    def exchange(self, data: bytes, timeout: float = PROMPT) -> Wire:
        return exchange(self.port, data, timeout)

    def accepted(self) -> tuple:
        """
        What the server counted as accepted: C{(events, requests)}.
        """
        m = self.estat.metrics()
        return m["events_accepted_total"], m["http_requests_accepted_total"]

    def wait_responsive(self, timeout: float = 30.0) -> None:
        """
        Wait until C{/healthz} is answered within a second again (after a
        test that left the server busy with a flood).
        """
        def answers() -> bool:
            try:
                return self.estat.get("/healthz", timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout, 0.2, "the server to answer /healthz again")

    def stored_ids(self) -> list:
        """
        The ids of every stored event, once the store has caught up with
        every accepted event.
        """
        def caught_up():
            m = self.estat.metrics()
            return m["s3_events_stored_total"] >= m["events_accepted_total"]

        wait_until(caught_up, 20, 0.1, lambda: f"the store to catch up: "
                                               f"{self.estat.log_tail()}")
        return [e.get("id") for e in stored_events_local(self.estat.store_dir)]


def _start(tmp_path_factory, env: dict) -> Server:
    directory = tmp_path_factory.mktemp("estat-conformance")
    estat = EstatProcess({**ENV, **env}, directory=str(directory))
    try:
        estat.wait_ready()
    except BaseException:
        estat.stop()
        raise
    return Server(estat)


@pytest.fixture(scope="class")
def server(request, tmp_path_factory):
    """
    One Estat process per test class, with the class's C{env} on top of
    L{ENV}.
    """
    server = _start(tmp_path_factory, getattr(request.cls, "env", {}))
    try:
        yield server
    finally:
        server.estat.stop()


def assert_stored_exactly(server: Server) -> None:
    ids = server.stored_ids()
    assert not set(ids) & server.never_store, sorted(set(ids) & server.never_store)
    missing = server.must_store - set(ids)
    assert not missing, sorted(missing)
    repeated = {i for i in ids if ids.count(i) > 1}
    assert not repeated, sorted(repeated)


# --- message framing and smuggling --------------------------------------------------------


def _framing_cases() -> dict:
    """
    C{{name: (statuses, make)}}; C{make(event_id)} is C{(header lines,
    body)} of a request whose framing is invalid.  Each is sent with a
    valid C{POST /collect} right after it, which must never be served.
    """
    def cl_te(e):
        body = chunked(event_body(e))
        return [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"], body

    def te_cl(e):
        body = chunked(event_body(e))
        return [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)], body

    def two_lengths(e):
        body = event_body(e)
        return [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 10)], body

    def length_list(e):
        body = event_body(e)
        return [b"Content-Length: %d, %d" % (len(body), len(body) + 10)], body

    def te(value):
        return lambda e: ([b"Transfer-Encoding: " + value], chunked(event_body(e)))

    def te_fields(*values):
        return lambda e: ([b"Transfer-Encoding: " + v for v in values], chunked(event_body(e)))

    def chunk_size(size_line):
        def make(e):
            body = event_body(e)
            return ([b"Transfer-Encoding: chunked"],
                    b"%s\r\n%s\r\n0\r\n\r\n" % (size_line(len(body)), body))
        return make

    def with_field(line):
        def make(e):
            body = event_body(e)
            return [line, b"Content-Length: %d" % len(body)], body
        return make

    def signed_length(sign):
        def make(e):
            body = event_body(e)
            return [b"Content-Length: %s%d" % (sign, len(body))], body
        return make

    def spaced_length(e):
        body = event_body(e)
        return [b"Content-Length : %d" % len(body)], body

    def folded_te(e):
        return [b"Transfer-Encoding:", b" chunked"], chunked(event_body(e))

    bad = (400,)
    unknown = (400, 501)  # RFC 9112 6.1: 501 for an unknown coding; 6.3: 400 if not chunked last
    return {
        "content-length and transfer-encoding": (bad, cl_te),
        "transfer-encoding and content-length": (bad, te_cl),
        "two different content-lengths": (bad, two_lengths),
        "content-length list of different values": (bad, length_list),
        "chunked not the last coding": (bad, te(b"chunked, gzip")),
        "chunked then a second transfer-encoding field": (bad, te_fields(b"chunked", b"gzip")),
        "unknown coding alone": (unknown, te(b"x-smuggle")),
        "unknown coding before chunked": (unknown, te(b"x-smuggle, chunked")),
        "chunk size not hex": (bad, chunk_size(lambda n: b"zz")),
        "chunk size negative": (bad, chunk_size(lambda n: b"-%x" % n)),
        "chunk size with 0x": (bad, chunk_size(lambda n: b"0x%x" % n)),
        "chunk size with plus": (bad, chunk_size(lambda n: b"+%x" % n)),
        "obsolete line folding": (bad, with_field(b"X-Folded: a\r\n b")),
        "obsolete line folding of transfer-encoding": (bad, folded_te),
        "NUL in a field value": (bad, with_field(b"X-Nul: a\x00b")),
        "NUL in a field name": (bad, with_field(b"X-N\x00ul: a")),
        "space before the colon": (bad, with_field(b"X-Space : a")),
        "space before the colon of content-length": (bad, spaced_length),
        "content-length +N": (bad, signed_length(b"+")),
        "content-length -N": (bad, signed_length(b"-")),
    }


FRAMING = _framing_cases()

#: The two kinds of route: the hot path, and one twisted.web/Klein serves.
ROUTES = {"collect": (b"POST", b"/collect"), "healthz": (b"GET", OTHER)}


def framing_attack(name: str, route: str, event_id: str) -> bytes:
    method, target = ROUTES[route]
    _, make = FRAMING[name]
    headers, body = make(event_id)
    if method == b"POST":
        headers = [b"Content-Type: application/json", *headers]
    return request(method, target, headers, body, length=False)


def _refusal_cases() -> dict:
    """
    C{{name: (statuses by route, make)}}: C{make(method, target,
    event_id)} is a request refused before its end is known or reached
    (the body not read, the head too large, the length absurd).  Whatever
    follows it is the refused request's, never a request of its own.
    """
    json_type = b"Content-Type: application/json"

    def over_limit(method, target, e):
        # The request sent after it lies inside the declared body.
        return request(method, target, [json_type, b"Content-Length: %d" % (
            MAX_BATCH_BODY_SIZE + 1)], length=False)

    def absurd_length(method, target, e):
        return request(method, target, [json_type, b"Content-Length: " + b"9" * 30],
                       length=False)

    def absurd_chunk(method, target, e):
        return request(method, target, [json_type, b"Transfer-Encoding: chunked"],
                       b"f" * 20 + b"\r\n" + event_body(e) + b"\r\n0\r\n\r\n", length=False)

    def big_head(method, target, e):
        return request(method, target, [json_type, b"X-Big: " + b"v" * HEADERS_TOO_LARGE],
                       event_body(e))

    def long_target(method, target, e):
        return request(method, target + b"?q=" + b"a" * TARGET_TOO_LONG, [json_type],
                       event_body(e))

    def preface(method, target, e):
        return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    too_large = {"collect": (413,), "healthz": (405, 413)}
    return {
        "body over the limit": (too_large, over_limit),
        "content-length past 2**64": ({"collect": (400, 413), "healthz": (400, 405, 413)},
                                      absurd_length),
        "chunk size past 2**64": ({"collect": (400, 413), "healthz": (400, 405, 413)},
                                  absurd_chunk),
        "header section over the limit": ({"collect": (431,), "healthz": (431,)}, big_head),
        "target over the limit": ({"collect": (414,), "healthz": (414,)}, long_target),
        "http/2 preface": ({"collect": (400, 505), "healthz": (400, 505)}, preface),
    }


REFUSALS = _refusal_cases()


class TestFraming:
    """
    RFC 9112 sections 5-7: a request whose framing is invalid or
    ambiguous is answered 400 and the connection is closed; nothing after
    it on the connection is ever served (no request smuggling).
    """

    @pytest.mark.parametrize("route", sorted(ROUTES))
    @pytest.mark.parametrize("name", list(FRAMING))
    def test_refused_closed_and_nothing_smuggled(self, server, name, route):
        allowed, _ = FRAMING[name]
        attack_id, smuggled_id = new_id("attack"), new_id("smuggled")
        server.never_store.update({attack_id, smuggled_id})
        before = server.accepted()
        wire = server.exchange(framing_attack(name, route, attack_id) + post_event(smuggled_id))
        responses, rest = wire.parsed()
        assert statuses(responses) in [[s] for s in allowed], (responses, rest)
        assert rest == b"", (responses, rest)
        assert wire.closed, f"still open {PROMPT}s after {responses}"
        assert server.accepted() == before, "the smuggled or the refused request was accepted"

    @pytest.mark.parametrize("route", sorted(ROUTES))
    @pytest.mark.parametrize("name", list(FRAMING))
    def test_refusal_is_json(self, server, name, route):
        allowed, _ = FRAMING[name]
        attack_id = new_id("attack")
        server.never_store.add(attack_id)
        responses, _ = server.exchange(framing_attack(name, route, attack_id)).parsed()
        assert len(responses) == 1, responses
        assert_json_error(responses[0], allowed)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    @pytest.mark.parametrize("name", list(REFUSALS))
    def test_nothing_after_a_refusal_is_served(self, server, name, route):
        allowed, make = REFUSALS[name]
        method, target = ROUTES[route]
        attack_id, smuggled_id = new_id("attack"), new_id("smuggled")
        server.never_store.update({attack_id, smuggled_id})
        before = server.accepted()
        wire = server.exchange(make(method, target, attack_id) + post_event(smuggled_id))
        responses, rest = wire.parsed()
        assert statuses(responses) in [[s] for s in allowed[route]], (responses, rest[:300])
        assert rest == b"", (responses, rest[:300])
        assert server.accepted() == before, "the smuggled or the refused request was accepted"

    def test_zz_nothing_refused_or_smuggled_is_stored(self, server):
        assert_stored_exactly(server)


# --- the request line and Host -------------------------------------------------------------


class TestRequestLine:
    """
    RFC 9112 section 3: C{Host} is required in HTTP/1.1 (and only once);
    an absolute-form target is served as its path; a header section or a
    target over the server's limit gets 431 or 414, with a JSON reason.
    """

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_http11_without_host_is_400(self, server, route):
        event_id = new_id("no-host")
        server.never_store.add(event_id)
        method, target = ROUTES[route]
        before = server.accepted()
        body = event_body(event_id) if method == b"POST" else b""
        data = request(method, target, [b"Content-Type: application/json"], body, host=None)
        responses, _ = server.exchange(data).parsed()
        assert len(responses) == 1, responses
        assert_json_error(responses[0], 400)
        assert server.accepted() == before

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_two_hosts_is_400(self, server, route):
        event_id = new_id("two-hosts")
        server.never_store.add(event_id)
        method, target = ROUTES[route]
        before = server.accepted()
        body = event_body(event_id) if method == b"POST" else b""
        data = request(method, target, [b"Host: other.test", b"Content-Type: application/json"],
                       body)
        responses, _ = server.exchange(data).parsed()
        assert len(responses) == 1, responses
        assert_json_error(responses[0], 400)
        assert server.accepted() == before

    def test_absolute_form_collect_is_served(self, server):
        event_id = new_id("absolute")
        with server.wire() as wire:
            wire.send(post_event(event_id, b"http://estat.test/collect"))
            responses = wire.responses(1)
        assert statuses(responses) == [202], responses
        assert responses[0].json() == {"accepted": 1}
        server.must_store.add(event_id)
        assert event_id in server.stored_ids()

    def test_absolute_form_with_a_query_is_served(self, server):
        event_id = new_id("absolute-query")
        with server.wire() as wire:
            wire.send(post_event(event_id, b"http://estat.test/collect?source=conformance"))
            responses = wire.responses(1)
        assert statuses(responses) == [202], responses
        server.must_store.add(event_id)

    def test_absolute_form_other_route_is_served(self, server):
        with server.wire() as wire:
            wire.send(request(b"GET", b"http://estat.test" + OTHER))
            responses = wire.responses(1)
        assert statuses(responses) == [200], responses
        assert responses[0].json() == {"status": "ok"}

    @pytest.mark.parametrize("shape", ["many fields", "one field"])
    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_header_section_over_the_limit_is_431(self, server, route, shape):
        event_id = new_id("big-headers")
        server.never_store.add(event_id)
        method, target = ROUTES[route]
        if shape == "many fields":
            fields = [b"X-Big-%d: %s" % (i, b"v" * 1000) for i in range(HEADERS_TOO_LARGE // 1000)]
        else:
            fields = [b"X-Big: " + b"v" * HEADERS_TOO_LARGE]
        body = event_body(event_id) if method == b"POST" else b""
        before = server.accepted()
        wire = server.exchange(request(method, target, fields, body))
        responses, rest = wire.parsed()
        assert len(responses) == 1, (responses, rest[:200], wire.closed)
        assert_json_error(responses[0], 431)
        assert server.accepted() == before

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_target_over_the_limit_is_414(self, server, route):
        event_id = new_id("long-target")
        server.never_store.add(event_id)
        method, target = ROUTES[route]
        body = event_body(event_id) if method == b"POST" else b""
        before = server.accepted()
        wire = server.exchange(request(method, target + b"?q=" + b"a" * TARGET_TOO_LONG,
                                       [b"Content-Type: application/json"], body))
        responses, rest = wire.parsed()
        assert len(responses) == 1, (responses, rest[:200], wire.closed)
        assert_json_error(responses[0], 414)
        assert server.accepted() == before

    @pytest.mark.parametrize("over", [False, True], ids=["under", "over"])
    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_header_section_limit_edge(self, server, route, over):
        """
        A header section 256 bytes under MAX_HEADER_BYTES is served on
        both kinds of route (the hand-over to twisted.web must not refuse
        what the protocol took); 256 bytes over is 431.
        """
        method, target = ROUTES[route]
        event_id = new_id("header-edge")
        body = event_body(event_id) if method == b"POST" else b""
        data = with_head_size(method, target, body, MAX_HEADER_BYTES + (256 if over else -256))
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(1)
        assert len(responses) == 1, (responses, wire.received[:300])
        if over:
            assert_json_error(responses[0], 431)
            server.never_store.add(event_id)
        else:
            assert statuses(responses) == [202 if method == b"POST" else 200], responses
            if method == b"POST":
                server.must_store.add(event_id)

    @pytest.mark.parametrize("over", [False, True], ids=["at the limit", "one over"])
    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_header_field_count_edge(self, server, route, over):
        method, target = ROUTES[route]
        event_id = new_id("fields-edge")
        body = event_body(event_id) if method == b"POST" else b""
        base = [b"Host", b"Content-Type", b"Content-Length"] if body else [b"Host"]
        fields = [b"X-F%d: v" % i for i in range(MAX_HEADER_FIELDS - len(base) + over)]
        data = request(method, target, [*fields, b"Content-Type: application/json"][
            :len(fields) + (1 if body else 0)], body)
        assert data.count(b"\r\n") - 2 == MAX_HEADER_FIELDS + over
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(1)
        assert len(responses) == 1, (responses, wire.received[:300])
        if over:
            assert_json_error(responses[0], 431)
            server.never_store.add(event_id)
        else:
            assert statuses(responses) == [202 if method == b"POST" else 200], responses
            if method == b"POST":
                server.must_store.add(event_id)

    @pytest.mark.parametrize("over", [0, 1], ids=["at the limit", "one over"])
    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_target_limit_edge(self, server, route, over):
        method, target = ROUTES[route]
        event_id = new_id("target-edge")
        body = event_body(event_id) if method == b"POST" else b""
        long_target = target + b"?q="
        long_target += b"a" * (MAX_TARGET_BYTES + over - len(long_target))
        with server.wire() as wire:
            wire.send(request(method, long_target, [b"Content-Type: application/json"], body))
            responses = wire.responses(1)
        assert len(responses) == 1, (responses, wire.received[:300])
        if over:
            assert_json_error(responses[0], 414)
            server.never_store.add(event_id)
        else:
            assert statuses(responses) == [202 if method == b"POST" else 200], responses
            if method == b"POST":
                server.must_store.add(event_id)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_large_but_reasonable_headers_and_target_are_served(self, server, route):
        """
        An 8 KiB header section (cookies, a long referrer) and a 4 KiB
        target, on one keep-alive connection.
        """
        method, target = ROUTES[route]
        fields = [b"Cookie: c=" + b"k" * (HEADERS_SERVED - 300),
                  b"Referer: https://example.test/" + b"r" * 200]
        long_target = target + b"?q=" + b"a" * TARGET_SERVED
        expected = 202 if method == b"POST" else 200
        with server.wire() as wire:
            for t in (target, long_target):
                event_id = new_id("reasonable")
                body = event_body(event_id) if method == b"POST" else b""
                wire.received = b""
                wire.send(request(method, t, [b"Content-Type: application/json", *fields], body))
                responses = wire.responses(1)
                assert statuses(responses) == [expected], responses
                if method == b"POST":
                    server.must_store.add(event_id)

    def test_zz_stored_exactly(self, server):
        assert_stored_exactly(server)


# --- connections ----------------------------------------------------------------------------


class TestConnections:
    """
    Pipelining, C{Expect: 100-continue}, HTTP/1.0 persistence, keep-alive
    reuse across both kinds of route, C{Upgrade}, C{CONNECT} and an
    HTTP/2 preface; the body limits, REQUEST_TIMEOUT and HTTP_IDLE_TIMEOUT
    on the routes the hostile suite does not already cover.
    """

    def test_pipelined_posts_are_answered_in_order(self, server):
        batches = [[new_id("pipe") for _ in range(n)] for n in (1, 3, 2, 5, 1)]
        data = b""
        for ids in batches:
            body = json.dumps([{"id": i} for i in ids], separators=(",", ":")).encode()
            data += request(b"POST", b"/collect", [b"Content-Type: application/json"], body)
        before = server.accepted()
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(len(batches))
            assert statuses(responses) == [202] * len(batches), responses
            assert [r.json() for r in responses] == [{"accepted": len(b)} for b in batches]
            assert wire.is_open_after(0.3), "a keep-alive connection was closed"
        for ids in batches:
            server.must_store.update(ids)
        events, requests = server.accepted()
        assert (events - before[0], requests - before[1]) == (12, 5)

    def test_pipelined_routes_are_answered_in_order(self, server):
        """
        Both kinds of route interleaved in one write, the last asking to
        close: every answer in order, then the close.
        """
        ids = [new_id("pipe-mixed") for _ in range(4)]
        data = (post_event(ids[0]) + request(b"GET", OTHER) + post_event(ids[1])
                + request(b"OPTIONS", b"/collect") + request(b"GET", b"/nope")
                + request(b"POST", OTHER, [b"Content-Type: application/json"], b'{"id":"x"}')
                + post_event(ids[2]) + request(b"GET", b"/readyz")
                + post_event(ids[3], headers=[b"Connection: close"]))
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(9)
            assert statuses(responses) == [202, 200, 202, 204, 404, 405, 202, 200, 202], responses
            assert wire.wait_closed(PROMPT), "Connection: close was not honoured"
        assert responses[1].json() == {"status": "ok"}
        assert responses[7].json() == {"status": "ready"}
        assert wire.parsed()[1] == b""
        server.must_store.update(ids)

    def test_head_is_answered_without_a_body(self, server):
        """
        HEAD among pipelined requests: its answer has no body, so the
        next answer starts right after its head.
        """
        event_id = new_id("after-head")
        with server.wire() as wire:
            wire.heads = {0, 2}
            wire.send(request(b"HEAD", OTHER) + request(b"GET", OTHER)
                      + request(b"HEAD", b"/collect") + post_event(event_id))
            responses = wire.responses(4)
            assert statuses(responses) == [200, 200, 405, 202], responses
            assert wire.is_open_after(0.3), (wire.parsed(), "more bytes after the answers")
        assert responses[1].json() == {"status": "ok"}
        # RFC 9110 9.3.2: a length on HEAD is the length GET would have.
        length = responses[0].header(b"content-length")
        assert length is None or int(length) == len(responses[1].body), responses
        assert responses[3].json() == {"accepted": 1}
        server.must_store.add(event_id)

    def test_deep_pipeline_across_routes(self, server):
        """
        100 requests in one write, alternating between the kinds of
        route: 100 answers, in order.
        """
        ids = [new_id("deep") for _ in range(50)]
        data = b"".join(post_event(i) + request(b"GET", OTHER) for i in ids)
        before = server.accepted()
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(100, timeout=10)
        assert statuses(responses) == [202, 200] * 50, statuses(responses)
        server.must_store.update(ids)
        events, requests = server.accepted()
        assert (events - before[0], requests - before[1]) == (50, 50)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_pipelined_burst_read_from_inside_a_head_is_served(self, server, route):
        """
        A read that starts inside one request's head, holds more than
        16 KiB of complete requests and ends inside another head: no
        request is too large, every one is served.
        """
        method, target = ROUTES[route]
        ids = [new_id("burst") for _ in range(200)] if method == b"POST" else []
        requests = ([post_event(i) for i in ids] if ids
                    else [request(method, target) for _ in range(600)])
        data = b"".join(requests)
        assert 24 * 1024 < len(data) < 60 * 1024, len(data)  # one read of more than 16 KiB
        with server.wire() as wire:
            wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            inside_last_head = len(data) - len(requests[-1]) + 10
            wire.send(data[:10])
            time.sleep(0.2)
            wire.send(data[10:inside_last_head])
            time.sleep(0.2)
            wire.send(data[inside_last_head:])
            responses = wire.responses(len(requests), timeout=10)
        expected = 202 if method == b"POST" else 200
        assert statuses(responses) == [expected] * len(requests), (
            len(responses), [r for r in responses if r.status != expected][:2])
        server.must_store.update(ids)

    @pytest.mark.parametrize("route", ["collect", "metrics"])
    def test_a_client_that_does_not_read_is_not_read_without_bound(self, server, route):
        """
        Pipelined requests from a client that never reads its answers:
        once the answers back up, the server stops reading (the client's
        sends stall) instead of holding ever more answers in memory.
        """
        one = (request(b"OPTIONS", b"/collect") if route == "collect"
               else request(b"GET", b"/metrics"))
        data = one * 1000
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A small receive window: the answers back up at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((LOOPBACK, server.port))
            sock.setblocking(False)
            sent = offset = 0
            stalled = False
            started = last_progress = time.monotonic()
            while True:
                now = time.monotonic()
                if now - last_progress >= 2.0:
                    stalled = True
                    break
                if now - started >= 10.0:
                    break
                _, writable, _ = select.select([], [sock], [], 0.1)
                if not writable:
                    continue
                try:
                    n = sock.send(data[offset:offset + 65536])
                except BlockingIOError:
                    continue
                except OSError as e:
                    if time.monotonic() - last_progress >= 1.0:
                        # It stopped reading, then dropped a client that
                        # took no answers for its idle timeout: bounded.
                        stalled = True
                        break
                    raise AssertionError(f"the server ended a connection of valid pipelined "
                                         f"requests after {sent} bytes: {e!r}") from None
                sent += n
                offset = (offset + n) % len(one)
                last_progress = time.monotonic()
            seconds = time.monotonic() - started
        finally:
            sock.close()
            # What it read of the flood may keep it busy a while.
            server.wait_responsive()
        assert stalled, (
            f"the server read {sent} bytes ({sent // len(one)} requests) in {seconds:.1f}s "
            f"from a client that read none of its answers, and was still reading")

    @pytest.mark.parametrize("over", [0, 1], ids=["at the limit", "one byte over"])
    def test_chunked_body_at_the_limit(self, server, over):
        """
        A chunked NDJSON body of exactly MAX_BATCH_BODY_SIZE bytes is
        accepted; one byte more is 413.
        """
        ids = [new_id("chunked-limit") for _ in range(64)]
        lines = [json.dumps({"id": i, "pad": ""}).encode() for i in ids]
        room = MAX_BATCH_BODY_SIZE + over - sum(len(line) + 1 for line in lines)
        lines = [line[:-2] + b"p" * (room // 64 + (k < room % 64)) + b'"}'
                 for k, line in enumerate(lines)]
        body = b"\n".join(lines) + b"\n"
        assert len(body) == MAX_BATCH_BODY_SIZE + over
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                          for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
        wire = server.exchange(request(b"POST", b"/collect", [
            b"Content-Type: application/x-ndjson", b"Transfer-Encoding: chunked"], chunks,
            length=False))
        responses, rest = wire.parsed()
        assert len(responses) == 1, (responses, rest[:200])
        if over:
            assert_json_error(responses[0], 413)
            server.never_store.update(ids)
        else:
            assert statuses(responses) == [202], responses
            assert responses[0].json() == {"accepted": 64}
            server.must_store.update(ids)

    VALID_VARIANTS = {
        "lower-case field names": lambda body: (
            b"POST /collect HTTP/1.1\r\nhost: estat.test\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)),
        "chunked in capitals": lambda body: (
            b"POST /collect HTTP/1.1\r\nHost: estat.test\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: CHUNKED\r\n\r\n" + chunked(body)),
        "whitespace around values": lambda body: (
            b"POST /collect HTTP/1.1\r\nHost:estat.test\r\nContent-Type:\tapplication/json\t"
            b"\r\nContent-Length:   %d   \r\n\r\n%s" % (len(body), body)),
        "leading zeros in content-length": lambda body: (
            b"POST /collect HTTP/1.1\r\nHost: estat.test\r\nContent-Type: application/json"
            b"\r\nContent-Length: 000%d\r\n\r\n%s" % (len(body), body)),
        "obs-text and an empty value": lambda body: (
            b"POST /collect HTTP/1.1\r\nHost: estat.test\r\nContent-Type: application/json"
            b"\r\nUser-Agent: caf\xc3\xa9/1.0 \xff\r\nX-Empty:\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)),
    }

    @pytest.mark.parametrize("variant", list(VALID_VARIANTS))
    def test_valid_variants_are_served(self, server, variant):
        """
        What RFC 9110/9112 allow and parsers sometimes get wrong: field
        names and codings are case-insensitive, values may have optional
        whitespace and obs-text, a length may have leading zeros.
        """
        event_id = new_id("variant")
        with server.wire() as wire:
            wire.send(self.VALID_VARIANTS[variant](event_body(event_id)) + request(b"GET", OTHER))
            responses = wire.responses(2)
        assert statuses(responses) == [202, 200], responses
        server.must_store.add(event_id)

    def test_requests_split_into_single_bytes_are_served(self, server):
        """
        Pipelined requests on both kinds of route, one byte per write: no
        boundary (inside the request line, a field, the body, between
        requests) confuses the parser or the hand-over between routes.
        """
        ids = [new_id("bytewise") for _ in range(2)]
        data = (post_event(ids[0]) + request(b"GET", OTHER) + post_event(ids[1])
                + request(b"GET", b"/nope"))
        with server.wire() as wire:
            wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                wire.send(data[i:i + 1])
                time.sleep(0.0005)
            responses = wire.responses(4)
        assert statuses(responses) == [202, 200, 202, 404], responses
        server.must_store.update(ids)

    def test_chunked_body_with_extensions_and_trailers_is_served(self, server):
        event_id = new_id("chunk-ext")
        body = event_body(event_id)
        chunks = (b"5;name=value\r\n%s\r\n%x;other\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
                  % (body[:5], len(body) - 5, body[5:]))
        with server.wire() as wire:
            wire.send(request(b"POST", b"/collect", [b"Content-Type: application/json",
                                                     b"Transfer-Encoding: chunked"], chunks,
                              length=False) + request(b"GET", OTHER))
            responses = wire.responses(2)
        assert statuses(responses) == [202, 200], responses
        server.must_store.add(event_id)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_http11_connection_close_is_honoured(self, server, route):
        method, target = ROUTES[route]
        event_id = new_id("close")
        data = (post_event(event_id, headers=[b"Connection: close"]) if method == b"POST"
                else request(method, target, [b"Connection: close"]))
        wire = server.exchange(data + request(b"GET", OTHER))
        responses, rest = wire.parsed()
        assert statuses(responses) == [202 if method == b"POST" else 200], (responses, rest)
        assert wire.closed, "open after Connection: close"
        if method == b"POST":
            server.must_store.add(event_id)

    CLOSERS = {
        "HTTP/1.1 close on collect": (202, lambda i: post_event(i, headers=[b"Connection: close"])),
        "HTTP/1.1 close on healthz": (200, lambda i: request(b"GET", OTHER, [b"Connection: close"])),
        "HTTP/1.0 on collect": (202, lambda i: post_event(i, version=b"HTTP/1.0")),
        "HTTP/1.0 on healthz": (200, lambda i: request(b"GET", OTHER, version=b"HTTP/1.0")),
    }

    @pytest.mark.parametrize("closer", list(CLOSERS))
    def test_a_request_after_the_last_answered_is_never_acted_on(self, server, closer):
        """
        Events pipelined after a request that ends the connection get no
        answer, so they must not be accepted either (the client will send
        them again).
        """
        expected, make = self.CLOSERS[closer]
        first_id, after_id = new_id("closer"), new_id("after-close")
        server.never_store.add(after_id)
        before = server.accepted()
        wire = server.exchange(make(first_id) + post_event(after_id) + post_event(new_id("x")))
        responses, rest = wire.parsed()
        assert statuses(responses) == [expected], (responses, rest[:200])
        assert wire.closed
        accepted = 1 if expected == 202 else 0
        events, requests = server.accepted()
        assert (events - before[0], requests - before[1]) == (accepted, accepted), (
            "an event with no answer was accepted")
        if expected == 202:
            server.must_store.add(first_id)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_http10_keep_alive_pipeline_is_answered_or_not_acted_on(self, server, route):
        """
        HTTP/1.0 with keep-alive, pipelined: each event is either answered
        or not accepted; never accepted without an answer.
        """
        method, target = ROUTES[route]
        ka = [b"Connection: keep-alive"]
        first_id, after_id = new_id("ka10-first"), new_id("ka10-after")
        first = (post_event(first_id, headers=ka, version=b"HTTP/1.0") if method == b"POST"
                 else request(method, target, ka, version=b"HTTP/1.0"))
        before = server.accepted()
        with server.wire() as wire:
            wire.send(first + post_event(after_id, headers=ka, version=b"HTTP/1.0"))
            responses = wire.responses(2)
        answered = statuses(responses)
        assert answered in ([202 if method == b"POST" else 200],
                            [202 if method == b"POST" else 200, 202]), responses
        events, _ = server.accepted()
        answered_events = answered.count(202)
        assert events - before[0] == answered_events, (
            f"{events - before[0]} events accepted, {answered_events} answered")
        if method == b"POST":
            server.must_store.add(first_id)
        (server.must_store if len(answered) == 2 else server.never_store).add(after_id)

    def test_keep_alive_reuse_across_routes(self, server):
        """
        One connection, request after request (not pipelined), switching
        between the hot path and the routes behind it, and back.
        """
        with server.wire() as wire:
            for round_ in range(3):
                for data, expected in [
                        (post_event(new_id("reuse")), 202),
                        (request(b"GET", OTHER), 200),
                        (post_event(new_id("reuse")), 202),
                        (request(b"GET", b"/metrics"), 200),
                        (request(b"OPTIONS", b"/collect"), 204),
                        (request(b"GET", b"/openapi.json"), 200),
                        (request(b"GET", b"/nope"), 404)]:
                    wire.received = b""
                    wire.send(data)
                    responses = wire.responses(1)
                    assert statuses(responses) == [expected], (round_, data[:40], responses)
                    assert not wire.closed, (round_, data[:40])
                    if expected == 202:
                        server.must_store.add(json.loads(data.split(b"\r\n\r\n", 1)[1])["id"])

    def test_expect_100_continue(self, server):
        event_id = new_id("expect")
        body = event_body(event_id)
        head = request(b"POST", b"/collect", [b"Content-Type: application/json",
                                              b"Content-Length: %d" % len(body),
                                              b"Expect: 100-continue"], length=False)
        with server.wire() as wire:
            wire.send(head)
            interim = wire.until(bool)
            assert statuses(interim) == [100], (interim, wire.received)
            assert not wire.closed
            wire.send(body)
            responses = wire.responses(1)
        assert statuses(responses) == [100, 202], responses
        assert responses[1].json() == {"accepted": 1}
        server.must_store.add(event_id)

    def test_expect_100_continue_with_a_body_over_the_limit_is_413_at_once(self, server):
        """
        The final answer instead of C{100 Continue}: the body is never
        sent.
        """
        head = request(b"POST", b"/collect", [b"Content-Type: application/json",
                                              b"Content-Length: %d" % (MAX_BATCH_BODY_SIZE + 1),
                                              b"Expect: 100-continue"], length=False)
        with server.wire() as wire:
            wire.send(head)
            responses = wire.responses(1)
            responses = wire.responses(timeout=0.5) if not wire.closed else responses
        assert statuses(responses) == [413], responses
        assert_json_error(responses[0], 413)

    def test_http10_expect_100_continue_is_ignored(self, server):
        """
        RFC 9110 10.1.1: no C{100 Continue} to an HTTP/1.0 client.
        """
        event_id = new_id("http10-expect")
        wire = server.exchange(post_event(event_id, headers=[b"Expect: 100-continue"],
                                          version=b"HTTP/1.0"))
        responses, rest = wire.parsed()
        assert statuses(responses) == [202], (responses, rest)
        server.must_store.add(event_id)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_http10_closes_after_the_answer(self, server, route):
        method, target = ROUTES[route]
        event_id = new_id("http10")
        data = (post_event(event_id, version=b"HTTP/1.0", host=None) if method == b"POST"
                else request(method, target, version=b"HTTP/1.0", host=None))
        wire = server.exchange(data)
        responses, rest = wire.parsed()
        assert statuses(responses) == [202 if method == b"POST" else 200], (responses, rest)
        assert wire.closed, "an HTTP/1.0 connection without keep-alive stayed open"
        if method == b"POST":
            server.must_store.add(event_id)

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_http10_keep_alive_stays_open(self, server, route):
        """
        C{Connection: keep-alive} asked for: the answer says keep-alive
        and the connection serves the next request (on the other kind of
        route), then closes after one that did not ask.
        """
        first, second = (["collect", "healthz"] if route == "collect"
                         else ["healthz", "collect"])

        def ask(name, keep_alive):
            method, target = ROUTES[name]
            headers = [b"Connection: keep-alive"] if keep_alive else []
            if method == b"POST":
                event_id = new_id("http10-ka")
                server.must_store.add(event_id)
                return post_event(event_id, headers=headers, version=b"HTTP/1.0"), 202
            return request(method, target, headers, version=b"HTTP/1.0"), 200

        with server.wire() as wire:
            for name in (first, second):
                data, expected = ask(name, True)
                wire.received = b""
                wire.send(data)
                responses = wire.responses(1)
                assert statuses(responses) == [expected], (name, responses)
                assert responses[0].has_token(b"connection", b"keep-alive"), responses
                assert wire.is_open_after(0.3), f"closed after a keep-alive {name}"
            data, expected = ask(first, False)
            wire.received = b""
            wire.send(data)
            responses = wire.responses(1)
            assert statuses(responses) == [expected], responses
            assert wire.wait_closed(PROMPT), "open after an HTTP/1.0 request without keep-alive"

    UPGRADES = {
        "websocket": [b"Connection: Upgrade", b"Upgrade: websocket",
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                      b"Sec-WebSocket-Version: 13"],
        "h2c": [b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"],
    }

    @pytest.mark.parametrize("route", sorted(ROUTES))
    @pytest.mark.parametrize("upgrade", sorted(UPGRADES))
    def test_upgrade_is_refused(self, server, upgrade, route):
        method, target = ROUTES[route]
        event_id = new_id("upgrade")
        server.never_store.add(event_id)
        body = event_body(event_id) if method == b"POST" else b""
        before = server.accepted()
        wire = server.exchange(request(method, target, [*self.UPGRADES[upgrade],
                                                        b"Content-Type: application/json"], body))
        responses, rest = wire.parsed()
        assert 101 not in statuses(responses), responses
        assert len(responses) == 1, (responses, rest)
        assert_json_error(responses[0], (400, 501))
        assert server.accepted() == before

    def test_connect_is_refused(self, server):
        wire = server.exchange(request(b"CONNECT", b"estat.test:443",
                                       host=b"estat.test:443"))
        responses, rest = wire.parsed()
        assert len(responses) == 1, (responses, rest)
        assert_json_error(responses[0], (400, 405, 501))

    def test_http2_preface_is_refused_and_closed(self, server):
        wire = server.exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        responses, rest = wire.parsed()
        assert statuses(responses) in ([400], [505]), (responses, rest)
        assert rest == b""
        assert wire.closed, "open after an HTTP/2 preface"

    def test_other_route_content_length_over_the_limit_is_answered_before_the_body(
            self, server):
        head = request(b"POST", OTHER, [b"Content-Type: application/json",
                                        b"Content-Length: %d" % (MAX_BATCH_BODY_SIZE + 1)],
                       length=False)
        with server.wire() as wire:
            wire.send(head)
            responses = wire.responses(1)
        assert len(responses) == 1, (responses, wire.received)
        assert_json_error(responses[0], (405, 413))

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_chunked_body_past_the_limit_is_cut_off(self, server, route):
        """
        A chunked body that never ends is answered while it is still
        arriving, once it passes the limit (the hostile suite checks the
        exact point on C{/collect}); never held whole.
        """
        target = b"/collect" if route == "collect" else OTHER
        chunk = (json.dumps({"pad": "z" * 1000}) + "\n").encode() * 8
        sent = 0
        with server.wire() as wire:
            wire.send(request(b"POST", target, [b"Content-Type: application/x-ndjson",
                                                b"Transfer-Encoding: chunked"]))
            for _ in range(8 * MAX_BATCH_BODY_SIZE // len(chunk)):
                if wire.send(b"%x\r\n%s\r\n" % (len(chunk), chunk)) == 0 or wire.send_failed:
                    break
                sent += len(chunk)
                wire._pump(0.02)
                if wire.received or wire.closed:
                    break
            responses = wire.responses(1)
        assert len(responses) == 1, (responses, wire.received[:300])
        assert_json_error(responses[0], (413,) if route == "collect" else (405, 413))
        assert sent <= MAX_BATCH_BODY_SIZE + 2 * len(chunk), sent

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_idle_keep_alive_connection_is_closed_after_http_idle_timeout(self, server, route):
        method, target = ROUTES[route]
        event_id = new_id("idle")
        data = post_event(event_id) if method == b"POST" else request(method, target)
        with server.wire() as wire:
            wire.send(data)
            responses = wire.responses(1)
            answered = time.monotonic()
            assert statuses(responses) == [202 if method == b"POST" else 200], responses
            assert wire.wait_closed(HTTP_IDLE_TIMEOUT + 3), "an idle connection stayed open"
            idle = wire.closed_at - answered
        if method == b"POST":
            server.must_store.add(event_id)
        assert HTTP_IDLE_TIMEOUT - 0.5 <= idle <= HTTP_IDLE_TIMEOUT + 1.5, idle
        assert wire.parsed()[1] == b"", "bytes sent on an idle connection"

    @pytest.mark.parametrize("route", sorted(ROUTES))
    def test_request_timeout_counts_from_the_first_byte(self, server, route):
        """
        A connection idle for most of REQUEST_TIMEOUT, then a request
        that takes most of REQUEST_TIMEOUT again: served, since neither
        the connection's age nor the idle time counts against the request.
        """
        method, target = ROUTES[route]
        event_id = new_id("first-byte")
        data = post_event(event_id) if method == b"POST" else request(method, target, [
            b"X-Padding: p"])
        split = data.index(b"\r\n") + 2
        with server.wire() as wire:
            assert wire.is_open_after(REQUEST_TIMEOUT * 0.75)
            wire.send(data[:split])
            assert wire.is_open_after(REQUEST_TIMEOUT * 0.6)
            wire.send(data[split:])
            responses = wire.responses(1)
        assert statuses(responses) == [202 if method == b"POST" else 200], responses
        if method == b"POST":
            server.must_store.add(event_id)

    def test_slowloris_on_the_other_route_is_408(self, server):
        """
        Header lines trickled to a twisted.web route: 408 once
        REQUEST_TIMEOUT has passed since the request's first byte.
        """
        with server.wire() as wire:
            wire.send(b"GET " + OTHER + b" HTTP/1.1\r\nHost: estat.test\r\n")
            started = time.monotonic()
            for i in range(int((REQUEST_TIMEOUT + 3) / 0.25)):
                wire.send(b"X-Slow-%d: v\r\n" % i)
                wire._pump(0.25)
                if wire.received or wire.closed or wire.send_failed:
                    break
            responses = wire.responses(1)
            seconds = time.monotonic() - started
        assert statuses(responses) == [408], (responses, wire.received)
        assert_json_error(responses[0], 408)
        assert REQUEST_TIMEOUT - 0.5 <= seconds <= REQUEST_TIMEOUT + 1.5, seconds

    def test_zz_stored_exactly(self, server):
        assert_stored_exactly(server)


# --- what every answer looks like -----------------------------------------------------------


def _slow_request(port: int) -> Wire:
    with Wire(port) as wire:
        wire.send(request(b"POST", b"/collect", [b"Content-Type: application/json",
                                                 b"Content-Length: 20"], length=False) + b"{}")
        wire.responses(timeout=REQUEST_TIMEOUT + 3)
    return wire


def _answers() -> dict:
    """
    C{{name: (allowed statuses, request bytes)}}: one of each answer the
    server gives.
    """
    collect = b"/collect"
    json_type = [b"Content-Type: application/json"]
    return {
        "202 accepted": ((202,), post_event("answers-accepted")),
        "202 accepted, chunked request": ((202,), request(
            b"POST", collect, [*json_type, b"Transfer-Encoding: chunked"],
            chunked(event_body("answers-chunked")), length=False)),
        "204 preflight": ((204,), request(b"OPTIONS", collect, [
            b"Origin: https://example.test", b"Access-Control-Request-Method: POST"])),
        "200 healthz": ((200,), request(b"GET", b"/healthz")),
        "200 healthz, HTTP/1.0": ((200,), request(b"GET", b"/healthz", version=b"HTTP/1.0")),
        "202 accepted, HTTP/1.0": ((202,), post_event("answers-http10", version=b"HTTP/1.0")),
        "404, HTTP/1.0": ((404,), request(b"GET", b"/nope", version=b"HTTP/1.0")),
        "200 readyz": ((200,), request(b"GET", b"/readyz")),
        "200 metrics": ((200,), request(b"GET", b"/metrics")),
        "200 openapi": ((200,), request(b"GET", b"/openapi.json")),
        "400 bad json": ((400,), request(b"POST", collect, json_type, b"{nope")),
        "400 empty body": ((400,), request(b"POST", collect, json_type, length=True)),
        "404": ((404,), request(b"GET", b"/nope")),
        "405 GET collect": ((405,), request(b"GET", collect)),
        "405 POST healthz": ((405,), request(b"POST", b"/healthz", json_type, b"{}")),
        "413 content-length": ((413,), request(b"POST", collect, [
            *json_type, b"Content-Length: %d" % (MAX_BATCH_BODY_SIZE + 1)], length=False)),
        "413 event": ((413,), request(b"POST", collect, json_type,
                                      b'{"pad":"' + b"x" * MAX_BODY_SIZE + b'"}')),
        "415": ((415,), request(b"POST", collect, [*json_type, b"Content-Encoding: br"], b"{}")),
        "431": ((431,), request(b"GET", b"/healthz", [b"X-Big: " + b"v" * HEADERS_TOO_LARGE])),
        "414": ((414,), request(b"GET", b"/healthz?q=" + b"a" * TARGET_TOO_LONG)),
        "400 framing": ((400,), request(b"POST", collect, [
            *json_type, b"Content-Length: 7", b"Transfer-Encoding: chunked"],
            chunked(b"{}"), length=False)),
        "400 no host": ((400,), request(b"GET", b"/healthz", host=None)),
        "upgrade refused": ((400, 501), request(b"GET", b"/healthz",
                                                TestConnections.UPGRADES["websocket"])),
        "connect refused": ((400, 405, 501), request(b"CONNECT", b"estat.test:443")),
        "http/2 preface": ((400, 505), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        "unknown expectation": ((202, 417), post_event("answers-expect", headers=[
            b"Expect: teapot"])),
        "unknown transfer coding": ((400, 501), request(
            b"POST", collect, [*json_type, b"Transfer-Encoding: x-smuggle"], b"{}",
            length=False)),
    }


ANSWERS = _answers()


class TestAnswers:
    """
    Every answer carries C{Date} and its length (C{Content-Length}, or
    chunked; neither on 204); every error is short JSON typed
    C{application/json}.
    """

    @pytest.mark.parametrize("name", list(ANSWERS))
    def test_answer_is_well_formed(self, server, name):
        allowed, data = ANSWERS[name]
        wire = server.exchange(data, timeout=0.5 if allowed[0] < 400 else PROMPT)
        responses, rest = wire.parsed()
        assert len(finals(responses)) == 1, (responses, rest[:300], wire.closed)
        response = finals(responses)[0]
        assert response.status in allowed, response
        assert_well_formed(response)
        if b" HTTP/1.0\r\n" in data.split(b"\r\n", 1)[0] + b"\r\n":
            # RFC 9112 6.1: never chunked to an HTTP/1.0 client.
            assert response.framing == "length", response
        if response.status >= 400:
            assert_json_error(response, allowed)
        elif (response.header(b"content-type") or b"").startswith(b"application/json"):
            response.json()

    def test_408_is_well_formed(self, server):
        responses, rest = _slow_request(server.port).parsed()
        assert len(responses) == 1, (responses, rest)
        assert_json_error(responses[0], 408)


class TestWriteKeyAnswers:
    """
    With write keys: a request without one is 401 with a challenge and a
    JSON reason; with one, 202.
    """

    env = {"WRITE_KEYS": "conformance-key"}

    @pytest.mark.parametrize("route", ["collect", "absolute-form"])
    def test_401_names_its_challenge(self, server, route):
        target = b"/collect" if route == "collect" else b"http://estat.test/collect"
        event_id = new_id("no-key")
        responses, rest = server.exchange(post_event(event_id, target)).parsed()
        assert len(responses) == 1, (responses, rest)
        assert_json_error(responses[0], 401)
        server.never_store.add(event_id)

    def test_key_accepted(self, server):
        event_id = new_id("keyed")
        with server.wire() as wire:
            wire.send(post_event(event_id, headers=[b"Authorization: Bearer conformance-key"])
                      + post_event(new_id("keyed"), headers=[b"X-Write-Key: wrong"]))
            responses = wire.responses(2)
        assert statuses(responses) == [202, 401], responses
        for response in responses:
            assert_well_formed(response)
        server.must_store.add(event_id)

    def test_zz_stored_exactly(self, server):
        assert_stored_exactly(server)


# --- MAX_CONNECTIONS ------------------------------------------------------------------------


class TestMaxConnections:
    """
    Connections past MAX_CONNECTIONS are closed at once, whichever route
    the open ones served; once one closes, a new one is served.
    """

    env = {"MAX_CONNECTIONS": "6", "HTTP_IDLE_TIMEOUT": "30s"}

    def test_connections_on_both_routes_count_against_the_cap(self, server):
        wait_until(lambda: server.estat.metric("http_connections_open") <= 1, 10, 0.1,
                   "the metrics connection to close")
        time.sleep(0.3)
        refused_before = server.estat.metric("http_connections_refused_total")
        wires = []
        try:
            for i in range(6):
                wire = server.wire()
                wires.append(wire)
                if i % 2:
                    wire.send(request(b"GET", OTHER))
                    expected = 200
                else:
                    event_id = new_id("capped")
                    server.must_store.add(event_id)
                    wire.send(post_event(event_id))
                    expected = 202
                assert statuses(wire.responses(1)) == [expected], (i, wire.received)
            for data in (request(b"GET", OTHER), post_event(new_id("over-cap"))):
                with server.wire() as extra:
                    extra.send(data)
                    assert extra.wait_closed(PROMPT), "a connection past the cap was served"
                    assert extra.received == b"", extra.received
            for wire in wires:
                assert not wire.closed
            wires.pop().close()
            time.sleep(0.3)
            event_id = new_id("after-cap")
            with server.wire() as again:
                again.send(post_event(event_id))
                assert statuses(again.responses(1)) == [202], again.received
            server.must_store.add(event_id)
        finally:
            for wire in wires:
                wire.close()
        wait_until(lambda: server.estat.metric("http_connections_open") <= 1, 10, 0.1,
                   "the connections to close")
        assert server.estat.metric("http_connections_refused_total") - refused_before == 2
        assert_stored_exactly(server)


# --- graceful shutdown -----------------------------------------------------------------------


class TestGracefulShutdown:
    """
    SIGTERM: idle keep-alive connections (of either kind of route) are
    closed at once without a byte; a POST in flight on the hot path gets
    its answer with C{Connection: close} and its event is stored.
    (C{/readyz} turning 503 on a request in flight is in
    test_e2e_process.)
    """

    env = {"REQUEST_TIMEOUT": "20s", "SHUTDOWN_TIMEOUT": "20s"}

    def test_sigterm_answers_in_flight_and_closes_idle(self, server):
        estat = server.estat
        in_flight_id, idle_id = new_id("in-flight"), new_id("idle-collect")
        body = event_body(in_flight_id)
        in_flight, idle_collect, idle_other = server.wire(), server.wire(), server.wire()
        unused = server.wire()
        try:
            in_flight.send(request(b"POST", b"/collect", [
                b"Content-Type: application/json", b"Content-Length: %d" % len(body)],
                length=False))
            idle_collect.send(post_event(idle_id))
            assert statuses(idle_collect.responses(1)) == [202], idle_collect.received
            idle_other.send(request(b"GET", OTHER))
            assert statuses(idle_other.responses(1)) == [200], idle_other.received
            idle_collect.received = idle_other.received = b""

            estat.terminate()
            estat.wait_log("shutting down")
            assert idle_collect.wait_closed(PROMPT), "an idle /collect connection stayed open"
            assert idle_other.wait_closed(PROMPT), "an idle /healthz connection stayed open"
            assert unused.wait_closed(PROMPT), "a connection never used stayed open"
            assert idle_collect.received == idle_other.received == unused.received == b""
            assert not in_flight.closed, "the request in flight was cut off"

            in_flight.send(body)
            responses = in_flight.responses(1)
            assert statuses(responses) == [202], (responses, in_flight.received)
            assert responses[0].json() == {"accepted": 1}
            assert responses[0].has_token(b"connection", b"close"), responses
            assert in_flight.wait_closed(PROMPT), "open after its answer during shutdown"
        finally:
            for wire in (in_flight, idle_collect, idle_other, unused):
                wire.close()
        assert estat.wait(30) == 0, estat.log_tail()
        ids = [e.get("id") for e in stored_events_local(estat.store_dir)]
        assert sorted(ids) == sorted([in_flight_id, idle_id]), ids
