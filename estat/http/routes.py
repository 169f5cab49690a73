# -*- test-case-name: estat.test.test_http_routes -*-
"""
The HTTP API (Klein): C{/collect} through the ingest core
(L{estat.ingest.core}); C{/healthz}, C{/readyz}, C{/metrics} and
C{/openapi.json} for load balancers and operators.

A handler never does disk or network work; it answers from what is in
memory, or when the acknowledgement mode says the events are safe.
"""

from __future__ import annotations

import orjson
import attr
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..ingest.core import Answer, IngestCore, IngestRequest
from ..metrics import CONTENT_TYPE_LATEST, Metrics
from ..service import Readiness
from .openapi import openapi_document

__all__ = ["IngestAPI"]

_JSON = b"application/json"


def _error(request, code: int, message: str, **extra) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    body = {"error": message}
    body.update(extra)
    return orjson.dumps(body)


def ingest_request(request, received_at: float) -> IngestRequest:
    """
    The L{IngestRequest} of a twisted.web request.
    """
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.lower()] = b", ".join(values)
    peer = getattr(request.getClientAddress(), "host", "") or ""
    return IngestRequest(
        method=request.method,
        path=request.path,
        query=request.uri.split(b"?", 1)[1] if b"?" in request.uri else b"",
        headers=headers,
        body=request.content.getvalue(),
        peer=peer,
        received_at=received_at,
    )


def serve(handler, request, received_at: float):
    """
    Run an ingest handler for a twisted.web request: the answer's bytes,
    or a Deferred of them when the handler answers later (the Deferred
    never fires if the client went away first).
    """
    answers: list = []
    waiting: list = []

    def respond(answer: Answer) -> None:
        if waiting:
            d = waiting.pop()
            if not request._disconnected:
                d.callback(_write_answer(request, answer))
        else:
            answers.append(answer)

    answer = handler(ingest_request(request, received_at), respond)
    if answer is not None:
        return _write_answer(request, answer)
    if answers:
        return _write_answer(request, answers[0])
    d = Deferred()
    waiting.append(d)
    return d


def _write_answer(request, answer: Answer) -> bytes:
    request.setResponseCode(answer.status)
    for name, value in answer.headers:
        request.setHeader(name, value)
    return answer.body


@attr.s
class IngestAPI:
    """
    The routes.  C{IngestAPI(...).app.resource()} is the L{IResource}.

    C{/collect} is the ingest core's handler (L{IngestCore.collect});
    these routes are its twisted.web adapter (the fast protocol in
    L{estat.http.protocol} is the other).
    """

    app = Klein()

    core: IngestCore = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    readiness: Readiness = attr.ib(factory=Readiness)
    #: More ingest handlers: C{path -> handler or None} (the Segment API's
    #: L{estat.ingest.segment_api.SegmentAPI.handler_for}).
    handler_for: object = attr.ib(default=lambda path: None)
    #: C{() -> bytes or Deferred[bytes]}: the C{/metrics} page; by default
    #: C{metrics}' own registry (a worker of C{WORKERS=N} merges every
    #: worker's: L{estat.workers.metrics.MetricsScrape}).
    exposition: object = attr.ib(default=None)

    def resource(self):
        """
        The root resource: C{/collect} is served directly (Klein's routing
        and Deferred wrapping cost more than the handler itself); every
        other path goes through the Klein app.
        """
        return _Root(self, self.app.resource())

    @app.route("/collect", branch=False)
    def collect(self, request):
        return serve(self.core.handle, request, self.clock.seconds())

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
        if self.exposition is not None:
            return self.exposition()
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
            result = self._api.collect(request)
            if isinstance(result, Deferred):
                result.addCallback(_finish, request)
                return NOT_DONE_YET
            return result
        handler = self._api.handler_for(request.path)
        if handler is not None:
            result = serve(handler, request, self._api.clock.seconds())
            if isinstance(result, Deferred):
                result.addCallback(_finish, request)
                return NOT_DONE_YET
            return result
        return self._klein.render(request)


def _finish(body: bytes, request) -> None:
    if not request._disconnected:
        request.write(body)
        request.finish()

