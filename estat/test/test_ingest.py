# -*- test-case-name: estat.test.test_ingest -*-
"""
Tests for L{estat.ingest.core}: the rules of C{/collect} with no HTTP at all,
an L{IngestRequest} in and an L{Answer} out.
"""

from __future__ import annotations

import gzip
import json

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from estat.ingest.access import CorsPolicy, WriteKeys
from estat.ingest.body import Limits
from estat.ingest.core import IAdmission, IngestCore, IngestRequest, QueueAdmission, Refusal
from estat.metrics import Metrics
from estat.queue import EventQueue

NOW = 1700000000.25


def request(body: bytes = b'{"e":1}', method: bytes = b"POST", headers: dict | None = None,
            query: bytes = b"", peer: str = "192.0.2.7") -> IngestRequest:
    return IngestRequest(method=method, path=b"/collect", query=query,
                         headers=headers if headers is not None
                         else {b"content-type": b"application/json"},
                         body=body, peer=peer, received_at=NOW)


@implementer(IAdmission)
class WaitingAdmission:
    """
    An admission that answers when the test says so (as the disk and
    stored modes do).
    """

    def __init__(self) -> None:
        self.waiting: list = []

    def admit(self, events, done) -> None:
        self.waiting.append((events, done))


class IngestCoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = EventQueue(10)
        self.metrics = Metrics(CollectorRegistry())
        self.core = IngestCore(admission=QueueAdmission(self.queue, retry_after=4),
                               metrics=self.metrics, clock=self.clock,
                               limits=Limits(event_size=100, body_size=1000,
                                             events_per_request=5),
                               cors=CorsPolicy(("https://app.example",)))

    def answer(self, req: IngestRequest, core: IngestCore | None = None):
        answers = []
        (core or self.core).collect(req, answers.append)
        self.assertEqual(len(answers), 1)
        return answers[0]

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_queue_admission_provides(self):
        self.assertTrue(verifyObject(IAdmission, QueueAdmission(self.queue)))

    def test_accepted(self):
        """
        One object: 202 with the count, the event queued with its server
        fields, the metrics counted.
        """
        answer = self.answer(request(headers={b"content-type": b"application/json",
                                              b"user-agent": b"agent/1"}))
        self.assertEqual((answer.status, answer.body), (202, b'{"accepted":1}'))
        self.assertIn((b"content-type", b"application/json"), answer.headers)
        self.assertIn((b"vary", b"Origin"), answer.headers)
        [(received, line)] = self.queue.take(10)
        self.assertEqual(received, NOW)
        self.assertEqual(orjson.loads(line), {
            "e": 1, "_estat": {"received_at": "2023-11-14T22:13:20.250Z",
                               "ip": "192.0.2.7", "user_agent": "agent/1"}})
        self.assertEqual(self.sample("http_requests_accepted_total"), 1)
        self.assertEqual(self.sample("events_accepted_total"), 1)

    def test_source(self):
        """
        With C{record_source}, C{_estat.source} is the presented write key's
        name (nothing for a key without one, or when no key is required);
        without it, C{_estat} has no C{source}, as JSON Lines always stored.
        """
        keys = WriteKeys(["k1=web", "k2"])
        for record, key, expected in ((True, b"k1", {"source": "web"}),
                                      (True, b"k2", {}),
                                      (False, b"k1", {})):
            queue = EventQueue(10)
            core = IngestCore(admission=QueueAdmission(queue), metrics=self.metrics,
                              clock=self.clock, write_keys=keys, record_source=record)
            answer = self.answer(request(headers={b"x-write-key": key}), core)
            self.assertEqual(answer.status, 202)
            [(_, line)] = queue.take(10)
            server = orjson.loads(line)["_estat"]
            self.assertEqual({k: v for k, v in server.items() if k == "source"}, expected)
        core = IngestCore(admission=QueueAdmission(self.queue), metrics=self.metrics,
                          clock=self.clock, record_source=True)
        self.assertEqual(self.answer(request(), core).status, 202)
        [(_, line)] = self.queue.take(10)
        self.assertNotIn("source", orjson.loads(line)["_estat"])
        self.assertEqual(self.answer(request(headers={b"x-write-key": b"nope"}),
                                     IngestCore(admission=QueueAdmission(self.queue),
                                                metrics=self.metrics, clock=self.clock,
                                                write_keys=keys, record_source=True)).status,
                         401)

    def test_batch_gzip(self):
        body = gzip.compress(b'[{"a":1},{"a":2},{"a":3}]')
        answer = self.answer(request(body, headers={b"content-encoding": b"gzip"}))
        self.assertEqual((answer.status, answer.body), (202, b'{"accepted":3}'))
        self.assertEqual([orjson.loads(line)["a"] for _, line in self.queue.take(10)],
                         [1, 2, 3])

    def test_ndjson(self):
        answer = self.answer(request(b'{"a":1}\n{"a":2}\n',
                                     headers={b"content-type": b"application/x-ndjson"}))
        self.assertEqual(answer.body, b'{"accepted":2}')

    def test_queue_full(self):
        """
        A full queue refuses the whole request: 503, C{Retry-After}, the
        reason counted with every event.
        """
        self.queue.offer([(NOW, b"x")] * 9)
        answer = self.answer(request(b'[{"a":1},{"a":2}]'))
        self.assertEqual(answer.status, 503)
        self.assertIn((b"retry-after", b"4"), answer.headers)
        self.assertEqual(json.loads(answer.body), {"error": "event queue is full, retry later"})
        self.assertEqual(self.sample("http_requests_rejected_queue_full_total"), 1)
        self.assertEqual(self.sample("events_rejected_total", reason="queue_full"), 2)

    def test_refusals(self):
        """
        Each refusal has its status and a short JSON reason.
        """
        cases = [
            (request(method=b"GET"), 405, "method_not_allowed"),
            (request(b"{nope"), 400, "invalid_json"),
            (request(b"[]"), 400, "empty_batch"),
            (request(b'{"x":"' + b"a" * 200 + b'"}'), 413, "too_large"),
            (request(b"[" + b",".join([b"{}"] * 6) + b"]"), 413, "too_many_events"),
            (request(b"x", headers={b"content-encoding": b"br"}), 415, "unsupported_encoding"),
            (request(b'{"_estat":1}'), 400, "reserved_field"),
        ]
        for req, status, reason in cases:
            answer = self.answer(req)
            self.assertEqual(answer.status, status, reason)
            self.assertIn("error", json.loads(answer.body), reason)
            self.assertEqual(self.sample("http_requests_rejected_total", reason=reason), 1,
                             reason)
        self.assertEqual(self.queue.take(10), [])
        self.assertEqual(self.sample("http_requests_total"), len(cases))

    def test_405_allow(self):
        answer = self.answer(request(method=b"PUT"))
        self.assertIn((b"allow", b"POST, OPTIONS"), answer.headers)

    def test_write_keys(self):
        core = IngestCore(admission=QueueAdmission(self.queue), metrics=self.metrics,
                          clock=self.clock, write_keys=WriteKeys(["k1"]))
        self.assertEqual(self.answer(request(), core).status, 401)
        ok = request(headers={b"x-write-key": b"k1"})
        self.assertEqual(self.answer(ok, core).status, 202)
        self.assertEqual(self.answer(request(query=b"write_key=k1"), core).status, 202)
        self.assertEqual(self.answer(request(query=b"write_key=k2"), core).status, 401)

    def test_preflight(self):
        """
        OPTIONS answers 204 with the CORS preflight fields, counts no
        request and queues nothing.
        """
        answer = self.answer(request(b"", method=b"OPTIONS",
                                     headers={b"origin": b"https://app.example"}))
        self.assertEqual((answer.status, answer.body), (204, b""))
        headers = dict(answer.headers)
        self.assertEqual(headers[b"access-control-allow-origin"], b"https://app.example")
        self.assertEqual(headers[b"access-control-max-age"], b"86400")
        self.assertEqual(self.sample("http_requests_total"), 0)

    def test_forwarded_for(self):
        """
        The client address comes from the resolver: the peer, since no
        proxy is trusted.
        """
        self.answer(request(headers={b"x-forwarded-for": b"203.0.113.9"}))
        [(_, line)] = self.queue.take(10)
        self.assertEqual(orjson.loads(line)["_estat"]["ip"], "192.0.2.7")

    def test_answer_waits_for_admission(self):
        """
        With an admission that waits (disk or stored mode), the answer comes
        when it says so: 202 once admitted, its refusal otherwise.
        """
        admission = WaitingAdmission()
        core = IngestCore(admission=admission, metrics=self.metrics, clock=self.clock)
        answers = []
        core.collect(request(b'[{"a":1},{"a":2}]'), answers.append)
        core.collect(request(), answers.append)
        self.assertEqual(answers, [])
        [(events, done1), (_, done2)] = admission.waiting
        self.assertEqual(len(events), 2)
        done1(None)
        done2(Refusal(503, "wal_full", "the write-ahead log is full", 2))
        self.assertEqual([a.status for a in answers], [202, 503])
        self.assertIn((b"retry-after", b"2"), answers[1].headers)
        self.assertEqual(self.sample("events_accepted_total"), 2)
        self.assertEqual(self.sample("events_rejected_total", reason="wal_full"), 1)


class CollectDedupTests(SynchronousTestCase):
    """
    C{/collect} events carrying a C{messageId} admitted within the dedup
    window are acknowledged and not stored again.
    """

    def setUp(self) -> None:
        from estat.dedup import DedupWindow

        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = EventQueue(10)
        self.metrics = Metrics(CollectorRegistry())
        self.dedup = DedupWindow(self.clock, window=60.0, max_ids=100)
        self.core = IngestCore(admission=QueueAdmission(self.queue), metrics=self.metrics,
                               clock=self.clock, dedup=self.dedup)

    def answer(self, req: IngestRequest, core: IngestCore | None = None):
        answers = []
        (core or self.core).collect(req, answers.append)
        self.assertEqual(len(answers), 1)
        return answers[0]

    def test_retried_batch_stored_once(self):
        body = json.dumps([{"e": 1, "messageId": "a"}, {"e": 2}, {"e": 3, "messageId": "b"}])
        first = self.answer(request(body.encode()))
        self.assertEqual((first.status, first.body), (202, b'{"accepted":3}'))
        again = self.answer(request(body.encode()))
        self.assertEqual((again.status, again.body), (202, b'{"accepted":3,"duplicates":2}'))
        stored = [orjson.loads(line) for _, line in self.queue.take(10)]
        self.assertEqual([e["e"] for e in stored], [1, 2, 3, 2])
        self.assertEqual(self.metrics.registry.get_sample_value(
            "events_deduplicated_total", {"stream": "collect"}), 2)
        self.assertEqual(self.metrics.registry.get_sample_value("events_accepted_total"), 4)

    def test_all_duplicates_skip_the_admission(self):
        body = b'{"messageId":"only"}'
        self.assertEqual(self.answer(request(body)).status, 202)
        self.queue.take(10)
        answer = self.answer(request(body))
        self.assertEqual((answer.status, answer.body), (202, b'{"accepted":1,"duplicates":1}'))
        self.assertEqual(len(self.queue), 0)

    def test_refused_then_retried_is_stored(self):
        admission = WaitingAdmission()
        core = IngestCore(admission=admission, metrics=self.metrics, clock=self.clock,
                          dedup=self.dedup)
        answers = []
        core.collect(request(b'{"messageId":"m"}'), answers.append)
        # While the first waits, its retry is told to come back later.
        retry = self.answer(request(b'{"messageId":"m"}'), core)
        self.assertEqual(retry.status, 503)
        _, done = admission.waiting.pop()
        done(Refusal(503, "wal_full", "full", 1))
        self.assertEqual(answers[0].status, 503)
        core.collect(request(b'{"messageId":"m"}'), answers.append)
        _, done = admission.waiting.pop()
        done(None)
        self.assertEqual(answers[1].status, 202)

    def test_non_string_ids_are_not_deduplicated(self):
        for _ in range(2):
            self.assertEqual(self.answer(request(b'{"messageId":7}')).status, 202)
        self.assertEqual(len(self.queue), 2)


class OnePassTests(SynchronousTestCase):
    """
    L{IngestCore.handle} decides the common request in one pass: the same
    answer, the same queued line and the same metrics as the general rules
    (L{IngestCore._collect}) give, for every kind of request, and it falls
    back to them for everything else.
    """

    REQUESTS = [
        request(),
        request(b'{"e":"caf\xc3\xa9","n":[1,2,{"x":null}]}',
                headers={b"content-type": b"application/json", b"user-agent": b"a/1"}),
        request(b'{"e":1}', headers={b"content-type": b"text/plain;charset=UTF-8"}),
        request(b'{"e":1}', headers={}),
        request(b'{"e":1}', headers={b"content-type": b"application/x-ndjson"}),
        request(b'{"e":1}\n{"e":2}\n', headers={b"content-type": b"application/x-ndjson"}),
        request(b'{"big":12345678901234567890123}'),
        request(b'{"_estat":{"ip":"1.2.3.4"}}'),
        request(b'{"e":'),
        request(b'[{"e":1},{"e":2}]'),
        request(b'"text"'),
        request(b'{"e":"' + b"x" * 200 + b'"}'),
        request(b'{"e":1}', method=b"GET"),
        request(b'{"e":1}', method=b"OPTIONS",
                headers={b"origin": b"https://app.example"}),
        request(b'{"e":1}', headers={b"origin": b"https://app.example"}),
        request(b'{"e":1}', headers={b"origin": b"https://elsewhere.example"}),
        request(gzip.compress(b'{"e":1}'), headers={b"content-encoding": b"gzip"}),
        request(b'{"messageId":"m-1","e":1}'),
        request(b'{"messageId":"m-1","e":1}'),
        request(b'{"user_agent":"\xe2\x80\x8b"}', headers={b"user-agent": b"\xff\xfe"}),
    ]

    def core(self, queue_size: int = 100, **kwargs) -> tuple:
        clock = Clock()
        clock.advance(NOW)
        queue = EventQueue(queue_size)
        metrics = Metrics(CollectorRegistry())
        core = IngestCore(admission=QueueAdmission(queue), metrics=metrics, clock=clock,
                          limits=Limits(event_size=100, body_size=1000, events_per_request=5),
                          cors=CorsPolicy(("https://app.example",)), **kwargs)
        return core, queue, metrics

    def run_both(self, queue_size: int = 100, make=dict) -> None:
        """
        @param make: makes the cores' other arguments (each its own).
        """
        one, one_queue, one_metrics = self.core(queue_size, **make())
        general, general_queue, general_metrics = self.core(queue_size, **make())
        for req in self.REQUESTS:
            answers = []
            returned = one.handle(req._replace(headers=dict(req.headers)), answers.append)
            if returned is not None:
                self.assertEqual(answers, [], "both returned and responded")
                answers.append(returned)
            expected = []
            returned = general._collect(req._replace(headers=dict(req.headers)),
                                        expected.append)
            if returned is not None:
                expected.append(returned)
            self.assertEqual(answers, expected, req)
            self.assertEqual(one_queue.take(1000), general_queue.take(1000), req)
        self.assertEqual(
            sorted((s.name, sorted(s.labels.items()), s.value)
                   for m in one_metrics.registry.collect() for s in m.samples
                   if not s.name.endswith("_created")),
            sorted((s.name, sorted(s.labels.items()), s.value)
                   for m in general_metrics.registry.collect() for s in m.samples
                   if not s.name.endswith("_created")))

    def test_same_as_the_general_rules(self):
        self.run_both()

    def test_same_with_dedup(self):
        from estat.dedup import DedupWindow

        self.run_both(make=lambda: {"dedup": DedupWindow(Clock(), window=60.0, max_ids=100)})

    def test_same_with_write_keys(self):
        self.run_both(make=lambda: {"write_keys": WriteKeys((b"k1",))})
        self.REQUESTS = [request(headers={b"x-write-key": b"k1"}),
                         request(headers={b"x-write-key": b"nope"})]
        self.run_both(make=lambda: {"write_keys": WriteKeys(("k1=web",)),
                                    "record_source": True})

    def test_same_when_the_queue_is_full(self):
        self.run_both(queue_size=1)

    def test_common_request_returned(self):
        """
        The common request's answer is returned, not given to C{respond},
        and it is the same 202 object every time (a front end may keep its
        bytes).
        """
        core, queue, _ = self.core()
        first = core.handle(request(), self.fail)
        second = core.handle(request(b'{"e":2}'), self.fail)
        self.assertEqual((first.status, first.body), (202, b'{"accepted":1}'))
        self.assertIs(first, second)
        self.assertEqual(len(queue), 2)

    def test_falls_back_when_not_admitted_at_once(self):
        """
        An admission without C{try_admit} (the disk and stored modes), or
        one set after the core was made, takes the general path: C{respond}
        is called when the admission decides.
        """
        core, _, _ = self.core()
        admission = WaitingAdmission()
        core.admission = admission
        answers = []
        self.assertIsNone(core.handle(request(), answers.append))
        self.assertEqual(answers, [])
        [(events, done)] = admission.waiting
        [(received, line)] = events
        self.assertEqual(orjson.loads(line)["_estat"]["ip"], "192.0.2.7")
        done(None)
        self.assertEqual([a.status for a in answers], [202])
        core.admission = QueueAdmission(EventQueue(0))
        self.assertIsNone(core.handle(request(), answers.append))
        self.assertEqual([a.status for a in answers], [202, 503])
