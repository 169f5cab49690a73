# -*- test-case-name: estat.test.test_ingest -*-
"""
The transport-neutral ingest core: what an HTTP request is goes in
(L{IngestRequest}), what the answer is comes out (L{Answer}), and the
events it carries are handed to an L{IAdmission}.

Every rule of C{/collect} lives here once: the method, write keys, CORS,
content decoding, JSON / arrays / NDJSON / C{text/plain}, the size and count
limits, the server fields, the 400/401/405/413/415/503 bodies and the
metrics.  The HTTP front ends (the fast protocol and the Klein routes in
L{estat.http}) only frame requests and write answers; they decide nothing.

Nothing here does I/O, touches the reactor or knows about twisted.web.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import attr
import orjson
from zope.interface import implementer

from ..dedup import DedupWindow, find_retries
from ..event import (SERVER_FIELD, ClientAddressResolver, _has_long_digit_run,
                     format_received_at, make_line, make_lines)
from .interfaces import IAdmission
from .access import _VARY, CorsPolicy, WriteKeys
from .body import _NDJSON_SEEN, Limits, decode_content, decode_events, is_ndjson
from .rejected import Rejected
from .validation import admit_both, bad_row, errors_field
from ..metrics import Metrics
from ..queue import EventQueue

__all__ = [
    "Answer",
    "IAdmission",
    "IngestCore",
    "IngestRequest",
    "QueueAdmission",
    "Refusal",
    "error_answer",
]

JSON = b"application/json"
_JSON_HEADER = (b"content-type", JSON)
#: The header fields of a 202, by CORS fields: one tuple per origin, so the
#: front end renders each kind once.
_ACCEPTED_HEADERS: dict = {}
#: The 202 of one event, by CORS fields (the same object each time, which
#: a front end may cache the bytes of).
_ACCEPTED_ANSWERS: dict = {}


class IngestRequest(NamedTuple):
    """
    One HTTP request, as any front end received it.  (A named tuple, not
    an attrs class: one is made per request, and a frozen attrs instance
    costs 1.9 us to make here, a tuple 0.3 us.)

    @ivar headers: lower-case names to values; a field sent several times
        has its values joined with C{b", "} (RFC 9110, 5.3).
    @ivar body: as received: C{Content-Encoding} not yet undone.
    @ivar peer: the socket peer's IP address.
    @ivar received_at: clock seconds when the request was received.
    """

    method: bytes
    path: bytes
    query: bytes
    headers: dict
    body: bytes
    peer: str
    received_at: float


class Answer(NamedTuple):
    """
    What to answer: a status, header fields (lower-case names) and a body.
    The front end adds the framing fields (C{Date}, C{Content-Length},
    C{Connection}).
    """

    status: int
    headers: tuple
    body: bytes


@attr.s(slots=True, frozen=True)
class Refusal:
    """
    Why events were not admitted: the answer is C{status} with
    C{{"error": message}} and, when given, C{Retry-After}.

    @ivar reason: the metric label (C{queue_full}, C{wal_full}, ...).
    """

    status: int = attr.ib()
    reason: str = attr.ib()
    message: str = attr.ib()
    retry_after: int | None = attr.ib(default=None)


@implementer(IAdmission)
@attr.s(slots=True)
class QueueAdmission:
    """
    C{ACK_MODE=memory}: admitted means on the bounded event queue.
    """

    queue: EventQueue = attr.ib()
    retry_after: int = attr.ib(default=1)
    _full: Refusal = attr.ib(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._full = Refusal(503, "queue_full", "event queue is full, retry later",
                             self.retry_after)

    def admit(self, events: list, done: Callable) -> None:
        done(None if self.queue.offer(events) else self._full)

    def try_admit(self, events: list) -> bool:
        """
        Admit C{events} at once if this mode can (C{True}); C{False} means
        nothing was taken and L{admit} decides (it may wait or refuse).
        The ingest core's one-object path asks this first: no callback.
        """
        return self.queue.offer(events)

    def refusal_for(self, count: int) -> Refusal | None:
        """
        The refusal L{admit} would give C{count} events now, or C{None}.
        """
        queue = self.queue
        if queue.closed or count > queue.free:
            return self._full
        return None


def error_answer(status: int, message: str, headers: tuple = (), **extra) -> Answer:
    """
    A JSON error answer: C{{"error": message, ...extra}}.
    """
    body = {"error": message}
    body.update(extra)
    return Answer(status, (_JSON_HEADER,) + headers, orjson.dumps(body))


_ALLOW_POST = (b"allow", b"POST, OPTIONS")
_IN_FLIGHT = Refusal(503, "duplicate_in_flight",
                     "an event with this messageId is still being stored, retry later", 1)
#: RFC 9110, 15.5.2: a 401 names how to authenticate.
_CHALLENGE = ((b"www-authenticate", b'Bearer realm="estat"'),)


def _not_at_once(events: list) -> bool:
    return False


def _rewire(core: "IngestCore", attribute, value):
    object.__setattr__(core, attribute.name, value)
    if hasattr(core, "_one_pass"):
        core._wire()
    return value


@attr.s
class IngestCore:
    """
    The rules of C{POST /collect}.  L{collect} is a handler: an
    L{IngestRequest} and a C{respond} callable that it calls exactly once
    with the L{Answer}, at once or (when the admission waits for a disk or
    the store) later.
    """

    admission = attr.ib(on_setattr=_rewire)
    metrics: Metrics = attr.ib()
    clock = attr.ib()
    client_addresses: ClientAddressResolver = attr.ib(factory=ClientAddressResolver)
    limits: Limits = attr.ib(factory=Limits)
    write_keys: WriteKeys = attr.ib(factory=WriteKeys)
    cors: CorsPolicy = attr.ib(factory=CorsPolicy)
    #: The window of recently admitted message ids (L{estat.dedup}), or None.
    dedup: DedupWindow | None = attr.ib(default=None, on_setattr=_rewire)
    #: Whether C{_estat} names the write key's source (C{WRITE_KEYS=key=name})
    #: as C{source}, when the key has a name: on when the stream is stored as
    #: a table or partitioned by C{source}, off otherwise so that JSON Lines
    #: keep today's bytes.  A key without a name adds nothing (an explicit
    #: null would be kept in every row's C{_extra}).
    record_source: bool = attr.ib(default=False)
    #: The tracking plan's rules (L{estat.ingest.validation}), or None.
    validation = attr.ib(default=None, on_setattr=_rewire)
    #: Where quarantined events go (the bad rows' stream), with a plan.
    bad_admission = attr.ib(default=None)

    def __attrs_post_init__(self) -> None:
        # Decided once, not per request.
        self._keys_required = self.write_keys.required
        resolver = self.client_addresses
        self._peer_is_client = not resolver.trusted and not resolver.anonymize
        self._one_pass = _OnePass(self)

    def _wire(self) -> None:
        # What the one-pass path of handle() needs, looked up again when
        # the admission, the plan or the dedup window change.
        self._one_pass.wire(self)

    def collect(self, request: IngestRequest, respond: Callable[[Answer], None]) -> None:
        """
        Decide C{request}: C{respond(answer)} is called exactly once, at
        once or later.
        """
        answer = self.handle(request, respond)
        if answer is not None:
            respond(answer)

    @property
    def handle(self) -> Callable[[IngestRequest, Callable[[Answer], None]], Answer | None]:
        """
        L{collect} for a front end that can take the answer back:
        C{handle(request, respond)} returns the L{Answer} when it is
        decided before it returns (C{respond} is then never called), or
        C{None}, and C{respond(answer)} is called exactly once (perhaps
        before it returns).

        The common request (one plain JSON object, in a mode that admits
        at once, with no tracking plan and no dedup window) is decided in
        one pass (L{_OnePass}); every other request takes L{_collect},
        where each rule is spelled out.  The test suites drive both.

        (A property giving the one-pass path's own method, which stays the
        same for the life of this core: a front end calls it with no
        L{IngestCore} frame in between.)
        """
        return self._one_pass.handle

    def _accepted(self, cors: tuple, count: int, reply: bytes | None) -> Answer:
        """
        The 202 of C{count} events, its body C{reply} when it is more than
        the count; the answers of one event are made once per CORS kind.
        """
        if reply is None and count == 1:
            answer = _ACCEPTED_ANSWERS.get(cors)
            if answer is None:
                answer = Answer(202, (_JSON_HEADER,) + cors, b'{"accepted":1}')
                if len(_ACCEPTED_ANSWERS) < 256:
                    _ACCEPTED_ANSWERS[cors] = answer
            return answer
        headers = _ACCEPTED_HEADERS.get(cors)
        if headers is None:
            headers = (_JSON_HEADER,) + cors
            if len(_ACCEPTED_HEADERS) < 256:
                _ACCEPTED_HEADERS[cors] = headers
        if reply is None:
            reply = b'{"accepted":%d}' % count
        return Answer(202, headers, reply)

    def _collect(self, request: IngestRequest, respond: Callable[[Answer], None]) -> Answer | None:
        """
        Every rule of C{/collect}, for any request: see L{handle}.
        """
        method = request.method
        if method == b"OPTIONS":
            return Answer(204, self.cors.preflight_headers(request) + (_ALLOW_POST,), b"")
        metrics = self.metrics
        metrics.http_requests.inc()
        received = request.received_at
        cors = self.cors.headers(request)
        if method != b"POST":
            return self._reject(received, 405, "method_not_allowed", "use POST",
                                cors + (_ALLOW_POST,))
        source = None
        if self._keys_required:
            allowed, source = self.write_keys.source(self.write_keys.presented(request))
            if not allowed:
                return self._reject(received, 401, "unauthorized",
                                    "a valid write key is required", cors + _CHALLENGE)
        headers = request.headers
        body = request.body
        items: list = []
        try:
            encoding = headers.get(b"content-encoding")
            if encoding:
                body = decode_content(body, encoding, self.limits.body_size)
            items, batch = decode_events(body, headers.get(b"content-type"), self.limits)
            agent = headers.get(b"user-agent")
            server_fields = {
                "received_at": format_received_at(received),
                "ip": request.peer if self._peer_is_client else self.client_addresses.resolve(
                    request.peer, _forwarded_for(headers)),
                "user_agent": agent.decode("utf-8", "replace") if agent is not None else None,
            }
            if source is not None and self.record_source:
                server_fields["source"] = source
            sorting = None
            if self.validation is not None:
                sorting = self.validation.sort("collect", [obj for obj, _ in items])
            if sorting is not None:
                if sorting.rejected:
                    return self._reject(received, 400, "schema_invalid",
                                        "events do not match their schema", cors,
                                        events=len(items), errors=sorting.rejected)
                events, bad = self._sorted_events(received, items, server_fields, sorting,
                                                  batch)
            elif batch:
                events = self._batch_events(received, items, server_fields)
            else:
                obj, raw = items[0]
                events = [(received, make_line(obj, server_fields, raw))]
        except Rejected as e:
            extra = {"index": e.index} if e.index is not None else {}
            return self._reject(received, e.status, e.reason, e.message, cors,
                                events=max(1, e.count or len(items)), **extra)
        count = len(items)
        if sorting is None:
            bad = []
        accepted = None  # the 202 body, when it is more than the count
        dedup: Any = self.dedup
        fresh: list = []
        ids = [obj.get("messageId") for obj, _ in items] if dedup is not None else []
        if any(ids):
            # Events carrying a messageId admitted within DEDUP_WINDOW are a
            # client's retry: acknowledged, not stored again.
            retries = find_retries(dedup, "collect", ids)
            if retries.pending:
                return self.refused(received, _IN_FLIGHT, cors, count)
            if retries.seen:
                metrics.events_deduplicated.labels("collect").inc(len(retries.seen))
                if sorting is None:
                    events = [e for i, e in enumerate(events) if i not in retries.seen]
                else:
                    events = [e for e in events if e[2] not in retries.seen]
                    bad = [e for e in bad if e[2] not in retries.seen]
                accepted = b'{"accepted":%d,"duplicates":%d}' % (count, len(retries.seen))
                if not events and not bad:
                    metrics.http_requests_accepted.inc()
                    return Answer(202, (_JSON_HEADER,) + cors, accepted)
            fresh = retries.fresh
            if fresh:
                dedup.reserve(fresh)

        def admitted(refusal: Refusal | None) -> None:
            if refusal is None:
                if fresh:
                    dedup.commit(fresh)
                metrics.http_requests_accepted.inc()
                metrics.events_accepted.inc(len(events) + len(bad))
                answer = self._accepted(cors, count, accepted)
                metrics.http_request_duration.observe(self.clock.seconds() - received)
            else:
                if fresh:
                    dedup.release(fresh)
                answer = self.refused(received, refusal, cors, count)
            respond(answer)

        if sorting is None:
            self.admission.admit(events, admitted)
        else:
            admit_both(self.admission, [e[:2] for e in events],
                       self.bad_admission, [e[:2] for e in bad], admitted)
        return None

    def _sorted_events(self, received: float, items: list, server_fields: dict,
                       sorting, batch: bool) -> tuple[list, list]:
        """
        The queued events of a request some of whose events failed their
        schema: C{(good, bad)}, each C{(received_at, line, index)}.  A
        flagged event carries its errors in C{_estat.schema_errors}; a
        quarantined one becomes a bad row, its event whole under C{payload}.
        """
        quarantined, flagged = sorting.quarantined, sorting.flagged
        limit = self.limits.event_size
        overhead = len(orjson.dumps(server_fields)) + len(SERVER_FIELD) + 4
        good, bad = [], []
        for index, (obj, raw) in enumerate(items):
            check = quarantined.get(index)
            if check is not None:
                bad.append((received, bad_row("collect", check, obj, server_fields), index))
                continue
            check = flagged.get(index)
            if check is not None:
                fields = dict(server_fields, schema_errors=errors_field(check))
                good.append((received, make_line(obj, fields, raw), index))
                continue
            line = make_line(obj, server_fields, raw)
            if batch and type(line) is bytes and len(line) - overhead > limit:
                raise Rejected(413, "too_large", f"an event may be at most {limit} bytes",
                                   index)
            good.append((received, line, index))
        return good, bad

    def refused(self, received: float, refusal: Refusal, cors: tuple, count: int) -> Answer:
        """
        The answer to events the admission refused (and its metrics).
        """
        headers = cors
        if refusal.retry_after is not None:
            headers = headers + ((b"retry-after", b"%d" % refusal.retry_after),)
        if refusal.reason == "queue_full":
            self.metrics.http_requests_rejected_queue_full.inc()
        return self._reject(received, refusal.status, refusal.reason, refusal.message,
                            headers, events=count)

    def _batch_events(self, received: float, items: list, server_fields: dict) -> list:
        # Each element's own size is its line minus the server fields
        # (orjson appends them as ',"_estat":{...}').
        overhead = len(orjson.dumps(server_fields)) + len(SERVER_FIELD) + 4
        limit = self.limits.event_size
        try:
            return make_lines(items, server_fields, received, overhead, limit)
        except ValueError as e:
            raise Rejected(413, "too_large", f"an event may be at most {limit} bytes",
                               e.args[0]) from None

    def _reject(self, received: float, status: int, reason: str, message: str,
                headers: tuple, events: int = 1, **extra) -> Answer:
        self.metrics.http_requests_rejected.labels(reason).inc()
        self.metrics.events_rejected.labels(reason).inc(events)
        self.metrics.http_request_duration.observe(self.clock.seconds() - received)
        return error_answer(status, message, headers, **extra)


class _OnePass:
    """
    The one-pass path of L{IngestCore.handle}: the same rules as
    L{IngestCore._collect}, for the common request only, with no closure
    and no temporary object but its line, and every setting it needs
    looked up once (L{wire}) rather than per request.

    A plain class: compiled (L{estat._compiled}), C{core.pxd} makes it a C
    struct whose counters, histogram and formatter are called as C.
    """

    def __init__(self, core: IngestCore) -> None:
        self.core = core
        self._received_at = format_received_at
        metrics = core.metrics
        self._requests = metrics.http_requests
        self._requests_accepted = metrics.http_requests_accepted
        self._events_accepted = metrics.events_accepted
        self._duration = metrics.http_request_duration
        self._seconds = core.clock.seconds
        self._collect = core._collect
        self._event_size = core.limits.event_size
        self._keys_required = core.write_keys.required
        self.write_keys = core.write_keys
        self.cors = core.cors
        self._no_cors = not core.cors.origins
        self.record_source = core.record_source
        self._accepted_plain = core._accepted(_VARY, 1, None)
        self._ndjson_seen = _NDJSON_SEEN
        self.wire(core)

    def wire(self, core: IngestCore) -> None:
        """
        Look up again what may change after the core is made: its
        admission, tracking plan and dedup window.
        """
        try_admit = getattr(core.admission, "try_admit", None)
        self._try_admit = try_admit or _not_at_once
        self.dedup = core.dedup
        self._general = (try_admit is None or core.validation is not None
                         or not core._peer_is_client)

    def handle(self, request: IngestRequest, respond: Callable[[Answer], None]) -> Answer | None:
        """
        L{IngestCore.handle}.
        """
        method, _path, _query, headers, body, peer, received = request
        if method != b"POST" or self._general:
            return self._collect(request, respond)
        if (not body or body[0] != 123 or len(body) > self._event_size  # 123: "{"
                or b"content-encoding" in headers
                or _has_long_digit_run(body)):
            return self._collect(request, respond)
        content_type = headers.get(b"content-type")
        if content_type is not None and self._ndjson_seen.get(content_type) is not False \
                and is_ndjson(content_type):
            return self._collect(request, respond)
        source = None
        if self._keys_required:
            allowed, source = self.write_keys.source(self.write_keys.presented(request))
            if not allowed:
                return self._collect(request, respond)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._collect(request, respond)
        if type(obj) is not dict or SERVER_FIELD in obj or (
                self.dedup is not None and obj.get("messageId")):
            return self._collect(request, respond)
        agent = headers.get(b"user-agent")
        fields = {
            "received_at": self._received_at.format(received),
            "ip": peer,
            "user_agent": agent.decode("utf-8", "replace") if agent is not None else None,
        }
        if source is not None and self.record_source:
            fields["source"] = source
        obj[SERVER_FIELD] = fields
        try:
            # A right-sized copy: see estat.event.make_line.
            line = memoryview(orjson.dumps(obj)).tobytes()
        except (orjson.JSONEncodeError, TypeError):
            del obj[SERVER_FIELD]
            return self._collect(request, respond)
        if not self._try_admit([(received, line)]):
            # Not admitted at once: the general path asks the admission
            # (which may wait, or refuse) with a callback.
            del obj[SERVER_FIELD]
            return self._collect(request, respond)
        self._requests.value += 1
        self._requests_accepted.value += 1
        self._events_accepted.value += 1
        self._duration.observe(self._seconds() - received)
        if self._no_cors:
            return self._accepted_plain
        return self.core._accepted(self.cors.headers(request), 1, None)


def _forwarded_for(headers: dict) -> list | None:
    value = headers.get(b"x-forwarded-for")
    if value is None:
        return None
    return [value.decode("latin-1")]

