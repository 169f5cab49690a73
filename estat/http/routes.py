# -*- test-case-name: estat.test.test_http_routes -*-
"""
The HTTP API (Klein): C{POST /collect} validates and enriches an event and
puts it on the event queue; C{/healthz}, C{/readyz} and C{/metrics} are for
load balancers and operators.

A handler never waits: it answers from what is in memory (202, or 400/503
with a short JSON reason) and never does disk or network work.
"""

from __future__ import annotations

import orjson
import attr
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from ..event import SERVER_FIELD, ClientAddressResolver, format_received_at, make_line
from .access import CorsPolicy, WriteKeys
from .body import BodyRejected, Limits, decode_content, decode_events
from ..metrics import CONTENT_TYPE_LATEST, Metrics
from .openapi import openapi_document
from ..queue import EventQueue

__all__ = ["IngestAPI", "Readiness"]

_JSON = b"application/json"


@attr.s(slots=True)
class Readiness:
    """
    Whether the process wants traffic: false once shutdown has begun.
    """

    ready: bool = attr.ib(default=True)


def _error(request, code: int, message: str, **extra) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    body = {"error": message}
    body.update(extra)
    return orjson.dumps(body)


@attr.s
class IngestAPI:
    """
    The routes.  C{IngestAPI(...).app.resource()} is the L{IResource}.

    @ivar retry_after: seconds a client is told to wait after a 503.
    """

    app = Klein()

    queue: EventQueue = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    readiness: Readiness = attr.ib(factory=Readiness)
    client_addresses: ClientAddressResolver = attr.ib(factory=ClientAddressResolver)
    retry_after: int = attr.ib(default=1)
    limits: Limits = attr.ib(factory=Limits)
    write_keys: WriteKeys = attr.ib(factory=WriteKeys)
    cors: CorsPolicy = attr.ib(factory=CorsPolicy)

    def resource(self):
        """
        The root resource: C{/collect} is served directly (Klein's routing
        and Deferred wrapping cost more than the handler itself on the hot
        path); every other path goes through the Klein app.
        """
        return _Root(self, self.app.resource())

    @app.route("/collect", branch=False)
    def collect(self, request) -> bytes:
        started = self.clock.seconds()
        method = request.method
        if method == b"OPTIONS":
            return self._preflight(request)
        self.metrics.http_requests.inc()
        try:
            self.cors.apply(request)
            if method != b"POST":
                request.setHeader(b"allow", b"POST, OPTIONS")
                return self._reject(request, 405, "method_not_allowed", "use POST")
            if self.write_keys.required and not self.write_keys.allows(request):
                return self._reject(request, 401, "unauthorized",
                                    "a valid write key is required")
            headers = request.requestHeaders
            body = request.content.getvalue()
            items = ()
            try:
                encoding = headers.getRawHeaders(b"content-encoding")
                if encoding:
                    body = decode_content(body, encoding[0], self.limits.body_size)
                ctype = headers.getRawHeaders(b"content-type")
                items, batch = decode_events(body, ctype[0] if ctype else None, self.limits)
                server_fields = {
                    "received_at": format_received_at(started),
                    "ip": self._client_ip(request),
                    "user_agent": _header(request, b"user-agent"),
                }
                if batch:
                    events = self._batch_events(started, items, server_fields)
                else:
                    obj, raw = items[0]
                    events = [(started, make_line(obj, server_fields, raw))]
            except BodyRejected as e:
                extra = {"index": e.index} if e.index is not None else {}
                return self._reject(request, e.status, e.reason, e.message,
                                    events=max(1, e.count or len(items)), **extra)
            if not self.queue.offer(events):
                request.setHeader(b"retry-after", b"%d" % self.retry_after)
                self.metrics.http_requests_rejected_queue_full.inc()
                return self._reject(request, 503, "queue_full",
                                    "event queue is full, retry later", events=len(events))
            count = len(events)
            self.metrics.http_requests_accepted.inc()
            self.metrics.events_accepted.inc(count)
            request.setResponseCode(202)
            request.setHeader(b"content-type", _JSON)
            return b'{"accepted":%d}' % count
        finally:
            self.metrics.http_request_duration.observe(self.clock.seconds() - started)

    def _batch_events(self, started: float, items: list, server_fields: dict):
        # Each element's own size is its line minus the server fields
        # (orjson appends them as ',"_estat":{...}').
        overhead = len(orjson.dumps(server_fields)) + len(SERVER_FIELD) + 4
        limit = self.limits.event_size
        events = []
        for index, (obj, raw) in enumerate(items):
            line = make_line(obj, server_fields, raw)
            if type(line) is bytes and len(line) - overhead > limit:
                raise BodyRejected(413, "too_large", f"an event may be at most {limit} bytes",
                                   index)
            events.append((started, line))
        return events

    def _preflight(self, request) -> bytes:
        self.cors.preflight(request)
        request.setHeader(b"allow", b"POST, OPTIONS")
        request.setResponseCode(204)
        return b""

    def _reject(self, request, code: int, reason: str, message: str,
                events: int = 1, **extra) -> bytes:
        self.metrics.http_requests_rejected.labels(reason).inc()
        self.metrics.events_rejected.labels(reason).inc(events)
        return _error(request, code, message, **extra)

    def _client_ip(self, request) -> str:
        peer = getattr(request.getClientAddress(), "host", "") or ""
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if forwarded:
            forwarded = [v.decode("latin-1") for v in forwarded]
        return self.client_addresses.resolve(peer, forwarded)

    @app.route("/healthz")
    def healthz(self, request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _read_only(request)
        request.setHeader(b"content-type", _JSON)
        return b'{"status":"ok"}'

    @app.route("/readyz")
    def readyz(self, request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _read_only(request)
        request.setHeader(b"content-type", _JSON)
        if self.readiness.ready:
            return b'{"status":"ready"}'
        request.setResponseCode(503)
        return b'{"status":"shutting down"}'

    @app.route("/metrics")
    def metrics_page(self, request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _read_only(request)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()

    @app.route("/openapi.json")
    def openapi(self, request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _read_only(request)
        request.setHeader(b"content-type", _JSON)
        return orjson.dumps(openapi_document())

    @app.route("/", branch=True)
    def not_found(self, request) -> bytes:
        return _error(request, 404, "not found")


def _read_only(request) -> bytes:
    request.setHeader(b"allow", b"GET, HEAD")
    return _error(request, 405, "method not allowed; use GET")


class _Root(Resource):
    isLeaf = True

    def __init__(self, api: IngestAPI, klein_resource) -> None:
        super().__init__()
        self._api = api
        self._klein = klein_resource

    def render(self, request):
        if request.path == b"/collect":
            return self._api.collect(request)
        return self._klein.render(request)


def _header(request, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
