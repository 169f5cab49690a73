# -*- test-case-name: estat.test.test_e2e_hostile -*-
"""
Hostile clients against one real C{twistd estat} process: malformed and
devious JSON, bodies at and past the limits, a gzip bomb, lying
C{Content-Length}s, header floods, connection floods and slowloris
clients.

After every attack the server must still be healthy: C{GET /healthz}
answers 200 within a second and a well-behaved client's POST gets 202.
Every event answered 202 here is checked, after the module's last test
stops the process with SIGTERM, to be stored exactly once and exactly as
sent.

Everything talks to 127.0.0.1; the process is ended by its PID; every
wait is bounded.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import json
import os
import select
import socket
import time
import zlib

import attr
import pytest

from estat.test.harness import EstatProcess, LOOPBACK, wait_until

pytestmark = pytest.mark.e2e

MAX_BODY_SIZE = 4096
MAX_BATCH_BODY_SIZE = 65536
REQUEST_TIMEOUT = 2.0
HTTP_IDLE_TIMEOUT = 3.0
MAX_CONNECTIONS = 200

ENV = {
    "MAX_BODY_SIZE": str(MAX_BODY_SIZE),
    "MAX_BATCH_BODY_SIZE": str(MAX_BATCH_BODY_SIZE),
    "REQUEST_TIMEOUT": "2s",
    "HTTP_IDLE_TIMEOUT": "3s",
    "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "FLUSH_INTERVAL": "1s",
    "SHUTDOWN_TIMEOUT": "15s",
}

BIG_INTS = [2 ** 64, 2 ** 64 - 1, -(2 ** 63) - 1, 10 ** 30, -(10 ** 40), 2 ** 200]


# --- the server under attack ------------------------------------------------


@attr.s
class Target:
    """
    The module's Estat process and what it promised to store.

    @ivar must_store: C{{id: event as sent}} of every event answered 202.
    @ivar may_be_poison: ids accepted that the encoder may only be able to
        keep raw, under C{DLQ_PREFIX}.
    """

    estat: EstatProcess = attr.ib()
    must_store: dict = attr.ib(factory=dict)
    may_be_poison: set = attr.ib(factory=set)
    stopped: bool = attr.ib(default=False)

    @property
    def port(self) -> int:
        return self.estat.port

    def accepted(self, event: dict) -> None:
        assert event["id"] not in self.must_store, event["id"]
        self.must_store[event["id"]] = event

    def metric(self, name: str) -> float:
        return self.estat.metric(name)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("estat-hostile")
    estat = EstatProcess(ENV, directory=str(directory))
    try:
        estat.wait_ready()
        yield Target(estat)
    finally:
        estat.stop()


@pytest.fixture(autouse=True)
def stays_healthy(request, target):
    """
    After each attack: C{/healthz} answers 200 within a second, and a
    normal client's event is accepted (and later checked to be stored).
    """
    yield
    if target.stopped:
        return
    started = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, target.port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    assert response.status == 200, (response.status, body, target.estat.log_tail())
    assert elapsed < 1.0, f"/healthz took {elapsed:.2f}s"

    event = {"id": f"normal-{request.node.name}", "kind": "normal", "n": 1}
    status, body = target.estat.post(event, timeout=5.0)
    assert status == 202, (status, body, target.estat.log_tail())
    assert json.loads(body) == {"accepted": 1}
    target.accepted(event)


# --- raw HTTP -----------------------------------------------------------------


@attr.s(frozen=True)
class Response:
    status: int = attr.ib()
    headers: dict = attr.ib()
    body: bytes = attr.ib()

    def json(self):
        assert self.headers.get(b"content-type", b"").startswith(b"application/json"), self
        return json.loads(self.body)


def parse_responses(data: bytes) -> list:
    """
    The complete HTTP/1.1 responses at the start of C{data}, in order.
    """
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            if len(rest) < n:
                break
            body, data = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line, sep, rest = rest.partition(b"\r\n")
                if not sep:
                    return responses
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    _, sep, rest = rest.partition(b"\r\n")
                    break
                body, rest = body + rest[:size], rest[size + 2:]
            data = rest
        else:
            body, data = rest, b""
        responses.append(Response(status, headers, body))
    return responses


def connect(target: Target, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((LOOPBACK, target.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple:
    """
    Read until the peer closes or C{timeout} passes.

    @return: C{(data, closed, seconds)}.
    """
    started = time.monotonic()
    data = b""
    while True:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            return data, False, time.monotonic() - started
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, True, time.monotonic() - started
        data += chunk


def exchange(target: Target, data: bytes, timeout: float = 5.0) -> tuple:
    """
    Send C{data} on a new connection and read until it closes.

    @return: C{(responses, closed, seconds)}.
    """
    sock = connect(target)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the rest was read
        raw, closed, seconds = read_until_closed(sock, timeout)
    finally:
        sock.close()
    return parse_responses(raw), closed, seconds


def request_head(method: bytes = b"POST", path: bytes = b"/collect", headers=()) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: estat.test"]
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post_raw(target: Target, body: bytes, headers=(), timeout: float = 5.0):
    """
    One POST with C{Connection: close}; its single response.
    """
    head = request_head(headers=[b"Content-Length: %d" % len(body), b"Connection: close",
                                 *headers])
    responses, closed, _ = exchange(target, head + body, timeout)
    assert closed, "the server kept a Connection: close connection open"
    assert len(responses) == 1, responses
    return responses[0]


def trickle(sock: socket.socket, data: bytes, interval: float, timeout: float) -> tuple:
    """
    Send C{data} one byte every C{interval} seconds while reading.

    @return: C{(received, closed, seconds, bytes_sent)}; stops as soon as
        the server answers or closes, or after C{timeout}.
    """
    started = time.monotonic()
    received = b""
    sent = 0
    next_send = started
    while True:
        now = time.monotonic()
        if now - started >= timeout:
            return received, False, now - started, sent
        if sent < len(data) and now >= next_send:
            try:
                sock.send(data[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return received, True, now - started, sent
            sent += 1
            next_send = now + interval
        wait = max(0.0, min(next_send - now, timeout - (now - started)))
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return received, True, time.monotonic() - started, sent
            received += chunk
            if parse_responses(received):
                return received, False, time.monotonic() - started, sent


def json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def assert_error(response, status: int) -> dict:
    assert response.status == status, response
    error = response.json()
    assert isinstance(error, dict) and isinstance(error.get("error"), str), error
    return error


# --- bad JSON -------------------------------------------------------------------

#: The slow, exact parser takes a body with a run of 19 digits; each case
#: is tried on both paths.
LONG_DIGITS = b'"pad":12345678901234567890123,'

BAD_BODIES = {
    "truncated": b'{"a":',
    "trailing garbage": b'{"a":1} x',
    "two documents": b'{"a":1}{"b":2}',
    "single quotes": b"{'a':1}",
    "empty": b"",
    "invalid utf-8": b'{"a":"\xff\xfe"}',
    "utf-8 surrogate bytes": b'{"a":"\xed\xa0\x80"}',
    "overlong utf-8": b'{"a":"\xc0\xaf"}',
    "utf-8 bom": b'\xef\xbb\xbf{"a":1}',
    "scalar number": b"42",
    "scalar string": b'"event"',
    "scalar null": b"null",
    "scalar true": b"true",
    "empty array": b"[]",
    "array of scalars": b"[1,2]",
    "NaN": b'{"a":NaN}',
    "Infinity": b'{"a":Infinity}',
    "-Infinity": b'{"a":-Infinity}',
    "number out of float range": b'{"a":1e400}',
    "reserved field": b'{"_estat":{"ip":"6.6.6.6"}}',
    "nested 10000 deep (array)": b"[" * 10000 + b"]" * 10000,
    "nested 10000 deep (in an event)": b'[{"a":' + b"[" * 10000 + b"]" * 10000 + b"}]",
    "nested 2000 deep (one event)": b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}",
}


def with_long_digits(body: bytes) -> bytes:
    """
    The same defect in a body that also has a 19-digit run.
    """
    stripped = body.lstrip(b"\xef\xbb\xbf")
    if stripped.startswith(b'{"'):
        return body.replace(b"{", b"{" + LONG_DIGITS, 1)
    if stripped.startswith(b'[{"'):
        return body.replace(b"[{", b"[{" + LONG_DIGITS, 1)
    return body + b" 12345678901234567890123"


@pytest.mark.parametrize("path", ["fast", "exact"])
@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_json_is_400(target, name, path):
    body = BAD_BODIES[name]
    if path == "exact":
        body = with_long_digits(body)
        assert b"1234567890123456789" in body
    assert len(body) <= MAX_BATCH_BODY_SIZE
    response = post_raw(target, body, [b"Content-Type: application/json"])
    assert_error(response, 400)


def test_bad_ndjson_line_is_400_with_its_index(target):
    body = b'{"id":"nd-0"}\n{"id":"nd-1"}\n{"id":\xff}\n'
    response = post_raw(target, body, [b"Content-Type: application/x-ndjson"])
    assert assert_error(response, 400)["index"] == 2


def test_integers_beyond_64_bits_are_kept_exactly(target):
    """
    Big integers alone, in an array batch and in NDJSON: all 202, and
    (checked at the end) stored as the same integers.
    """
    single = {"id": "big-single", "values": BIG_INTS, "nested": {"n": 2 ** 65}}
    response = post_raw(target, json_body(single), [b"Content-Type: application/json"])
    assert response.status == 202, response
    target.accepted(single)

    batch = [{"id": f"big-array-{i}", "n": n} for i, n in enumerate(BIG_INTS)]
    response = post_raw(target, json_body(batch), [b"Content-Type: application/json"])
    assert response.status == 202, response
    assert response.json() == {"accepted": len(batch)}
    for event in batch:
        target.accepted(event)

    lines = [{"id": f"big-ndjson-{i}", "n": -n} for i, n in enumerate(BIG_INTS)]
    body = b"\n".join(json_body(e) for e in lines) + b"\n"
    response = post_raw(target, body, [b"Content-Type: application/x-ndjson"])
    assert response.status == 202, response
    for event in lines:
        target.accepted(event)


def test_duplicate_keys_last_one_wins(target):
    """
    Accepted; the stored line has the key once, with the last value
    (checked at the end on the raw stored line).
    """
    body = b'{"id":"dup-keys","dup":1,"x":{"k":"a","k":"b"},"dup":2}'
    response = post_raw(target, body, [b"Content-Type: application/json"])
    assert response.status == 202, response
    target.accepted({"id": "dup-keys", "dup": 2, "x": {"k": "b"}})


def test_lone_surrogate_escape_is_refused_or_kept_raw(target):
    """
    C{"\\ud800"} is grammatical JSON that no UTF-8 line can hold.  The
    fast parser refuses it; if the exact parser accepts it, the event
    must not be lost: its raw original is kept under C{DLQ_PREFIX}.
    """
    for name, body in [("fast", b'{"id":"surrogate-fast","s":"\\ud800"}'),
                       ("exact", b'{"id":"surrogate-exact","n":12345678901234567890123,'
                                 b'"s":"\\ud800"}')]:
        response = post_raw(target, body, [b"Content-Type: application/json"])
        assert response.status in (202, 400), (name, response)
        if response.status == 202:
            target.accepted({"id": f"surrogate-{name}", "raw": body.decode("ascii")})
            target.may_be_poison.add(f"surrogate-{name}")


# --- sizes ------------------------------------------------------------------------


def padded_event(event_id: str, size: int) -> bytes:
    body = json_body({"id": event_id, "pad": ""})
    body = json_body({"id": event_id, "pad": "x" * (size - len(body))})
    assert len(body) == size
    return body


def test_body_exactly_at_max_body_size_is_accepted(target):
    body = padded_event("exact-size", MAX_BODY_SIZE)
    response = post_raw(target, body, [b"Content-Type: application/json"])
    assert response.status == 202, response
    target.accepted(json.loads(body))


def test_body_one_byte_over_max_body_size_is_413(target):
    before = target.metric('http_requests_rejected_total{reason="too_large"}')
    body = padded_event("one-over", MAX_BODY_SIZE + 1)
    response = post_raw(target, body, [b"Content-Type: application/json"])
    assert_error(response, 413)
    assert target.metric('http_requests_rejected_total{reason="too_large"}') == before + 1


def batch_body(prefix: str, size: int) -> tuple:
    """
    A JSON array of small events exactly C{size} bytes long.
    """
    count = 20
    events = [{"id": f"{prefix}-{i}", "pad": ""} for i in range(count)]
    room = size - len(json_body(events))
    for i, event in enumerate(events):
        event["pad"] = "y" * (room // count + (1 if i < room % count else 0))
    body = json_body(events)
    assert len(body) == size
    return body, events


def test_batch_exactly_at_max_batch_body_size_is_accepted(target):
    body, events = batch_body("exact-batch", MAX_BATCH_BODY_SIZE)
    response = post_raw(target, body, [b"Content-Type: application/json"])
    assert response.status == 202, response
    assert response.json() == {"accepted": len(events)}
    for event in events:
        target.accepted(event)


def test_batch_one_byte_over_is_413_before_the_body_is_read(target):
    body, _ = batch_body("over-batch", MAX_BATCH_BODY_SIZE + 1)
    head = request_head(headers=[b"Content-Type: application/json",
                                 b"Content-Length: %d" % len(body)])
    sock = connect(target)
    try:
        # Only the head: the answer comes from Content-Length alone.
        sock.sendall(head)
        raw, closed, seconds = read_until_closed(sock, 3.0)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert len(responses) == 1, raw
    error = assert_error(responses[0], 413)
    assert error["limit"] == MAX_BATCH_BODY_SIZE
    assert closed, "a 413 connection must be closed"


def test_chunked_body_growing_past_the_limit_is_413_before_its_end(target):
    """
    A chunked NDJSON body that never ends: the server answers 413 as
    soon as it passes the limit, while the client is still sending.
    """
    line = json_body({"pad": "z" * 1000}) + b"\n"
    chunk = line * 8
    sock = connect(target)
    sent = 0
    raw = b""
    try:
        sock.sendall(request_head(headers=[b"Content-Type: application/x-ndjson",
                                           b"Transfer-Encoding: chunked"]))
        for _ in range(4 * MAX_BATCH_BODY_SIZE // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
        # The terminating chunk is never sent.
        raw, closed, _ = read_until_closed(sock, 3.0)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert len(responses) == 1, raw
    assert_error(responses[0], 413)
    assert MAX_BATCH_BODY_SIZE < sent <= MAX_BATCH_BODY_SIZE + 2 * len(chunk), sent
    assert closed


def test_gzip_bomb_is_413(target):
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), 9)
    assert len(bomb) < MAX_BATCH_BODY_SIZE
    response = post_raw(target, bomb, [b"Content-Type: application/json",
                                       b"Content-Encoding: gzip"])
    assert_error(response, 413)


def test_deflate_bomb_is_413(target):
    body = zlib.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", 9)
    response = post_raw(target, body, [b"Content-Type: application/json",
                                       b"Content-Encoding: deflate"])
    assert_error(response, 413)


def test_truncated_gzip_is_400(target):
    body = gzip.compress(json_body({"id": "never"}))[:-6]
    response = post_raw(target, body, [b"Content-Type: application/json",
                                       b"Content-Encoding: gzip"])
    assert_error(response, 400)


# --- lying Content-Length -----------------------------------------------------


def test_content_length_longer_than_the_body_is_408(target):
    before = target.metric('http_requests_rejected_total{reason="request_timeout"}')
    head = request_head(headers=[b"Content-Type: application/json", b"Content-Length: 100"])
    sock = connect(target)
    try:
        sock.sendall(head + b'{"id":"x"}')
        raw, closed, seconds = read_until_closed(sock, REQUEST_TIMEOUT + 3)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert len(responses) == 1, raw
    assert_error(responses[0], 408)
    assert closed
    assert REQUEST_TIMEOUT - 0.5 <= seconds <= REQUEST_TIMEOUT + 1.5, seconds
    after = target.metric('http_requests_rejected_total{reason="request_timeout"}')
    assert after == before + 1


def test_content_length_shorter_than_the_body(target):
    """
    Declares 10 bytes, sends 100: the first 10 are the event, the other
    90 are read as the next request, which is garbage: 400 and closed.
    """
    event = b'{"id":"Q"}'
    assert len(event) == 10
    garbage = b"x" * 88 + b"\r\n"
    head = request_head(headers=[b"Content-Type: application/json", b"Content-Length: 10"])
    responses, closed, _ = exchange(target, head + event + garbage, timeout=5.0)
    assert closed
    assert [r.status for r in responses] == [202, 400], responses
    target.accepted({"id": "Q"})


# --- headers ---------------------------------------------------------------------


def test_600_headers_is_431(target):
    """
    More header fields than MAX_HEADER_FIELDS (100): 431 with a JSON
    reason, the connection closed, nothing accepted.
    """
    headers = [b"X-Flood-%d: v" % i for i in range(600)]
    responses, closed, _ = exchange(
        target, request_head(headers=[*headers, b"Content-Length: 2"]) + b"{}")
    assert [r.status for r in responses] == [431], responses
    assert_error(responses[0], 431)
    assert closed


def test_20kb_of_headers_is_431(target):
    headers = [b"X-Flood-%d: %s" % (i, b"v" * 100) for i in range(90)] * 2
    assert sum(map(len, headers)) > 20000
    responses, closed, _ = exchange(
        target, request_head(headers=[*headers, b"Content-Length: 2"]) + b"{}")
    assert [r.status for r in responses] == [431], responses
    assert_error(responses[0], 431)
    assert closed


def test_one_20kb_header_line_is_431(target):
    """
    One header line past the 16 KiB header section: 431 with a JSON
    reason (not a silent close), never accepted.
    """
    head = request_head(headers=[b"X-Huge: " + b"v" * 20000, b"Content-Length: 2"])
    responses, closed, _ = exchange(target, head + b"{}")
    assert closed
    assert [r.status for r in responses] == [431], responses
    assert_error(responses[0], 431)


# --- methods and paths ------------------------------------------------------------


def test_unknown_method_is_501(target):
    """
    A method HTTP does not define (RFC 9110, 9.1): 501, and the
    connection closed.
    """
    head = request_head(b"BREW", headers=[b"Content-Length: 2", b"Connection: close"])
    responses, closed, _ = exchange(target, head + b"{}")
    assert len(responses) == 1, responses
    assert_error(responses[0], 501)
    assert closed


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"PATCH"])
def test_other_methods_on_collect_are_405(target, method):
    head = request_head(method, headers=[b"Content-Length: 2", b"Connection: close"])
    responses, closed, _ = exchange(target, head + b"{}")
    assert len(responses) == 1, responses
    assert_error(responses[0], 405)
    assert b"POST" in responses[0].headers[b"allow"]


@pytest.mark.parametrize("path", [b"/nope", b"/collect/extra", b"/../../etc/passwd",
                                  b"/%00", b"/" + b"a" * 4000])
def test_unknown_path_is_404(target, path):
    responses, closed, _ = exchange(
        target, request_head(b"GET", path, headers=[b"Connection: close"]))
    assert len(responses) == 1, responses
    assert assert_error(responses[0], 404) == {"error": "not found"}


# --- slow clients ---------------------------------------------------------------------


def test_slowloris_body_is_408(target):
    head = request_head(headers=[b"Content-Type: application/json", b"Content-Length: 50"])
    sock = connect(target)
    try:
        sock.sendall(head)
        received, closed, seconds, sent = trickle(sock, b"{" * 50, 0.5, REQUEST_TIMEOUT + 4)
    finally:
        sock.close()
    responses = parse_responses(received)
    assert len(responses) == 1, (received, closed, seconds)
    assert_error(responses[0], 408)
    assert REQUEST_TIMEOUT - 0.5 <= seconds <= REQUEST_TIMEOUT + 1.5, seconds


def test_slowloris_headers_are_408(target):
    sock = connect(target)
    try:
        sock.sendall(b"POST /collect HTTP/1.1\r\nHost: estat.test\r\n")
        received, closed, seconds, sent = trickle(
            sock, b"X-Slow: " + b"a" * 100, 0.5, REQUEST_TIMEOUT + 4)
    finally:
        sock.close()
    responses = parse_responses(received)
    assert len(responses) == 1, (received, closed, seconds)
    assert_error(responses[0], 408)
    assert REQUEST_TIMEOUT - 0.5 <= seconds <= REQUEST_TIMEOUT + 1.5, seconds


@pytest.mark.parametrize("keep_alive_first", [False, True],
                         ids=["new connection", "after a keep-alive request"])
def test_slowloris_request_line_is_cut_off(target, keep_alive_first):
    """
    The request line itself, one byte every 0.5 s: each byte resets the
    idle timeout, so only the request deadline can end it.  The head of
    a request must arrive within REQUEST_TIMEOUT however it trickles.
    """
    sock = connect(target)
    try:
        if keep_alive_first:
            body = json_body({"id": "before-slow-line"})
            sock.sendall(request_head(headers=[b"Content-Type: application/json",
                                               b"Content-Length: %d" % len(body)]) + body)
            raw = b""
            deadline = time.monotonic() + 5
            while not parse_responses(raw) and time.monotonic() < deadline:
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable:
                    raw += sock.recv(65536)
            assert [r.status for r in parse_responses(raw)] == [202], raw
            target.accepted({"id": "before-slow-line"})
        line = b"POST /collect?" + b"a" * 200 + b" HTTP/1.1"
        received, closed, seconds, sent = trickle(sock, line, 0.5, REQUEST_TIMEOUT + 4)
    finally:
        sock.close()
    assert closed or parse_responses(received), (
        f"the connection was still open after {seconds:.1f}s of a trickled request "
        f"line ({sent} bytes); REQUEST_TIMEOUT is {REQUEST_TIMEOUT}s")
    assert seconds <= REQUEST_TIMEOUT + 1.5, seconds
    for response in parse_responses(received):
        assert response.status == 408, response


# --- connection floods ---------------------------------------------------------------


def poll_closed(socks: dict, timeout: float) -> dict:
    """
    Wait up to C{timeout} for the sockets of C{socks} (C{{index: sock}})
    to be closed by the server; C{{index: monotonic time of close}}.
    Data received instead of a close counts as a close at that time
    (and is a failure the caller sees as a wrong index set).
    """
    closed = {}
    deadline = time.monotonic() + timeout
    waiting = dict(socks)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select(list(waiting.values()), [], [], min(left, 0.5))
        now = time.monotonic()
        by_sock = {s: i for i, s in waiting.items()}
        for sock in readable:
            i = by_sock[sock]
            try:
                data = sock.recv(1024)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"socket {i} received {data!r}"
            closed[i] = now
            del waiting[i]
    return closed


def test_connections_beyond_max_connections_are_closed_at_once(target):
    """
    MAX_CONNECTIONS + 20 idle sockets: the 20 extra are closed at once
    and counted; the others are held until HTTP_IDLE_TIMEOUT, then closed.
    """
    refused_before = target.metric("http_connections_refused_total")
    # Only the metrics request's own connection; then a moment for the
    # server to see that one closed too, so that all MAX_CONNECTIONS slots
    # are free for the flood.
    wait_until(lambda: target.metric("http_connections_open") <= 1, 10, 0.1,
               "leftover connections to close")
    time.sleep(0.3)
    extra = 20
    socks = {}
    opened_at = {}
    try:
        for i in range(MAX_CONNECTIONS + extra):
            socks[i] = connect(target)
            opened_at[i] = time.monotonic()
        burst = opened_at[MAX_CONNECTIONS + extra - 1] - opened_at[0]
        closed = poll_closed(socks, 1.0)
        refused = {i for i, at in closed.items() if at - opened_at[i] < 1.5}
        # Which sockets are refused depends on the order the kernel hands
        # connections to the server (a burst overflows the listen backlog
        # and some connect late), not on the order they were opened: count
        # them, do not name them.
        if burst < HTTP_IDLE_TIMEOUT - 1.0:
            assert len(refused) == extra, (sorted(refused), burst)
            assert len(closed) == extra, sorted(closed)
        else:
            # A slow burst (the kernel delayed some connects): early closes
            # were seen late and some held ones may have idled out already,
            # so count the refusals where the server counts them.
            refused = set(range(extra))
            wait_until(lambda: target.metric("http_connections_refused_total")
                       - refused_before >= extra, 5, 0.1, "the refusals to be counted")

        held = {i: s for i, s in socks.items() if i not in closed}
        idled = poll_closed(held, HTTP_IDLE_TIMEOUT + 3.0)
        assert set(idled) == set(held), f"{len(held) - len(idled)} idle sockets never closed"
        for i, at in idled.items():
            idle = at - opened_at[i]
            # Measured from the client's connect; the server's clock starts
            # when it accepts, which a backlog overflow can delay by a SYN
            # retry (1 s, then 3 s).
            assert HTTP_IDLE_TIMEOUT - 0.5 <= idle <= HTTP_IDLE_TIMEOUT + 4.5, (i, idle)
    finally:
        for sock in socks.values():
            sock.close()
    wait_until(lambda: target.metric("http_connections_open") <= 1, 10, 0.1,
               "the flood's connections to be gone")
    refused_after = target.metric("http_connections_refused_total")
    assert refused_after - refused_before == len(refused)


# --- the end: everything accepted is stored --------------------------------------------


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicated = [k for k, n in collections.Counter(keys).items() if n > 1]
    assert not duplicated, f"a stored line repeats keys {duplicated}"
    return dict(pairs)


def stored_lines(directory: str) -> list:
    """
    C{(key, raw line, event)} of every line of every object of a
    directory store; each line checked to have no repeated key.
    """
    lines = []
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if not name.endswith(".jsonl.gz"):
                continue
            path = os.path.join(root, name)
            key = os.path.relpath(path, directory).replace(os.sep, "/")
            with open(path, "rb") as f:
                text = gzip.decompress(f.read())
            assert text.endswith(b"\n"), key
            for raw in text[:-1].split(b"\n"):
                lines.append((key, raw, json.loads(raw, object_pairs_hook=_unique_keys)))
    return lines


def test_zz_sigterm_drains_and_every_accepted_event_is_stored_exactly(target):
    """
    Last: SIGTERM; the process exits 0, and every event answered 202 in
    this module is stored exactly once, exactly as sent.
    """
    estat = target.estat
    target.stopped = True
    estat.terminate()
    assert estat.wait(30) == 0, estat.log_tail()

    lines = stored_lines(estat.store_dir)
    raw_events = collections.defaultdict(list)
    poison = {}
    for key, raw, event in lines:
        if key.startswith("raw/"):
            raw_events[event.get("id")].append((raw, event))
        elif key.startswith("raw_dlq/"):
            original = json.loads(event["raw"])
            poison[original["id"]] = event
        else:
            raise AssertionError(f"unexpected key {key}")

    duplicated = {i: len(v) for i, v in raw_events.items() if len(v) > 1}
    assert not duplicated, duplicated
    unexpected = set(raw_events) - set(target.must_store)
    assert not unexpected, f"stored events never accepted: {sorted(unexpected)[:10]}"

    missing = []
    for event_id, sent in target.must_store.items():
        if event_id in target.may_be_poison:
            if event_id in poison:
                assert poison[event_id]["raw"] == sent["raw"]
                assert poison[event_id]["_estat"]["ip"] == LOOPBACK
            else:
                assert event_id in raw_events, event_id
            continue
        if event_id not in raw_events:
            missing.append(event_id)
            continue
        (raw, stored), = raw_events[event_id]
        server = stored.pop("_estat")
        assert stored == sent, (event_id, raw)
        assert server["ip"] == LOOPBACK
        # Integers are kept as integers, exactly, in the stored text.
        for value in sent.get("values", []) + [sent.get("n")]:
            if isinstance(value, int) and abs(value) >= 2 ** 63:
                assert str(value).encode() in raw, (value, raw)
    assert not missing, f"{len(missing)} accepted events lost: {missing[:10]}"
    dup_line = raw_events["dup-keys"][0][0]
    assert dup_line.count(b'"dup"') == 1 and dup_line.count(b'"k"') == 1, dup_line
