# -*- test-case-name: estat.test.test_http_routes -*-
"""
Tests for L{estat.http.routes}, through L{StubTreq}: no socket, no reactor.
"""

from __future__ import annotations

import ipaddress
import json

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.event import ClientAddressResolver
from estat.ingest.core import IngestCore, QueueAdmission
from estat.http.routes import IngestAPI
from estat.service import Readiness
from estat.metrics import SEED_METRIC_NAMES, Metrics
from estat.queue import EventQueue

#: 2023-11-14T22:13:20.250Z
NOW = 1700000000.25
URL = "http://estat.example/"

class APITestsMixin:
    def make_api(self, queue_size=10, trusted=()):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = EventQueue(queue_size)
        self.metrics = Metrics(CollectorRegistry())
        self.readiness = Readiness()
        self.core = IngestCore(
            admission=QueueAdmission(self.queue, retry_after=7),
            metrics=self.metrics,
            clock=self.clock,
            client_addresses=ClientAddressResolver(
                tuple(ipaddress.ip_network(n) for n in trusted)),
        )
        self.api = IngestAPI(core=self.core, metrics=self.metrics, clock=self.clock,
                             readiness=self.readiness)
        self.treq = StubTreq(self.api.resource())
        return self.api

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        d = self.treq.request(method, URL + path.lstrip("/"), data=body,
                              headers=headers or {})
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return response, content

    def collect(self, body: bytes, headers=None):
        return self.request("POST", "/collect", body, headers)

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def header(self, response, name: str):
        return response.headers.getRawHeaders(name.encode("ascii"))

    def queued(self) -> list:
        return self.queue.take(1000)


class CollectTests(APITestsMixin, SynchronousTestCase):
    def test_accepts_object(self):
        """
        A JSON object is answered 202 C{{"accepted":1}} and queued with the
        client's fields and the server's C{_estat} fields.
        """
        self.make_api()
        response, content = self.collect(
            b'{"event":"click","n":3,"nested":{"a":[1,2]}}',
            {"User-Agent": ["test-agent/1.0"]})
        self.assertEqual(response.code, 202)
        self.assertEqual(json.loads(content), {"accepted": 1})
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])

        [(received_at, line)] = self.queued()
        self.assertEqual(received_at, NOW)
        self.assertIsInstance(line, bytes)
        self.assertEqual(json.loads(line), {
            "event": "click",
            "n": 3,
            "nested": {"a": [1, 2]},
            "_estat": {
                "received_at": "2023-11-14T22:13:20.250Z",
                "ip": "127.0.0.1",
                "user_agent": "test-agent/1.0",
            },
        })
        self.assertEqual(self.sample("http_requests_total"), 1)
        self.assertEqual(self.sample("http_requests_accepted_total"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 1)
        self.assertEqual(self.sample("http_request_duration_seconds_count"), 1)

    def test_received_at_follows_clock(self):
        """
        C{received_at} is the clock's time when the request is handled.
        """
        self.make_api()
        self.collect(b'{}')
        self.clock.advance(3600.5)
        self.collect(b'{}')
        [(t1, line1), (t2, line2)] = self.queued()
        self.assertEqual((t1, t2), (NOW, NOW + 3600.5))
        self.assertEqual(json.loads(line1)["_estat"]["received_at"],
                         "2023-11-14T22:13:20.250Z")
        self.assertEqual(json.loads(line2)["_estat"]["received_at"],
                         "2023-11-14T23:13:20.750Z")

    def test_no_user_agent(self):
        """
        Without a C{User-Agent} header, C{user_agent} is null.
        """
        self.make_api()
        response, _ = self.collect(b'{"a":1}')
        self.assertEqual(response.code, 202)
        [(_, line)] = self.queued()
        self.assertIsNone(json.loads(line)["_estat"]["user_agent"])

    def test_counts_requests(self):
        """
        C{http_requests_total} counts every request to C{/collect};
        C{http_requests_accepted_total} only the accepted ones.
        """
        self.make_api()
        for _ in range(3):
            self.collect(b'{"a":1}')
        self.collect(b'not json')
        self.request("GET", "/collect")
        self.assertEqual(self.sample("http_requests_total"), 5)
        self.assertEqual(self.sample("http_requests_accepted_total"), 3)
        self.assertEqual(len(self.queued()), 3)


class RejectTests(APITestsMixin, SynchronousTestCase):
    def assert_bad_request(self, body: bytes, reason: str):
        self.make_api()
        response, content = self.collect(body)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])
        error = json.loads(content)
        self.assertEqual(list(error), ["error"])
        self.assertIsInstance(error["error"], str)
        self.assertTrue(error["error"])
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.sample("http_requests_total"), 1)
        self.assertEqual(self.sample("http_requests_accepted_total"), 0)
        self.assertEqual(self.sample("http_requests_rejected_total", reason=reason), 1)
        self.assertEqual(self.sample("events_rejected_total", reason=reason), 1)
        return error

    def test_invalid_json(self):
        self.assert_bad_request(b'{"a":', "invalid_json")

    def test_empty_body(self):
        self.assert_bad_request(b'', "invalid_json")

    def test_array_of_scalars(self):
        """
        An array is a batch of events; a scalar in it is refused, and its
        index named.
        """
        self.make_api()
        response, content = self.collect(b'[1]')
        self.assertEqual(response.code, 400)
        error = json.loads(content)
        self.assertIn("error", error)
        self.assertEqual(error["index"], 0)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.sample("http_requests_rejected_total", reason="not_an_object"), 1)

    def test_scalar(self):
        self.assert_bad_request(b'42', "not_an_object")

    def test_string(self):
        self.assert_bad_request(b'"hello"', "not_an_object")

    def test_reserved_field(self):
        error = self.assert_bad_request(b'{"a":1,"_estat":{"ip":"1.2.3.4"}}',
                                        "reserved_field")
        self.assertIn("_estat", error["error"])

    def allowed(self, response) -> set:
        [allow] = self.header(response, "allow")
        return {m.strip() for m in allow.split(b",")}

    def test_get_not_allowed(self):
        """
        C{GET /collect} is answered 405 with an C{Allow} header naming POST.
        """
        self.make_api()
        response, content = self.request("GET", "/collect")
        self.assertEqual(response.code, 405)
        self.assertIn(b"POST", self.allowed(response))
        self.assertNotIn(b"GET", self.allowed(response))
        self.assertIn("error", json.loads(content))
        self.assertEqual(
            self.sample("http_requests_rejected_total", reason="method_not_allowed"), 1)

    def test_put_not_allowed(self):
        """
        C{PUT /collect} is answered 405 and queues nothing.
        """
        self.make_api()
        response, content = self.request("PUT", "/collect", b'{"a":1}')
        self.assertEqual(response.code, 405)
        self.assertIn(b"POST", self.allowed(response))
        self.assertNotIn(b"PUT", self.allowed(response))
        self.assertIn("error", json.loads(content))
        self.assertEqual(self.queued(), [])

    def test_queue_full(self):
        """
        When the queue is full the event is refused with 503 and
        C{Retry-After}, and counted.
        """
        self.make_api(queue_size=1)
        response, _ = self.collect(b'{"n":1}')
        self.assertEqual(response.code, 202)
        response, content = self.collect(b'{"n":2}')
        self.assertEqual(response.code, 503)
        self.assertEqual(self.header(response, "retry-after"), [b"7"])
        self.assertEqual(self.header(response, "content-type"), [b"application/json"])
        self.assertIn("error", json.loads(content))
        self.assertEqual(self.sample("http_requests_rejected_queue_full_total"), 1)
        self.assertEqual(self.sample("http_requests_rejected_total", reason="queue_full"), 1)
        self.assertEqual(self.sample("http_requests_accepted_total"), 1)
        self.assertEqual(self.sample("http_requests_total"), 2)
        [(_, line)] = self.queued()
        self.assertEqual(json.loads(line)["n"], 1)

    def test_queue_closed(self):
        """
        A closed queue (shutdown) refuses events with 503.
        """
        self.make_api()
        self.queue.close()
        response, content = self.collect(b'{"n":1}')
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(self.header(response, "retry-after"))
        self.assertIn("error", json.loads(content))
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.sample("http_requests_accepted_total"), 0)


class BatchTests(APITestsMixin, SynchronousTestCase):
    def test_array_of_objects(self):
        """
        A JSON array of objects is accepted as a batch: each element is
        queued with the same server fields.
        """
        self.make_api()
        response, content = self.collect(b'[{"n":1},{"n":2},{"n":3}]',
                                         {"User-Agent": ["ua"]})
        self.assertEqual(response.code, 202)
        self.assertEqual(json.loads(content), {"accepted": 3})
        queued = self.queued()
        self.assertEqual([t for t, _ in queued], [NOW] * 3)
        objs = [json.loads(line) for _, line in queued]
        self.assertEqual([o["n"] for o in objs], [1, 2, 3])
        for o in objs:
            self.assertEqual(o["_estat"], {"received_at": "2023-11-14T22:13:20.250Z",
                                           "ip": "127.0.0.1", "user_agent": "ua"})
        self.assertEqual(self.sample("http_requests_accepted_total"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 3)

    def test_batch_is_all_or_nothing(self):
        """
        One bad element refuses the whole batch, naming its index.
        """
        self.make_api()
        response, content = self.collect(b'[{"n":1},{"_estat":{}},{"n":3}]')
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(content)["index"], 1)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.sample("http_requests_rejected_total", reason="reserved_field"), 1)

    def test_batch_larger_than_free_room(self):
        """
        A batch that does not fit whole in the queue is refused with 503;
        none of its events is queued.
        """
        self.make_api(queue_size=3)
        response, _ = self.collect(b'[{"n":1},{"n":2}]')
        self.assertEqual(response.code, 202)
        response, _ = self.collect(b'[{"n":3},{"n":4}]')
        self.assertEqual(response.code, 503)
        self.assertEqual(self.header(response, "retry-after"), [b"7"])
        self.assertEqual([json.loads(line)["n"] for _, line in self.queued()], [1, 2])
        self.assertEqual(self.sample("http_requests_rejected_queue_full_total"), 1)
        self.assertEqual(self.sample("events_rejected_total", reason="queue_full"), 2)


class ClientAddressTests(APITestsMixin, SynchronousTestCase):
    def ip_for(self, headers, trusted=()):
        self.make_api(trusted=trusted)
        response, _ = self.collect(b'{}', headers)
        self.assertEqual(response.code, 202)
        [(_, line)] = self.queued()
        return json.loads(line)["_estat"]["ip"]

    def test_peer_is_stub_loopback(self):
        """
        (StubTreq's client address is 127.0.0.1.)  Without a forwarded
        header the peer is the client.
        """
        self.assertEqual(self.ip_for({}), "127.0.0.1")

    def test_forwarded_for_ignored_by_default(self):
        """
        With no trusted proxy, C{X-Forwarded-For} cannot choose the address.
        """
        self.assertEqual(self.ip_for({"X-Forwarded-For": ["203.0.113.7"]}), "127.0.0.1")

    def test_forwarded_for_ignored_from_untrusted_peer(self):
        self.assertEqual(
            self.ip_for({"X-Forwarded-For": ["203.0.113.7"]}, trusted=["10.0.0.0/8"]),
            "127.0.0.1")

    def test_forwarded_for_from_trusted_peer(self):
        """
        When the peer is a trusted proxy, the right-most untrusted address
        of C{X-Forwarded-For} is the client.
        """
        self.assertEqual(
            self.ip_for({"X-Forwarded-For": ["198.51.100.1, 203.0.113.7"]},
                        trusted=["127.0.0.0/8"]),
            "203.0.113.7")


class OtherRoutesTests(APITestsMixin, SynchronousTestCase):
    def test_healthz(self):
        self.make_api()
        response, content = self.request("GET", "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(content), {"status": "ok"})

    def test_healthz_while_shutting_down(self):
        """
        Liveness does not depend on readiness.
        """
        self.make_api()
        self.readiness.ready = False
        response, _ = self.request("GET", "/healthz")
        self.assertEqual(response.code, 200)

    def test_readyz(self):
        """
        C{/readyz} is 200 while ready and 503 once shutdown has begun.
        """
        self.make_api()
        response, content = self.request("GET", "/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(content)["status"], "ready")
        self.readiness.ready = False
        response, content = self.request("GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertIn("status", json.loads(content))

    def test_metrics(self):
        """
        C{/metrics} serves the Prometheus text format with the seed's eight
        metric names, and reflects counts.
        """
        self.make_api()
        self.collect(b'{"a":1}')
        response, content = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        [content_type] = self.header(response, "content-type")
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        text = content.decode("utf-8")
        names = {ln.split("{")[0].split(" ")[0]
                 for ln in text.splitlines() if ln and not ln.startswith("#")}
        for name in SEED_METRIC_NAMES:
            self.assertIn(name, names)
        self.assertIn("http_requests_accepted_total 1.0", text.splitlines())

    def test_unknown_path(self):
        """
        An unknown path is answered 404 with a JSON error.
        """
        self.make_api()
        for path in ("/nope", "/collect/more", "/healthz/x"):
            response, content = self.request("POST", path, b'{}')
            self.assertEqual(response.code, 404, path)
            self.assertEqual(self.header(response, "content-type"), [b"application/json"])
            self.assertIn("error", json.loads(content))
        self.assertEqual(self.queued(), [])


class MoreHandlersTests(APITestsMixin, SynchronousTestCase):
    """
    C{handler_for} mounts more ingest handlers (the Segment API's) on the
    Klein side, the settings route's variable path included.
    """

    def setUp(self) -> None:
        from estat.ingest.segment_api import SegmentAPI

        self.make_api()
        self.segment_queue = EventQueue(10)
        segment = SegmentAPI(admission=QueueAdmission(self.segment_queue), metrics=self.metrics,
                             clock=self.clock)
        self.api = IngestAPI(core=self.core, metrics=self.metrics, clock=self.clock,
                             readiness=self.readiness, handler_for=segment.handler_for)
        self.treq = StubTreq(self.api.resource())

    def test_event_route(self):
        response, content = self.request("POST", "/v1/t",
                                         b'{"userId":"u","event":"E"}',
                                         {"Content-Type": ["text/plain"]})
        self.assertEqual((response.code, content), (200, b'{"success":true}'))
        [(_, line)] = self.segment_queue.take(10)
        self.assertEqual(json.loads(line)["type"], "track")
        self.assertEqual(self.queued(), [])

    def test_settings_route(self):
        response, content = self.request("GET", "/v1/projects/k/settings")
        self.assertEqual(response.code, 200)
        settings = json.loads(content)["integrations"]["Segment.io"]
        self.assertEqual(settings["apiHost"], "estat.example/v1")

    def test_other_paths_unchanged(self):
        self.assertEqual(self.request("GET", "/v1/nope")[0].code, 404)
        self.assertEqual(self.collect(b'{"e":1}')[0].code, 202)


# --- the same tests through the httptools protocol ------------------------------------------

from estat.test.fastpath import FastPathRequests  # noqa: E402


class CollectFastPathTests(FastPathRequests, CollectTests):
    """L{CollectTests} through L{estat.http.protocol}."""


class RejectFastPathTests(FastPathRequests, RejectTests):
    """L{RejectTests} through L{estat.http.protocol}."""


class BatchFastPathTests(FastPathRequests, BatchTests):
    """L{BatchTests} through L{estat.http.protocol}."""


class ClientAddressFastPathTests(FastPathRequests, ClientAddressTests):
    """L{ClientAddressTests} through L{estat.http.protocol}."""


class OtherRoutesFastPathTests(FastPathRequests, OtherRoutesTests):
    """L{OtherRoutesTests} through L{estat.http.protocol} (handed to Klein)."""
