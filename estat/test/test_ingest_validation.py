# -*- test-case-name: estat.test.test_ingest_validation -*-
"""
Tests for L{estat.ingest.validation} through the C{/collect} core and the
Segment routes: each mode's answer, what is queued where, the metrics.
"""

from __future__ import annotations

import base64
import json
import os

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.dedup import DedupWindow
from estat.ingest.access import WriteKeys
from estat.ingest.body import Limits
from estat.ingest.core import IngestCore, IngestRequest, QueueAdmission, Refusal
from estat.ingest.segment_api import SegmentAPI
from estat.ingest.segment_rules import SegmentLimits
from estat.ingest.validation import EventValidation, admit_both
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.schema.plan import load_plan

NOW = 1700000000.25

PURCHASE = {"type": "object", "properties": {"event": {"type": "string"},
                                             "price": {"type": "number"}},
            "required": ["price"]}
ANY = {"type": "object", "required": ["event"]}
ORDER = {"type": "object", "properties": {"properties": {"type": "object", "required": ["total"]}}}
MANY = {"type": "object", "additionalProperties": {"type": "integer"}}


def write_plan(directory: str, text: str) -> str:
    for name, schema in (("purchase.json", PURCHASE), ("any.json", ANY),
                         ("order.json", ORDER), ("many.json", MANY)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(schema, f)
    path = os.path.join(directory, "plan.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def post(body, path: bytes = b"/collect", headers: dict | None = None) -> IngestRequest:
    if not isinstance(body, bytes):
        body = orjson.dumps(body)
    return IngestRequest(method=b"POST", path=path, query=b"",
                         headers={b"content-type": b"application/json", **(headers or {})},
                         body=body, peer="192.0.2.7", received_at=NOW)


def lines(queue: EventQueue) -> list:
    out = []
    while len(queue):
        out.extend(orjson.loads(line) for _, line in queue.take(1000))
    return out


class Fixture(SynchronousTestCase):
    plan_text = ""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics(CollectorRegistry())
        self.good = EventQueue(1000)
        self.bad = EventQueue(1000)
        self.validation = EventValidation(load_plan(write_plan(self.dir, self.plan_text)),
                                          self.metrics)

    def sample(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0


class CollectTests(Fixture):
    plan_text = ("collect:\n  select: event\n  mode: quarantine\n"
                 "  schemas:\n    purchase: {file: purchase.json}\n"
                 "    checkout: {file: purchase.json, mode: reject}\n"
                 "    signup: {file: purchase.json, mode: flag}\n"
                 "    many: {file: many.json, mode: reject}\n"
                 "  default: {file: any.json}\n")

    def setUp(self) -> None:
        super().setUp()
        self.dedup = DedupWindow(self.clock, window=600.0, max_ids=1000)
        self.core = IngestCore(admission=QueueAdmission(self.good), metrics=self.metrics,
                               clock=self.clock, validation=self.validation,
                               bad_admission=QueueAdmission(self.bad), dedup=self.dedup,
                               limits=Limits(event_size=200000, body_size=400000,
                                             events_per_request=500))

    def answer(self, req: IngestRequest):
        answers = []
        self.core.collect(req, answers.append)
        self.assertEqual(len(answers), 1)
        return answers[0]

    def test_valid_events_as_without_a_plan(self) -> None:
        answer = self.answer(post([{"event": "purchase", "price": 3}, {"event": "click"}]))
        self.assertEqual((answer.status, answer.body), (202, b'{"accepted":2}'))
        stored = lines(self.good)
        self.assertEqual([e["event"] for e in stored], ["purchase", "click"])
        self.assertNotIn("schema_errors", stored[0]["_estat"])
        self.assertEqual(len(self.bad), 0)
        self.assertEqual(self.sample("estat_schema_events_total", stream="collect",
                                     schema="purchase.json", result="valid"), 1)
        self.assertEqual(self.sample("estat_schema_events_total", stream="collect",
                                     schema="any.json", result="valid"), 1)

    def test_quarantine(self) -> None:
        """
        The request gets its usual 202; the valid events are queued as
        always, the invalid one goes whole and unchanged to the bad rows'
        queue with its errors, schema id and server fields.
        """
        sent = {"event": "purchase", "price": "12,50", "n": [1, 2]}
        answer = self.answer(post([{"event": "purchase", "price": 1}, sent, {"e": 1}]))
        self.assertEqual((answer.status, answer.body), (202, b'{"accepted":3}'))
        self.assertEqual([e.get("price") for e in lines(self.good)], [1])
        rows = lines(self.bad)
        self.assertEqual(len(rows), 2)
        row = rows[0]
        self.assertEqual(row["payload"], sent)
        self.assertEqual(
            {k: row[k] for k in ("bad_row", "stream", "schema", "errors_total")},
            {"bad_row": "schema_violation", "stream": "collect", "schema": "purchase.json",
             "errors_total": 1})
        self.assertEqual(row["errors"], [{"pointer": "/price", "keyword": "type",
                                          "message": '"12,50" is not of type "number"'}])
        self.assertEqual(row["_estat"]["ip"], "192.0.2.7")
        self.assertEqual((rows[1]["schema"], rows[1]["payload"]), ("any.json", {"e": 1}))
        self.assertEqual(self.sample("estat_schema_events_total", stream="collect",
                                     schema="purchase.json", result="invalid"), 1)
        self.assertEqual(self.sample("estat_schema_errors_total", stream="collect",
                                     schema="purchase.json", keyword="type"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 3)

    def test_quarantine_single_event(self) -> None:
        answer = self.answer(post({"event": "purchase"}))
        self.assertEqual(answer.status, 202)
        self.assertEqual(len(self.good), 0)
        self.assertEqual(lines(self.bad)[0]["errors"][0]["keyword"], "required")

    def test_reject(self) -> None:
        """
        One event of a reject-mode schema fails: 400 naming its index,
        pointer, keyword and message; nothing of the request is queued,
        and every checked event of it counts as invalid.
        """
        answer = self.answer(post([{"event": "purchase", "price": 1},
                                   {"event": "checkout", "price": "x"}]))
        self.assertEqual(answer.status, 400)
        self.assertEqual(orjson.loads(answer.body), {
            "error": "events do not match their schema",
            "errors": [{"index": 1, "pointer": "/price", "keyword": "type",
                        "message": '"x" is not of type "number"'}]})
        self.assertEqual((len(self.good), len(self.bad)), (0, 0))
        self.assertEqual(self.sample("estat_schema_events_total", stream="collect",
                                     schema="purchase.json", result="invalid"), 2)
        self.assertEqual(self.sample("events_rejected_total", reason="schema_invalid"), 2)

    def test_reject_answer_stays_small(self) -> None:
        """
        An event with 10,000 errors: the answer names 10 of them.
        """
        event = {"event": "many", **{f"k{i}": "x" for i in range(10000)}}
        del event["event"]
        event["event"] = "many"
        answer = self.answer(post(event))
        self.assertEqual(answer.status, 400)
        self.assertEqual(len(orjson.loads(answer.body)["errors"]), 10)
        self.assertLess(len(answer.body), 2000)

    def test_flag(self) -> None:
        """
        A flag-mode failure is stored with the good events, its errors in
        C{_estat.schema_errors}.
        """
        answer = self.answer(post([{"event": "signup"}, {"event": "signup", "price": 2}]))
        self.assertEqual(answer.status, 202)
        stored = lines(self.good)
        self.assertEqual(stored[0]["_estat"]["schema_errors"],
                         [{"pointer": "", "keyword": "required",
                           "message": '"price" is a required property'}])
        self.assertNotIn("schema_errors", stored[1]["_estat"])
        self.assertEqual(len(self.bad), 0)

    def test_retry_of_quarantined_not_stored_twice(self) -> None:
        body = [{"event": "purchase", "messageId": "m1"}]
        self.answer(post(body))
        answer = self.answer(post(body))
        self.assertEqual(answer.body, b'{"accepted":1,"duplicates":1}')
        self.assertEqual(len(lines(self.bad)), 1)

    def test_bad_queue_full(self) -> None:
        """
        When the bad rows' stream refuses, the request is refused (503) so
        the client retries: a quarantined event is never lost.
        """
        self.core.bad_admission = QueueAdmission(EventQueue(0))
        answer = self.answer(post([{"event": "purchase"}]))
        self.assertEqual(answer.status, 503)

    def test_replace_between_requests(self) -> None:
        plan = load_plan(write_plan(self.dir, "collect:\n  default: {file: any.json, mode: reject}\n"))
        self.validation.replace(plan)
        self.assertEqual(self.answer(post({"event": "purchase"})).status, 202)
        self.assertEqual(self.answer(post({"e": 1})).status, 400)


class NoPlanTests(Fixture):
    plan_text = "collect:\n  default: {file: any.json, mode: off}\n"

    def test_off(self) -> None:
        core = IngestCore(admission=QueueAdmission(self.good), metrics=self.metrics,
                          clock=self.clock, validation=self.validation)
        answers = []
        core.collect(post({"e": 1}), answers.append)
        self.assertEqual(answers[0].status, 202)
        self.assertEqual(lines(self.good)[0]["e"], 1)
        self.assertEqual(self.sample("estat_schema_events_total", stream="collect",
                                     schema="any.json", result="valid"), 0)


class AdmitBothTests(SynchronousTestCase):
    def test_first_refusal_once(self) -> None:
        refusal = Refusal(503, "queue_full", "full")
        done = []
        admit_both(QueueAdmission(EventQueue(10)), [(1.0, b"{}")],
                   QueueAdmission(EventQueue(0)), [(1.0, b"{}")], done.append)
        self.assertEqual([d.reason for d in done], [refusal.reason])

    def test_neither_stream_takes_a_refused_request(self) -> None:
        """
        When either stream has no room, neither takes its events: the
        client retries the whole request, so anything taken would be
        stored twice.
        """
        for good_size, bad_size in ((10, 0), (0, 10)):
            good, bad, done = EventQueue(good_size), EventQueue(bad_size), []
            admit_both(QueueAdmission(good), [(1.0, b"{}")],
                       QueueAdmission(bad), [(1.0, b"{}")], done.append)
            self.assertEqual([d.reason for d in done], ["queue_full"])
            self.assertEqual((len(good), len(bad)), (0, 0))
        good, bad, done = EventQueue(1), EventQueue(1), []
        admit_both(QueueAdmission(good), [(1.0, b"{}")],
                   QueueAdmission(bad), [(1.0, b"{}")], done.append)
        self.assertEqual((done, len(good), len(bad)), ([None], 1, 1))


def basic(key: bytes) -> bytes:
    return b"Basic " + base64.b64encode(key + b":")


class SegmentTests(Fixture):
    plan_text = ("segment:\n  mode: quarantine\n  schemas:\n"
                 "    Order Completed: {file: order.json}\n"
                 "    Order Refunded: {file: order.json, mode: reject}\n"
                 "    Signed Up: {file: order.json, mode: flag}\n")

    def setUp(self) -> None:
        super().setUp()
        self.api = SegmentAPI(admission=QueueAdmission(self.good), metrics=self.metrics,
                              clock=self.clock, write_keys=WriteKeys(),
                              limits=SegmentLimits(messages_per_batch=500),
                              validation=self.validation, bad_admission=QueueAdmission(self.bad))

    def answer(self, req):
        answers = []
        self.api.handler_for(req.path)(req, answers.append)
        self.assertEqual(len(answers), 1)
        return answers[0]

    def message(self, event: str, **props) -> dict:
        return {"type": "track", "event": event, "userId": "u", "properties": props}

    def test_quarantine(self) -> None:
        bad = self.message("Order Completed", tax=1)
        bad["writeKey"] = "k1"
        answer = self.answer(post({"batch": [self.message("Order Completed", total=3), bad,
                                             {"type": "identify", "userId": "u"}]},
                                  path=b"/v1/batch"))
        self.assertEqual((answer.status, answer.body), (200, b'{"success":true}'))
        self.assertEqual([m["type"] for m in lines(self.good)], ["track", "identify"])
        row, = lines(self.bad)
        del bad["writeKey"]
        self.assertEqual(row["payload"], bad)
        self.assertEqual((row["stream"], row["schema"], row["errors"][0]["pointer"]),
                         ("segment", "order.json", "/properties"))
        self.assertEqual(row["_estat"]["source"], None)

    def test_track_route_takes_its_type(self) -> None:
        """
        A /v1/track body without C{type} is checked as the track it is.
        """
        message = self.message("Order Completed")
        del message["type"]
        answer = self.answer(post(message, path=b"/v1/track"))
        self.assertEqual(answer.status, 200)
        self.assertEqual(len(lines(self.bad)), 1)

    def test_reject(self) -> None:
        answer = self.answer(post({"batch": [self.message("Order Completed", total=1),
                                             self.message("Order Refunded")]},
                                  path=b"/v1/batch"))
        self.assertEqual(answer.status, 400)
        body = orjson.loads(answer.body)
        self.assertEqual(body["errors"], [{"index": 1, "pointer": "/properties",
                                           "keyword": "required",
                                           "message": '"total" is a required property'}])
        self.assertEqual((len(self.good), len(self.bad)), (0, 0))

    def test_flag(self) -> None:
        self.answer(post({"batch": [self.message("Signed Up")]}, path=b"/v1/batch"))
        stored, = lines(self.good)
        self.assertEqual(stored["_estat"]["schema_errors"][0]["keyword"], "required")
        self.assertEqual(stored["event"], "Signed Up")
