# -*- test-case-name: estat.test.test_ingest_segment_api -*-
"""
Tests for L{estat.ingest.segment_api}: the Segment handlers, an
L{IngestRequest} in and an L{Answer} out, with no sockets.
"""

from __future__ import annotations

import base64
import gzip

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from estat.dedup import DedupWindow
from estat.event import ClientAddressResolver
from estat.ingest.access import CorsPolicy, WriteKeys
from estat.ingest.segment_api import PIXEL_GIF, SegmentAPI, basic_auth_user
from estat.ingest.core import IAdmission, IngestRequest, QueueAdmission, Refusal
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.ingest.segment_rules import SegmentLimits

NOW = 1_764_576_000.25  # 2025-12-01T08:00:00.250Z
ORIGIN = b"https://app.example"


def basic(key: bytes) -> bytes:
    return b"Basic " + base64.b64encode(key + b":")


def request(path: bytes = b"/v1/batch", body=None, method: bytes = b"POST",
            headers: dict | None = None, query: bytes = b"",
            peer: str = "192.0.2.7") -> IngestRequest:
    if body is not None and not isinstance(body, bytes):
        body = orjson.dumps(body)
    return IngestRequest(method=method, path=path, query=query,
                         headers={b"content-type": b"application/json",
                                  **(headers or {})},
                         body=body or b"", peer=peer, received_at=NOW)


@implementer(IAdmission)
class WaitingAdmission:
    def __init__(self) -> None:
        self.waiting: list = []

    def admit(self, events, done) -> None:
        self.waiting.append((events, done))


def track(message_id: str | None = "m-1", **fields) -> dict:
    message = {"type": "track", "event": "Clicked", "userId": "u-1", **fields}
    if message_id is not None:
        message["messageId"] = message_id
    return message


class SegmentAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = EventQueue(10)
        self.metrics = Metrics(CollectorRegistry())
        self.dedup = DedupWindow(self.clock, window=600.0, max_ids=1000)
        ids = iter(range(1, 1000))
        self.api = self.make(QueueAdmission(self.queue, retry_after=3))
        self.api.new_id = lambda: f"gen-{next(ids)}"

    def make(self, admission, **kw) -> SegmentAPI:
        defaults = dict(admission=admission, metrics=self.metrics, clock=self.clock,
                        write_keys=WriteKeys(["k1=web", "k2"]),
                        cors=CorsPolicy((ORIGIN.decode(),)),
                        limits=SegmentLimits(messages_per_batch=5), dedup=self.dedup)
        defaults.update(kw)
        return SegmentAPI(**defaults)

    def answer(self, req: IngestRequest, api: SegmentAPI | None = None):
        api = api or self.api
        handler = api.handler_for(req.path)
        self.assertIsNotNone(handler, req.path)
        answers = []
        handler(req, answers.append)
        self.assertEqual(len(answers), 1)
        return answers[0]

    def stored(self) -> list:
        lines = []
        while len(self.queue):
            for _, line in self.queue.take(100):
                lines.append(orjson.loads(line))
        return lines

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0

    def json(self, answer):
        return orjson.loads(answer.body)

    # --- success -----------------------------------------------------------

    def test_batch_stored_one_line_per_message(self) -> None:
        body = {"batch": [track(timestamp="2025-12-01T08:59:50.000Z"),
                          {"type": "identify", "anonymousId": "a-1", "traits": {"n": 1}}],
                "context": {"library": {"name": "analytics-python"}},
                "sentAt": "2025-12-01T09:00:00.000Z", "writeKey": "k1"}
        answer = self.answer(request(body=body, headers={b"authorization": basic(b"k1"),
                                                         b"user-agent": b"py/3"}))
        self.assertEqual((answer.status, answer.body), (200, b'{"success":true}'))
        self.assertIn((b"content-type", b"application/json"), answer.headers)
        first, second = self.stored()
        self.assertEqual(first["type"], "track")
        self.assertEqual(first["messageId"], "m-1")
        self.assertEqual(first["receivedAt"], "2025-12-01T08:00:00.250Z")
        self.assertEqual(first["originalTimestamp"], "2025-12-01T08:59:50.000Z")
        self.assertEqual(first["timestamp"], "2025-12-01T07:59:50.250Z")
        self.assertEqual(first["context"], {"library": {"name": "analytics-python"},
                                            "ip": "192.0.2.7", "userAgent": "py/3"})
        self.assertEqual(first["_estat"], {"received_at": "2025-12-01T08:00:00.250Z",
                                           "ip": "192.0.2.7", "user_agent": "py/3",
                                           "source": "web"})
        self.assertNotIn("writeKey", first)
        self.assertEqual(second["type"], "identify")
        self.assertEqual(second["messageId"], "gen-1")
        self.assertEqual(self.sample("events_accepted_total"), 2)
        self.assertEqual(self.sample("http_requests_accepted_total"), 1)

    def test_every_route_names_its_type(self) -> None:
        fields = {"track": {"event": "E"}, "group": {"groupId": "g"},
                  "alias": {"previousId": "p"}}
        for name in ("track", "identify", "page", "screen", "group", "alias"):
            for path in (b"/v1/" + name.encode(), b"/v1/" + name[0].encode()):
                body = {"userId": "u", "writeKey": "k2", **fields.get(name, {})}
                answer = self.answer(request(path, body, headers={
                    b"content-type": b"text/plain"}))
                self.assertEqual(answer.status, 200, (path, answer.body))
                [line] = self.stored()
                self.assertEqual(line["type"], name)
                self.assertIsNone(line["_estat"]["source"])

    def test_gzip_body(self) -> None:
        body = gzip.compress(orjson.dumps({"batch": [track()]}))
        answer = self.answer(request(body=body, headers={b"authorization": basic(b"k1"),
                                                         b"content-encoding": b"gzip"}))
        self.assertEqual(answer.status, 200)
        self.assertEqual(len(self.stored()), 1)

    # --- write keys ----------------------------------------------------------

    def test_key_in_query_and_body(self) -> None:
        answer = self.answer(request(body={"batch": [track("a")]}, query=b"writeKey=k1"))
        self.assertEqual(answer.status, 200)
        answer = self.answer(request(body={"batch": [track("b")], "writeKey": "k1"}))
        self.assertEqual(answer.status, 200)
        self.assertEqual([m["_estat"]["source"] for m in self.stored()], ["web", "web"])

    def test_wrong_or_missing_key(self) -> None:
        for req in (request(body={"batch": [track()]}, headers={b"authorization": basic(b"x")}),
                    request(body={"batch": [track()], "writeKey": "x"}),
                    request(body={"batch": [track()]}),
                    request(body={"batch": [track()]}, headers={b"authorization": b"Basic !!"})):
            answer = self.answer(req)
            self.assertEqual(answer.status, 401)
            self.assertEqual(self.json(answer), {"error": "a valid write key is required"})
            self.assertIn((b"www-authenticate", b'Basic realm="estat"'), answer.headers)
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.sample("http_requests_rejected_total", reason="unauthorized"), 4)

    def test_open_without_keys(self) -> None:
        api = self.make(QueueAdmission(self.queue), write_keys=WriteKeys())
        answer = self.answer(request(body={"batch": [track()]}), api)
        self.assertEqual(answer.status, 200)

    def test_basic_auth_user(self) -> None:
        self.assertEqual(basic_auth_user(base64.b64encode(b"key:")), b"key")
        self.assertEqual(basic_auth_user(base64.b64encode(b"key")), b"key")
        self.assertIsNone(basic_auth_user(b"%%%"))
        self.assertIsNone(basic_auth_user(base64.b64encode(b":pw")))

    # --- refusals --------------------------------------------------------------

    def test_invalid_message_names_its_index(self) -> None:
        body = {"batch": [track("a"), {"type": "track", "userId": "u"}], "writeKey": "k1"}
        answer = self.answer(request(body=body))
        self.assertEqual(answer.status, 400)
        self.assertEqual(self.json(answer), {"error": "a track call needs an event name ('event')",
                                             "index": 1})
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.sample("events_rejected_total", reason="missing_event"), 2)

    def test_oversized_message_is_a_400(self) -> None:
        big = track(properties={"p": "x" * 33000})
        answer = self.answer(request(body={"batch": [big], "writeKey": "k1"}))
        self.assertEqual(answer.status, 400)
        self.assertIn("at most 32768 bytes", self.json(answer)["error"])
        answer = self.answer(request(b"/v1/t", {**big, "writeKey": "k1"}))
        self.assertEqual(answer.status, 400)

    def test_oversized_decoded_body_is_a_400(self) -> None:
        body = gzip.compress(b'{"batch":[],"pad":"' + b"x" * 600_000 + b'"}')
        answer = self.answer(request(body=body, headers={b"authorization": basic(b"k1"),
                                                         b"content-encoding": b"gzip"}))
        self.assertEqual(answer.status, 400)
        self.assertEqual(self.sample("events_rejected_total", reason="too_large"), 1)

    def test_not_json(self) -> None:
        answer = self.answer(request(body=b"{", headers={b"authorization": basic(b"k1")}))
        self.assertEqual(answer.status, 400)

    def test_too_many_messages(self) -> None:
        answer = self.answer(request(body={"batch": [track(str(i)) for i in range(6)],
                                           "writeKey": "k1"}))
        self.assertEqual(answer.status, 400)
        self.assertEqual(self.sample("events_rejected_total", reason="too_many_events"), 6)

    def test_queue_full_is_a_503_and_all_or_nothing(self) -> None:
        answer = self.answer(request(body={"batch": [track(str(i)) for i in range(5)],
                                           "writeKey": "k1"}))
        self.assertEqual(answer.status, 200)
        answer = self.answer(request(body={"batch": [track(str(i)) for i in range(5, 10)],
                                           "writeKey": "k1"}))
        self.assertEqual(answer.status, 200)
        answer = self.answer(request(body={"batch": [track("x")], "writeKey": "k1"}))
        self.assertEqual(answer.status, 503)
        self.assertIn((b"retry-after", b"3"), answer.headers)
        self.assertEqual(len(self.queue), 10)
        self.assertEqual(self.sample("http_requests_rejected_queue_full_total"), 1)
        # Refused: the id is not remembered, the retry is stored.
        self.queue.take(10)
        answer = self.answer(request(body={"batch": [track("x")], "writeKey": "k1"}))
        self.assertEqual(answer.status, 200)
        self.assertEqual(len(self.queue), 1)

    def test_get_is_405(self) -> None:
        answer = self.answer(request(method=b"GET"))
        self.assertEqual(answer.status, 405)
        self.assertIn((b"allow", b"POST, OPTIONS"), answer.headers)

    # --- retries -----------------------------------------------------------------

    def test_retry_of_a_stored_batch_stores_nothing_twice(self) -> None:
        body = {"batch": [track("a"), track("b"), track(None)], "writeKey": "k1"}
        self.assertEqual(self.answer(request(body=body)).status, 200)
        self.assertEqual(self.answer(request(body=body)).status, 200)
        stored = self.stored()
        self.assertEqual([m["messageId"] for m in stored], ["a", "b", "gen-1", "gen-2"])
        self.assertEqual(self.sample("events_deduplicated_total", stream="segment"), 2)

    def test_duplicate_within_a_batch(self) -> None:
        body = {"batch": [track("a"), track("a")], "writeKey": "k1"}
        self.assertEqual(self.answer(request(body=body)).status, 200)
        self.assertEqual(len(self.stored()), 1)

    def test_same_id_from_another_key_is_another_message(self) -> None:
        self.assertEqual(self.answer(request(body={"batch": [track("a")],
                                                   "writeKey": "k1"})).status, 200)
        self.assertEqual(self.answer(request(body={"batch": [track("a")],
                                                   "writeKey": "k2"})).status, 200)
        self.assertEqual(len(self.stored()), 2)

    def test_retry_while_the_first_is_pending(self) -> None:
        admission = WaitingAdmission()
        api = self.make(admission)
        body = {"batch": [track("a")], "writeKey": "k1"}
        first = []
        api.events(request(body=body), first.append)
        self.assertEqual(first, [])
        answer = self.answer(request(body=body), api)
        self.assertEqual(answer.status, 503)
        self.assertIn((b"retry-after", b"1"), answer.headers)
        # The first is refused: the retry is then stored.
        events, done = admission.waiting.pop()
        done(Refusal(503, "wal_full", "full", 2))
        self.assertEqual(first[0].status, 503)
        self.assertIn((b"retry-after", b"2"), first[0].headers)
        again = []
        api.events(request(body=body), again.append)
        events, done = admission.waiting.pop()
        done(None)
        self.assertEqual(again[0].status, 200)
        self.assertEqual(self.answer(request(body=body), api).status, 200)
        self.assertEqual(admission.waiting, [])  # the last was a retry

    # --- CORS ------------------------------------------------------------------------

    def test_preflight_allows_analytics_js_headers(self) -> None:
        answer = self.answer(request(b"/v1/t", method=b"OPTIONS",
                                     headers={b"origin": ORIGIN}))
        headers = dict(answer.headers)
        self.assertEqual(answer.status, 204)
        self.assertEqual(headers[b"access-control-allow-origin"], ORIGIN)
        self.assertIn(b"Authorization", headers[b"access-control-allow-headers"])
        self.assertIn(b"X-Retry-Count", headers[b"access-control-allow-headers"])

    def test_cors_on_answers(self) -> None:
        answer = self.answer(request(b"/v1/t", {"event": "E", "userId": "u", "writeKey": "k1"},
                                     headers={b"origin": ORIGIN,
                                              b"content-type": b"text/plain"}))
        self.assertEqual(answer.status, 200)
        self.assertIn((b"access-control-allow-origin", ORIGIN), answer.headers)
        answer = self.answer(request(b"/v1/t", {"userId": "u"},
                                     headers={b"origin": b"https://evil.example"}))
        self.assertNotIn(b"access-control-allow-origin", dict(answer.headers))

    # --- the pixel ---------------------------------------------------------------------

    def pixel(self, doc, path=b"/v1/pixel/track", raw=None):
        data = raw if raw is not None else base64.b64encode(orjson.dumps(doc))
        return self.answer(request(path, method=b"GET", query=b"data=" + data))

    def assert_gif(self, answer) -> None:
        self.assertEqual((answer.status, answer.body), (200, PIXEL_GIF))
        self.assertIn((b"content-type", b"image/gif"), answer.headers)
        self.assertIn((b"cache-control", b"no-cache, no-store, must-revalidate"),
                      answer.headers)

    def test_pixel_stores_its_message(self) -> None:
        self.assert_gif(self.pixel({"writeKey": "k1", "userId": "u", "event": "Opened"}))
        self.assert_gif(self.pixel({"writeKey": "k1", "anonymousId": "a"}, b"/v1/pixel/page"))
        track_line, page_line = self.stored()
        self.assertEqual((track_line["type"], track_line["event"]), ("track", "Opened"))
        self.assertEqual(page_line["type"], "page")
        self.assertEqual(track_line["_estat"]["source"], "web")

    def test_pixel_always_answers_a_gif(self) -> None:
        self.assert_gif(self.pixel({"writeKey": "nope", "userId": "u", "event": "E"}))
        self.assert_gif(self.pixel({"writeKey": "k1", "event": "E"}))
        self.assert_gif(self.pixel(None, raw=b"%%%"))
        self.assert_gif(self.answer(request(b"/v1/pixel/track", method=b"GET")))
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.sample("http_requests_rejected_total", reason="unauthorized"), 1)
        self.assertEqual(self.sample("http_requests_rejected_total", reason="missing_user"), 1)

    # --- settings --------------------------------------------------------------------------

    def settings(self, key=b"k1", headers=None, peer="192.0.2.7", api=None):
        return self.answer(request(b"/v1/projects/" + key + b"/settings", method=b"GET",
                                   headers=headers, peer=peer), api)

    def test_settings_name_the_request_host(self) -> None:
        answer = self.settings(headers={b"host": b"127.0.0.1:8080", b"origin": ORIGIN})
        self.assertEqual(answer.status, 200)
        doc = self.json(answer)
        self.assertEqual(doc["integrations"]["Segment.io"]["apiHost"], "127.0.0.1:8080/v1")
        self.assertEqual(doc["integrations"]["Segment.io"]["protocol"], "http")
        self.assertEqual(doc["integrations"]["Segment.io"]["apiKey"], "k1")
        self.assertIn((b"access-control-allow-origin", ORIGIN), answer.headers)

    def test_settings_from_public_url(self) -> None:
        api = self.make(QueueAdmission(self.queue), public_url="https://collect.example.com")
        doc = self.json(self.settings(api=api))
        self.assertEqual(doc["integrations"]["Segment.io"]["apiHost"],
                         "collect.example.com/v1")
        self.assertEqual(doc["integrations"]["Segment.io"]["protocol"], "https")

    def test_forwarded_proto_only_from_a_trusted_proxy(self) -> None:
        import ipaddress

        api = self.make(QueueAdmission(self.queue), client_addresses=ClientAddressResolver(
            (ipaddress.ip_network("10.0.0.0/8"),)))
        headers = {b"host": b"collect.example.com", b"x-forwarded-proto": b"https"}
        doc = self.json(self.settings(headers=headers, peer="10.1.2.3", api=api))
        self.assertEqual(doc["integrations"]["Segment.io"]["protocol"], "https")
        doc = self.json(self.settings(headers=headers, peer="192.0.2.7", api=api))
        self.assertEqual(doc["integrations"]["Segment.io"]["protocol"], "http")

    def test_settings_refusals(self) -> None:
        self.assertEqual(self.settings(b"nope", headers={b"host": b"h"}).status, 401)
        self.assertEqual(self.settings(headers={b"host": b"bad host\r\n"}).status, 400)
        self.assertEqual(self.settings(headers={}).status, 400)
        self.assertIsNone(self.api.handler_for(b"/v1/projects/settings"))
        self.assertEqual(self.settings(b"a%2Fb", headers={b"host": b"h"}).status, 404)
