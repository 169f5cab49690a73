# -*- test-case-name: estat.test.test_http_routes_clients -*-
"""
Tests for what real clients send to C{POST /collect}: batches (JSON arrays
and NDJSON), compressed bodies, browsers (CORS, C{sendBeacon}'s
C{text/plain}), write keys; and C{GET /openapi.json}.

Through L{StubTreq} on L{IngestAPI.resource}: no socket, no reactor.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import zlib

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.event import ClientAddressResolver
from estat.ingest.access import CorsPolicy, WriteKeys
from estat.ingest.core import IngestCore, QueueAdmission
from estat.http.routes import IngestAPI
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.ingest.body import Limits

#: 2023-11-14T22:13:20.250Z
NOW = 1700000000.25
URL = "http://estat.example"
ORIGIN = "https://app.example.com"
JSON = {"Content-Type": ["application/json"]}
NDJSON = {"Content-Type": ["application/x-ndjson"]}


class ClientAPIMixin:
    def make_api(self, queue_size: int = 100, limits: Limits | None = None,
                 keys=(), origins=(ORIGIN,), trusted=(), anonymize=False):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = EventQueue(queue_size)
        self.metrics = Metrics(CollectorRegistry())
        self.core = IngestCore(
            admission=QueueAdmission(self.queue, retry_after=3),
            metrics=self.metrics,
            clock=self.clock,
            client_addresses=ClientAddressResolver(
                tuple(ipaddress.ip_network(n) for n in trusted), anonymize=anonymize),
            limits=limits or Limits(),
            write_keys=WriteKeys(keys),
            cors=CorsPolicy(origins, max_age=7200),
        )
        self.api = IngestAPI(core=self.core, metrics=self.metrics, clock=self.clock)
        self.treq = StubTreq(self.api.resource())
        return self.api

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        d = self.treq.request(method, URL + path, data=body, headers=headers or {})
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return response, content

    def collect(self, body: bytes, headers=None, path: str = "/collect"):
        return self.request("POST", path, body, headers)

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def header(self, response, name: str):
        return response.headers.getRawHeaders(name.encode("ascii"))

    def queued(self) -> list:
        return self.queue.take(100000)

    def assert_json_error(self, response, content: bytes, code: int) -> dict:
        self.assertEqual(response.code, code, content)
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])
        error = json.loads(content)
        self.assertIsInstance(error["error"], str)
        return error

    def assert_queue_untouched(self, before: list | None = None):
        self.assertEqual(self.queued(), before or [])


class BatchTests(ClientAPIMixin, SynchronousTestCase):
    def assert_stored_separately(self, events: list, expected: list):
        """
        Each event of a batch is its own queued line, with the same server
        fields as its siblings.
        """
        self.assertEqual(len(events), len(expected))
        decoded = []
        for received_at, line in events:
            self.assertEqual(received_at, NOW)
            self.assertIsInstance(line, bytes)
            self.assertNotIn(b"\n", line)
            decoded.append(json.loads(line))
        self.assertEqual([{k: v for k, v in e.items() if k != "_estat"} for e in decoded],
                         expected)
        server_fields = [e["_estat"] for e in decoded]
        self.assertEqual(server_fields[0], {
            "received_at": "2023-11-14T22:13:20.250Z",
            "ip": "127.0.0.1",
            "user_agent": "batcher/2.0",
        })
        self.assertEqual(server_fields, [server_fields[0]] * len(expected))

    def test_array(self):
        self.make_api()
        response, content = self.collect(
            b'[{"event":"a","n":1}, {"event":"b"}, {"nested":{"x":[1,2]}}]',
            {**JSON, "User-Agent": ["batcher/2.0"]})
        self.assertEqual(response.code, 202, content)
        self.assertEqual(json.loads(content), {"accepted": 3})
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])
        self.assert_stored_separately(
            self.queued(),
            [{"event": "a", "n": 1}, {"event": "b"}, {"nested": {"x": [1, 2]}}])

    def test_ndjson(self):
        self.make_api()
        response, content = self.collect(
            b'{"event":"a","n":1}\r\n\r\n{"event":"b"}\n{"nested":{"x":[1,2]}}\n',
            {**NDJSON, "User-Agent": ["batcher/2.0"]})
        self.assertEqual(response.code, 202, content)
        self.assertEqual(json.loads(content), {"accepted": 3})
        self.assert_stored_separately(
            self.queued(),
            [{"event": "a", "n": 1}, {"event": "b"}, {"nested": {"x": [1, 2]}}])

    def test_events_accepted_counts_events(self):
        """
        C{events_accepted_total} counts events, C{http_requests_accepted_total}
        requests.
        """
        self.make_api()
        self.collect(b'[{},{},{}]', JSON)
        self.collect(b'{"a":1}\n{"a":2}\n', NDJSON)
        self.collect(b'{"a":1}', JSON)
        self.assertEqual(self.sample("events_accepted_total"), 6)
        self.assertEqual(self.sample("http_requests_accepted_total"), 3)
        self.assertEqual(self.sample("http_requests_total"), 3)
        self.assertEqual(len(self.queued()), 6)

    def test_bad_element_rejects_whole_batch(self):
        """
        One bad element: 400 naming its index, and none of the good ones
        before it are queued.
        """
        self.make_api()
        response, content = self.collect(b'[{"a":1}, {"a":2}, 3, {"a":4}]', JSON)
        error = self.assert_json_error(response, content, 400)
        self.assertEqual(error["index"], 2)
        self.assert_queue_untouched()
        self.assertEqual(self.sample("http_requests_rejected_total", reason="not_an_object"), 1)
        self.assertGreaterEqual(self.sample("events_rejected_total", reason="not_an_object"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 0)
        self.assertEqual(self.sample("http_requests_accepted_total"), 0)

    def test_bad_ndjson_line_rejects_whole_batch(self):
        self.make_api()
        response, content = self.collect(b'{"a":1}\n{"_estat":{}}\n{"a":3}\n', NDJSON)
        error = self.assert_json_error(response, content, 400)
        self.assertEqual(error["index"], 1)
        self.assert_queue_untouched()
        self.assertEqual(self.sample("http_requests_rejected_total", reason="reserved_field"), 1)

    def test_queue_with_room_for_part(self):
        """
        A batch the queue cannot take whole: 503 with C{Retry-After}, and
        not one of its events is queued.
        """
        self.make_api(queue_size=5)
        self.assertTrue(self.queue.offer([(1.0, b'{"old":1}'), (1.0, b'{"old":2}'),
                                          (1.0, b'{"old":3}')]))
        response, content = self.collect(b'[{"n":1},{"n":2},{"n":3}]', JSON)
        error = self.assert_json_error(response, content, 503)
        self.assertEqual(self.header(response, "retry-after"), [b"3"])
        self.assertNotIn("index", error)
        self.assertEqual(self.queued(), [(1.0, b'{"old":1}'), (1.0, b'{"old":2}'),
                                         (1.0, b'{"old":3}')])
        self.assertEqual(self.sample("http_requests_rejected_queue_full_total"), 1)
        self.assertEqual(self.sample("events_rejected_total", reason="queue_full"), 3)
        self.assertEqual(self.sample("events_accepted_total"), 0)

        # With room again, the same batch goes in whole.
        response, content = self.collect(b'[{"n":1},{"n":2},{"n":3}]', JSON)
        self.assertEqual(response.code, 202, content)
        self.assertEqual([json.loads(line)["n"] for _, line in self.queued()], [1, 2, 3])

    def test_ndjson_queue_with_room_for_part(self):
        self.make_api(queue_size=2)
        response, content = self.collect(b'{"n":1}\n{"n":2}\n{"n":3}\n', NDJSON)
        self.assert_json_error(response, content, 503)
        self.assert_queue_untouched()

    def test_array_element_too_large(self):
        """
        C{MAX_BODY_SIZE} is the limit of one element's own serialised size:
        an element over it is refused with 413 and its index, nothing
        queued; an element of exactly that size is fine.
        """
        self.make_api(limits=Limits(event_size=100, body_size=10000))
        fits = b'{"x":"' + b"a" * (100 - 8) + b'"}'
        self.assertEqual(len(fits), 100)
        too_big = b'{"x":"' + b"a" * (100 - 7) + b'"}'

        response, content = self.collect(b"[" + fits + b"," + fits + b"]", JSON)
        self.assertEqual(response.code, 202, content)
        self.assertEqual(len(self.queued()), 2)

        response, content = self.collect(b"[" + fits + b"," + too_big + b"," + fits + b"]",
                                         JSON)
        error = self.assert_json_error(response, content, 413)
        self.assertEqual(error["index"], 1)
        self.assert_queue_untouched()
        self.assertEqual(self.sample("http_requests_rejected_total", reason="too_large"), 1)
        self.assertEqual(self.sample("events_rejected_total", reason="too_large"), 3)

    def test_ndjson_line_too_large(self):
        self.make_api(limits=Limits(event_size=100, body_size=10000))
        too_big = b'{"x":"' + b"a" * 200 + b'"}'
        response, content = self.collect(b'{"a":1}\n{"a":2}\n' + too_big + b"\n", NDJSON)
        error = self.assert_json_error(response, content, 413)
        self.assertEqual(error["index"], 2)
        self.assert_queue_untouched()

    def test_single_event_limit_still_applies(self):
        """
        A single object body is still limited to C{MAX_BODY_SIZE}, while a
        batch of the same total size is fine.
        """
        self.make_api(limits=Limits(event_size=100, body_size=10000))
        small = b'{"x":"' + b"a" * 50 + b'"}'
        response, content = self.collect(b'{"x":"' + b"a" * 200 + b'"}', JSON)
        self.assert_json_error(response, content, 413)
        response, content = self.collect(b"[" + b",".join([small] * 5) + b"]", JSON)
        self.assertEqual(response.code, 202, content)

    def test_too_many_events(self):
        self.make_api(limits=Limits(events_per_request=3))
        response, content = self.collect(b'[{},{},{},{}]', JSON)
        self.assert_json_error(response, content, 413)
        response, content = self.collect(b'{}\n{}\n{}\n{}\n', NDJSON)
        self.assert_json_error(response, content, 413)
        self.assert_queue_untouched()
        response, content = self.collect(b'[{},{},{}]', JSON)
        self.assertEqual(response.code, 202, content)

    def test_empty_batch(self):
        self.make_api()
        response, content = self.collect(b'[]', JSON)
        self.assert_json_error(response, content, 400)
        response, content = self.collect(b'\n\n', NDJSON)
        self.assert_json_error(response, content, 400)
        self.assertEqual(self.sample("http_requests_rejected_total", reason="empty_batch"), 2)

    def test_forwarded_for_and_anonymize(self):
        """
        Every event of a batch carries the client address resolved through
        trusted proxies, anonymised when asked.
        """
        self.make_api(trusted=("127.0.0.0/8",), anonymize=True)
        self.collect(b'[{},{}]', {**JSON, "X-Forwarded-For": ["6.6.6.6, 198.51.100.77"]})
        ips = [json.loads(line)["_estat"]["ip"] for _, line in self.queued()]
        self.assertEqual(ips, ["198.51.100.0", "198.51.100.0"])


class EncodingTests(ClientAPIMixin, SynchronousTestCase):
    def test_gzip_ndjson(self):
        self.make_api()
        body = gzip.compress(b'{"n":1}\n{"n":2}\n')
        response, content = self.collect(
            body, {**NDJSON, "Content-Encoding": ["gzip"]})
        self.assertEqual(response.code, 202, content)
        self.assertEqual(json.loads(content), {"accepted": 2})
        self.assertEqual([json.loads(line)["n"] for _, line in self.queued()], [1, 2])

    def test_deflate_object(self):
        self.make_api()
        response, content = self.collect(
            zlib.compress(b'{"n":1}'), {**JSON, "Content-Encoding": ["deflate"]})
        self.assertEqual(response.code, 202, content)
        [(_, line)] = self.queued()
        self.assertEqual(json.loads(line)["n"], 1)

    def test_gzip_bomb(self):
        """
        A body that decompresses past C{MAX_BATCH_BODY_SIZE} is refused
        with 413.
        """
        self.make_api()
        bomb = gzip.compress(b"\n" * (50 * 1024 * 1024), compresslevel=9)
        response, content = self.collect(bomb, {**NDJSON, "Content-Encoding": ["gzip"]})
        self.assert_json_error(response, content, 413)
        self.assert_queue_untouched()
        self.assertEqual(
            self.sample("http_requests_rejected_total", reason="too_large_decoded"), 1)

    def test_unknown_encoding(self):
        self.make_api()
        response, content = self.collect(b'{"n":1}', {**JSON, "Content-Encoding": ["br"]})
        self.assert_json_error(response, content, 415)
        self.assert_queue_untouched()
        self.assertEqual(
            self.sample("http_requests_rejected_total", reason="unsupported_encoding"), 1)

    def test_corrupt_gzip(self):
        self.make_api()
        response, content = self.collect(b'{"n":1}', {**JSON, "Content-Encoding": ["gzip"]})
        self.assert_json_error(response, content, 400)
        self.assert_queue_untouched()

    def test_text_plain_json(self):
        """
        C{navigator.sendBeacon(url, string)} sends C{text/plain}: the body
        is JSON all the same.
        """
        self.make_api()
        response, content = self.collect(
            b'{"event":"beacon"}', {"Content-Type": ["text/plain;charset=UTF-8"]})
        self.assertEqual(response.code, 202, content)
        [(_, line)] = self.queued()
        self.assertEqual(json.loads(line)["event"], "beacon")

    def test_text_plain_array(self):
        self.make_api()
        response, content = self.collect(
            b'[{"n":1},{"n":2}]', {"Content-Type": ["text/plain;charset=UTF-8"]})
        self.assertEqual(response.code, 202, content)
        self.assertEqual(json.loads(content), {"accepted": 2})


class WriteKeyTests(ClientAPIMixin, SynchronousTestCase):
    def assert_unauthorized(self, headers=None, path="/collect"):
        response, content = self.collect(b'{"a":1}', {**JSON, **(headers or {})}, path)
        self.assert_json_error(response, content, 401)
        self.assert_queue_untouched()

    def test_missing_key(self):
        self.make_api(keys=("secret",))
        self.assert_unauthorized()
        self.assertEqual(self.sample("http_requests_rejected_total", reason="unauthorized"), 1)
        self.assertEqual(self.sample("http_requests_total"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 0)

    def test_wrong_key(self):
        self.make_api(keys=("secret",))
        self.assert_unauthorized({"X-Write-Key": ["not-secret"]})
        self.assert_unauthorized({"Authorization": ["Bearer not-secret"]})
        self.assert_unauthorized(path="/collect?write_key=not-secret")
        self.assertEqual(self.sample("http_requests_rejected_total", reason="unauthorized"), 3)

    def test_key_checked_before_body(self):
        """
        Without a valid key the body is not even looked at: a bad body is
        still 401, not 400.
        """
        self.make_api(keys=("secret",))
        response, content = self.collect(b'not json', JSON)
        self.assert_json_error(response, content, 401)

    def test_right_key(self):
        self.make_api(keys=("secret", "rotated"))
        for headers, path in (({"X-Write-Key": ["secret"]}, "/collect"),
                              ({"Authorization": ["Bearer rotated"]}, "/collect"),
                              ({}, "/collect?write_key=secret")):
            response, content = self.collect(b'{"a":1}', {**JSON, **headers}, path)
            self.assertEqual(response.code, 202, (headers, path, content))
        self.assertEqual(len(self.queued()), 3)
        self.assertIsNone(self.sample("http_requests_rejected_total", reason="unauthorized"))

    def test_no_keys_open(self):
        self.make_api()
        response, content = self.collect(b'{"a":1}', JSON)
        self.assertEqual(response.code, 202, content)

    def test_key_not_stored(self):
        """
        The write key never ends up in a stored event.
        """
        self.make_api(keys=("secret-value",))
        self.collect(b'{"a":1}', {**JSON, "X-Write-Key": ["secret-value"]},
                     "/collect?write_key=secret-value")
        [(_, line)] = self.queued()
        self.assertNotIn(b"secret-value", line)

    def test_preflight_needs_no_key(self):
        """
        Browsers send no credentials or custom headers on a preflight.
        """
        self.make_api(keys=("secret",))
        response, _ = self.request("OPTIONS", "/collect", headers={
            "Origin": [ORIGIN], "Access-Control-Request-Method": ["POST"],
            "Access-Control-Request-Headers": ["content-type,x-write-key"]})
        self.assertEqual(response.code, 204)


class CorsTests(ClientAPIMixin, SynchronousTestCase):
    def test_allowed_origin_on_post(self):
        self.make_api()
        response, content = self.collect(b'{"a":1}', {**JSON, "Origin": [ORIGIN]})
        self.assertEqual(response.code, 202, content)
        self.assertEqual(self.header(response, "access-control-allow-origin"),
                         [ORIGIN.encode("ascii")])
        self.assertIn(b"Origin", self.header(response, "vary"))

    def test_allowed_origin_on_errors(self):
        """
        A browser can read an error answer (and its C{Retry-After}) only if
        it carries the CORS headers too.
        """
        self.make_api(queue_size=1, keys=("k",))
        for body, headers in ((b'{"a":1}', {}),                         # 401
                              (b'nope', {"X-Write-Key": ["k"]}),        # 400
                              (b'[{},{}]', {"X-Write-Key": ["k"]})):    # 503
            response, content = self.collect(body, {**JSON, "Origin": [ORIGIN], **headers})
            self.assertIn(response.code, (400, 401, 503))
            self.assertEqual(self.header(response, "access-control-allow-origin"),
                             [ORIGIN.encode("ascii")], response.code)
        [expose] = self.header(response, "access-control-expose-headers")
        self.assertIn(b"retry-after", expose.lower())

    def test_disallowed_origin_on_post(self):
        """
        A disallowed origin's request is still processed (CORS is for the
        browser to enforce), but its answer has no CORS header.
        """
        self.make_api()
        response, content = self.collect(
            b'{"a":1}', {**JSON, "Origin": ["https://evil.example.com"]})
        self.assertEqual(response.code, 202, content)
        self.assertIsNone(self.header(response, "access-control-allow-origin"))
        self.assertIn(b"Origin", self.header(response, "vary"))

    def test_any_origin(self):
        self.make_api(origins=("*",))
        response, _ = self.collect(b'{"a":1}', {**JSON, "Origin": ["http://localhost:3000"]})
        self.assertEqual(self.header(response, "access-control-allow-origin"), [b"*"])

    def test_no_cors_configured(self):
        self.make_api(origins=())
        response, _ = self.collect(b'{"a":1}', {**JSON, "Origin": [ORIGIN]})
        self.assertIsNone(self.header(response, "access-control-allow-origin"))

    def test_preflight(self):
        self.make_api()
        response, content = self.request("OPTIONS", "/collect", headers={
            "Origin": [ORIGIN], "Access-Control-Request-Method": ["POST"],
            "Access-Control-Request-Headers": ["content-type,content-encoding,x-write-key"]})
        self.assertEqual(response.code, 204)
        self.assertEqual(content, b"")
        self.assertEqual(self.header(response, "access-control-allow-origin"),
                         [ORIGIN.encode("ascii")])
        [methods] = self.header(response, "access-control-allow-methods")
        self.assertIn(b"POST", methods)
        [allowed] = self.header(response, "access-control-allow-headers")
        allowed = {h.strip().lower() for h in allowed.split(b",")}
        self.assertTrue({b"content-type", b"content-encoding", b"x-write-key"} <= allowed)
        self.assertEqual(self.header(response, "access-control-max-age"), [b"7200"])
        self.assert_queue_untouched()

    def test_preflight_disallowed_origin(self):
        self.make_api()
        response, _ = self.request("OPTIONS", "/collect", headers={
            "Origin": ["https://evil.example.com"], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(response.code, 204)
        self.assertIsNone(self.header(response, "access-control-allow-origin"))
        self.assertIsNone(self.header(response, "access-control-allow-methods"))


class OpenAPITests(ClientAPIMixin, SynchronousTestCase):
    def test_document(self):
        self.make_api()
        response, content = self.request("GET", "/openapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])
        document = json.loads(content)
        self.assertRegex(document["openapi"], r"^3\.\d+\.\d+$")
        self.assertIn("title", document["info"])
        self.assertIn("version", document["info"])
        for path in ("/collect", "/healthz", "/readyz", "/metrics"):
            self.assertIn(path, document["paths"])
        collect = document["paths"]["/collect"]
        self.assertIn("post", collect)
        self.assertIn("options", collect)
        content_types = set(collect["post"]["requestBody"]["content"])
        self.assertTrue({"application/json", "application/x-ndjson", "text/plain"}
                        <= content_types)
        for code in ("202", "400", "401", "413", "415", "503"):
            self.assertIn(code, collect["post"]["responses"])

    def test_references_resolve(self):
        """
        Every C{$ref} of the document points at something in it.
        """
        self.make_api()
        _, content = self.request("GET", "/openapi.json")
        document = json.loads(content)

        def refs(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "$ref":
                        yield value
                    else:
                        yield from refs(value)
            elif isinstance(node, list):
                for value in node:
                    yield from refs(value)

        found = list(refs(document))
        self.assertTrue(found)
        for ref in found:
            self.assertTrue(ref.startswith("#/"), ref)
            node = document
            for part in ref[2:].split("/"):
                self.assertIn(part, node, ref)
                node = node[part]


# --- the same tests through the httptools protocol ------------------------------------------

from estat.test.fastpath import FastPathRequests  # noqa: E402


class BatchFastPathTests(FastPathRequests, BatchTests):
    """L{BatchTests} through L{estat.http.protocol}."""


class EncodingFastPathTests(FastPathRequests, EncodingTests):
    """L{EncodingTests} through L{estat.http.protocol}."""


class WriteKeyFastPathTests(FastPathRequests, WriteKeyTests):
    """L{WriteKeyTests} through L{estat.http.protocol}."""


class CorsFastPathTests(FastPathRequests, CorsTests):
    """L{CorsTests} through L{estat.http.protocol}."""


class OpenAPIFastPathTests(FastPathRequests, OpenAPITests):
    """L{OpenAPITests} through L{estat.http.protocol} (handed to Klein)."""
