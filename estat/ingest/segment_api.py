# -*- test-case-name: estat.test.test_ingest_segment_api -*-
"""
Segment's HTTP tracking API as ingest handlers: each takes an
L{estat.ingest.core.IngestRequest} and calls C{respond} once with an
L{estat.ingest.core.Answer}, so the fast protocol and the Klein routes serve
them alike.

 - C{POST /v1/track} ... C{/v1/batch} and analytics.js's short forms
   (C{/v1/t} ... C{/v1/b}): C{200 {"success":true}}, or 400 (which the SDKs
   drop), 401, 503 with C{Retry-After} (which they retry);
 - C{GET /v1/pixel/track?data=<base64 JSON>} and C{/v1/pixel/page}: always
   a 1x1 GIF that no cache keeps; refusals are only counted;
 - C{GET /v1/projects/<writeKey>/settings}: the settings analytics.js loads
   from C{cdnURL}, naming this server (C{PUBLIC_URL}, or the request's
   C{Host}) as its API host.

The rules of a message live in L{estat.ingest.segment_rules}; this module reads the
request (write key, body encoding, client address) and writes answers.  A
batch is all or nothing.  A message whose C{messageId} was admitted within
the dedup window is acknowledged and not stored again.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Callable
from urllib.parse import unquote_to_bytes

import attr
import orjson

from ..dedup import DedupWindow, find_retries
from ..event import ClientAddressResolver, format_received_at, make_line
from .core import Answer, IngestRequest, Refusal, error_answer
from ..metrics import Metrics
from .segment_rules import (
    EVENT_ROUTES,
    PIXEL_ROUTES,
    Received,
    SegmentLimits,
    decode_pixel,
    messages_of,
    new_message_id,
    normalise,
    parse_document,
    server_fields,
    settings_document,
    to_lines,
    write_key_of,
)
from .access import CorsPolicy, WriteKeys, query_values
from .body import decode_content
from .rejected import Rejected
from .validation import admit_both, bad_row, errors_field

__all__ = ["SegmentAPI", "PIXEL_GIF", "SETTINGS_PREFIX", "SETTINGS_SUFFIX", "basic_auth_user"]

#: The smallest transparent GIF: 1x1, one colour, 43 bytes.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

SETTINGS_PREFIX = b"/v1/projects/"
SETTINGS_SUFFIX = b"/settings"

_JSON = (b"content-type", b"application/json")
_SUCCESS = b'{"success":true}'
_ALLOW_POST = (b"allow", b"POST, OPTIONS")
_ALLOW_GET = (b"allow", b"GET, HEAD, OPTIONS")
_NO_STORE = (b"cache-control", b"no-cache, no-store, must-revalidate")
#: RFC 9110, 15.5.2: a 401 names how to authenticate; Segment's way is
#: HTTP Basic with the write key as the user name.
_CHALLENGE = ((b"www-authenticate", b'Basic realm="estat"'),)
_GIF_HEADERS = ((b"content-type", b"image/gif"), _NO_STORE, (b"pragma", b"no-cache"),
                (b"expires", b"0"))
#: analytics.js sends Authorization (so a preflight) and, on retries,
#: X-Retry-Count; the server SDKs never preflight.
_ALLOWED_HEADERS = b"Content-Type, Content-Encoding, Authorization, X-Retry-Count, X-Write-Key"
_HOST = re.compile(rb"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})|\[[0-9A-Fa-f:.]{2,45}\])"
                   rb"(?::[0-9]{1,5})?$")


def basic_auth_user(credentials: bytes) -> bytes | None:
    """
    The user name of HTTP Basic credentials (C{base64(user:password)}): the
    write key, in Segment's scheme (the password is empty).
    """
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user = decoded.split(b":", 1)[0]
    return user or None


def _query(request: IngestRequest) -> dict:
    return query_values(request.query)


@attr.s
class SegmentAPI:
    """
    The Segment routes.

    @ivar admission: where accepted messages go (the Segment stream's
        L{estat.ingest.core.IAdmission}: its own queue, batcher and prefix).
    @ivar dedup: the window of admitted message ids, or C{None}.
    @ivar public_url: C{PUBLIC_URL}: C{https://collect.example.com}, or
        empty to name the request's C{Host}.
    @ivar stream: the label of this stream in the metrics.
    """

    admission = attr.ib()
    metrics: Metrics = attr.ib()
    clock = attr.ib()
    client_addresses: ClientAddressResolver = attr.ib(factory=ClientAddressResolver)
    write_keys: WriteKeys = attr.ib(factory=WriteKeys)
    cors: CorsPolicy = attr.ib(factory=CorsPolicy)
    limits: SegmentLimits = attr.ib(factory=SegmentLimits)
    dedup: DedupWindow | None = attr.ib(default=None)
    public_url: str = attr.ib(default="")
    new_id: Callable[[], str] = attr.ib(default=new_message_id)
    stream: str = attr.ib(default="segment")
    #: The tracking plan's rules (L{estat.ingest.validation}), or None.
    validation = attr.ib(default=None)
    #: Where quarantined messages go (the bad rows' stream), with a plan.
    bad_admission = attr.ib(default=None)

    def routes(self) -> dict:
        """
        C{{path: handler}} of every fixed path, for the fast protocol.
        """
        routes = {path: self.events for path in EVENT_ROUTES}
        routes.update({path: self.pixel for path in PIXEL_ROUTES})
        return routes

    def handler_for(self, path: bytes):
        """
        The handler of C{path}, the settings route included, or C{None}.
        """
        if path in EVENT_ROUTES:
            return self.events
        if path in PIXEL_ROUTES:
            return self.pixel
        if path.startswith(SETTINGS_PREFIX) and path.endswith(SETTINGS_SUFFIX) and \
                len(path) > len(SETTINGS_PREFIX) + len(SETTINGS_SUFFIX):
            return self.settings
        return None

    # --- answers ---------------------------------------------------------

    def _preflight(self, request: IngestRequest, methods: bytes, allow: tuple) -> Answer:
        headers = self.cors.headers(request)
        if self.cors.allowed_origin(request) is not None:
            headers = headers + (
                (b"access-control-allow-methods", methods),
                (b"access-control-allow-headers", _ALLOWED_HEADERS),
                (b"access-control-max-age", b"%d" % self.cors.max_age),
            )
        return Answer(204, headers + (allow,), b"")

    def _count_rejected(self, reason: str, events: int) -> None:
        self.metrics.http_requests_rejected.labels(reason).inc()
        self.metrics.events_rejected.labels(reason).inc(events)

    def _reject(self, status: int, reason: str, message: str, headers: tuple,
                events: int = 1, **extra) -> Answer:
        self._count_rejected(reason, events)
        return error_answer(status, message, headers, **extra)

    def _refused(self, refusal: Refusal, headers: tuple, events: int) -> Answer:
        if refusal.retry_after is not None:
            headers = headers + ((b"retry-after", b"%d" % refusal.retry_after),)
        if refusal.reason == "queue_full":
            self.metrics.http_requests_rejected_queue_full.inc()
        return self._reject(refusal.status, refusal.reason, refusal.message, headers, events)

    # --- write keys -------------------------------------------------------

    def _header_key(self, request: IngestRequest) -> bytes | None:
        """
        The write key in the request's fields: HTTP Basic (Segment's way),
        C{?writeKey=}, or Estat's own (C{X-Write-Key}, Bearer,
        C{?write_key=}).
        """
        auth = request.headers.get(b"authorization")
        if auth and auth[:6].lower() == b"basic ":
            user = basic_auth_user(auth[6:])
            if user:
                return user
        values = _query(request).get(b"writeKey")
        if values and values[0]:
            return values[0]
        return self.write_keys.presented(request)

    def _authorise(self, presented: bytes | None) -> tuple[bool, str | None]:
        """
        C{(allowed, source name)}.
        """
        if not self.write_keys.required:
            return True, None
        return self.write_keys.source(presented)

    # --- event routes -----------------------------------------------------

    def events(self, request: IngestRequest, respond: Callable[[Answer], None]) -> None:
        """
        C{POST /v1/track} ... C{/v1/batch}, C{/v1/t} ... C{/v1/b}.
        """
        method = request.method
        if method == b"OPTIONS":
            respond(self._preflight(request, b"POST, OPTIONS", _ALLOW_POST))
            return
        self.metrics.http_requests.inc()
        cors = self.cors.headers(request)
        if method != b"POST":
            respond(self._reject(405, "method_not_allowed", "use POST", cors + (_ALLOW_POST,)))
            return
        presented = self._header_key(request)
        if presented is not None and self.write_keys.required and \
                not self.write_keys.matches(presented):
            respond(self._reject(401, "unauthorized", "a valid write key is required",
                                 cors + _CHALLENGE))
            return
        route_type = EVENT_ROUTES[request.path]
        try:
            body = request.body
            encoding = request.headers.get(b"content-encoding")
            if encoding:
                body = decode_content(body, encoding, self.limits.batch_size)
            doc = parse_document(body, route_type, self.limits)
        except Rejected as e:
            status, reason = e.segment()
            respond(self._reject(status, reason, e.message, cors))
            return
        if presented is None:
            key = write_key_of(doc)
            presented = key.encode("utf-8") if key is not None else None
        allowed, source = self._authorise(presented)
        if not allowed:
            respond(self._reject(401, "unauthorized", "a valid write key is required",
                                 cors + _CHALLENGE))
            return
        try:
            checked, defaults = messages_of(doc, route_type, self.limits)
        except Rejected as e:
            extra = {"index": e.index} if e.index is not None else {}
            status, reason = e.segment()
            respond(self._reject(status, reason, e.message, cors, e.count or 1, **extra))
            return

        success = Answer(200, (_JSON,) + cors, _SUCCESS)

        def answer(refusal: Refusal | None, count: int, errors: list | None = None) -> Answer:
            if refusal is None:
                return success
            if errors is not None:
                return self._reject(refusal.status, refusal.reason, refusal.message, cors,
                                    count, errors=errors)
            return self._refused(refusal, cors, count)

        self._store(request, checked, defaults, presented, source, answer, respond)

    def _store(self, request: IngestRequest, checked: list, defaults: dict,
               presented: bytes | None, source: str | None,
               answer: Callable[[Refusal | None, int], Answer],
               respond: Callable[[Answer], None]) -> None:
        """
        Normalise, drop retries, admit (all or nothing) and answer.
        """
        received_at = request.received_at
        text = format_received_at(received_at)
        resolver = self.client_addresses
        forwarded = request.headers.get(b"x-forwarded-for")
        received = Received(
            received_at=received_at,
            ip=resolver.resolve(request.peer,
                                [forwarded.decode("latin-1")] if forwarded else None),
            user_agent=_text(request.headers.get(b"user-agent")),
            source=source,
            anonymize=resolver.anonymize,
        )
        sorting = None
        if self.validation is not None:
            # The message as the client sent it (a /v1/track body may leave
            # out the type its route gives it).
            sorting = self.validation.sort(
                self.stream,
                [message if "type" in message else dict(message, type=kind)
                 for kind, message in checked],
                [message.get("event") if kind == "track" else kind
                 for kind, message in checked])
            if sorting is not None and sorting.rejected:
                respond(answer(Refusal(400, "schema_invalid",
                                       "messages do not match their schema"), len(checked),
                               sorting.rejected))
                return
        new_id = self.new_id
        messages = [normalise(kind, message, defaults, received, text, new_id)
                    for kind, message in checked]
        dedup = self.dedup
        # Only a client's own ids can come back in a retry.
        retries = find_retries(
            dedup, self.stream + ":" + (presented or b"").decode("latin-1"),
            [message.get("messageId") for _, message in checked])
        if retries.pending:
            # The same message is being admitted for an earlier request (a
            # retry after a timeout): its outcome is not known yet.
            respond(answer(Refusal(503, "duplicate_in_flight",
                                   "this batch is still being stored, retry later", 1),
                           len(messages)))
            return
        fresh = retries.fresh
        bad = []
        if sorting is not None:
            events, bad = self._sorted_lines(checked, messages, sorting, retries.seen,
                                             received, text)
            count = len(events) + len(bad)
        if retries.seen:
            self.metrics.events_deduplicated.labels(self.stream).inc(len(retries.seen))
            messages = [m for i, m in enumerate(messages) if i not in retries.seen]
        if not messages:
            self.metrics.http_requests_accepted.inc()
            respond(answer(None, 0))
            return
        if sorting is None:
            count = len(messages)
            events = to_lines(messages, received, text)
        if fresh:
            dedup.reserve(fresh)

        def admitted(refusal: Refusal | None) -> None:
            if refusal is None:
                if fresh:
                    dedup.commit(fresh)
                self.metrics.http_requests_accepted.inc()
                self.metrics.events_accepted.inc(count)
            elif fresh:
                dedup.release(fresh)
            respond(answer(refusal, count))

        if sorting is None:
            self.admission.admit(events, admitted)
        else:
            admit_both(self.admission, events, self.bad_admission, bad, admitted)

    def _sorted_lines(self, checked: list, messages: list, sorting, seen,
                      received: Received, text: str) -> tuple[list, list]:
        """
        C{(good, bad)} queued events of a batch some of whose messages
        failed their schema: a flagged message carries its errors in
        C{_estat.schema_errors}; a quarantined one becomes a bad row, the
        message as sent (less its C{writeKey}) under C{payload}.
        """
        fields = server_fields(received, text)
        when = received.received_at
        good, bad = [], []
        for index, message in enumerate(messages):
            if index in seen:
                continue
            check = sorting.quarantined.get(index)
            if check is not None:
                kind, payload = checked[index]
                if "writeKey" in payload:
                    payload = {k: v for k, v in payload.items() if k != "writeKey"}
                bad.append((when, bad_row(self.stream, check, payload, fields, kind)))
                continue
            check = sorting.flagged.get(index)
            own = fields if check is None else dict(fields, schema_errors=errors_field(check))
            good.append((when, make_line(message, own, None)))
        return good, bad

    # --- the pixel --------------------------------------------------------

    def pixel(self, request: IngestRequest, respond: Callable[[Answer], None]) -> None:
        """
        C{GET /v1/pixel/track?data=...}: always the GIF; the message is
        stored if it is valid, and a refusal is only counted.
        """
        method = request.method
        if method == b"OPTIONS":
            respond(self._preflight(request, b"GET, HEAD, OPTIONS", _ALLOW_GET))
            return
        cors = self.cors.headers(request)
        if method not in (b"GET", b"HEAD"):
            self.metrics.http_requests.inc()
            respond(self._reject(405, "method_not_allowed", "use GET", cors + (_ALLOW_GET,)))
            return
        self.metrics.http_requests.inc()
        gif = Answer(200, _GIF_HEADERS + cors, PIXEL_GIF)
        args = _query(request)
        data = args.get(b"data")
        try:
            if not data:
                raise Rejected(400, "bad_pixel_data", "the data parameter is missing")
            if len(data[0]) > self.limits.message_size * 4 // 3 + 4:
                raise Rejected(400, "too_large", "a message may be at most "
                               f"{self.limits.message_size} bytes")
            doc = decode_pixel(data[0])
            presented = self._header_key(request)
            if presented is None:
                key = write_key_of(doc)
                presented = key.encode("utf-8") if key is not None else None
            allowed, source = self._authorise(presented)
            if not allowed:
                raise Rejected(401, "unauthorized", "a valid write key is required")
            checked, defaults = messages_of(doc, PIXEL_ROUTES[request.path], self.limits)
        except Rejected as e:
            self._count_rejected(e.reason, 1)
            respond(gif)
            return

        def answer(refusal: Refusal | None, count: int, errors: list | None = None) -> Answer:
            if errors is not None:
                self._count_rejected(refusal.reason, count)
            elif refusal is not None:
                self._refused(refusal, (), count)  # counted; the GIF all the same
            return gif

        self._store(request, checked, defaults, presented, source, answer, respond)

    # --- settings -----------------------------------------------------------

    def settings(self, request: IngestRequest, respond: Callable[[Answer], None]) -> None:
        """
        C{GET /v1/projects/<writeKey>/settings}.
        """
        method = request.method
        if method == b"OPTIONS":
            respond(self._preflight(request, b"GET, HEAD, OPTIONS", _ALLOW_GET))
            return
        cors = self.cors.headers(request)
        if method not in (b"GET", b"HEAD"):
            respond(error_answer(405, "use GET", cors + (_ALLOW_GET,)))
            return
        key = unquote_to_bytes(request.path[len(SETTINGS_PREFIX):-len(SETTINGS_SUFFIX)])
        if not key or b"/" in key:
            respond(error_answer(404, "not found", cors))
            return
        if self.write_keys.required and not self.write_keys.matches(key):
            respond(error_answer(401, "unknown write key", cors + _CHALLENGE))
            return
        origin = self._public_origin(request)
        if origin is None:
            respond(error_answer(400, "a Host header is required (or set PUBLIC_URL)", cors))
            return
        protocol, host = origin
        try:
            write_key = key.decode("utf-8")
        except UnicodeDecodeError:
            respond(error_answer(404, "not found", cors))
            return
        document = settings_document(write_key, host + "/v1", protocol)
        respond(Answer(200, (_JSON, (b"cache-control", b"public, max-age=300")) + cors,
                       orjson.dumps(document)))

    def _public_origin(self, request: IngestRequest) -> tuple[str, str] | None:
        """
        C{(protocol, host[:port])} browsers reach this server at.
        """
        if self.public_url:
            protocol, _, host = self.public_url.partition("://")
            return protocol, host
        host = request.headers.get(b"host", b"").strip()
        if not _HOST.match(host):
            return None
        protocol = "http"
        proto = request.headers.get(b"x-forwarded-proto")
        if proto and self.client_addresses.trusts(request.peer):
            # Behind a TLS-terminating load balancer: its scheme, not ours.
            last = proto.split(b",")[0].strip().lower()
            if last in (b"http", b"https"):
                protocol = last.decode("ascii")
        return protocol, host.decode("ascii")


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace")
