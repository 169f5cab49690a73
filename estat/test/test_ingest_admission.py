# -*- test-case-name: estat.test.test_ingest_admission -*-
"""
Tests for L{estat.ingest.admission}: a request that finds the event queue
full waits a bounded time for room, first come first served.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from estat.batcher import Batcher
from estat.ingest.admission import WaitingQueueAdmission
from estat.ingest.core import IAdmission, IngestCore, IngestRequest
from estat.ingest.validation import admit_both
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.queue import EventQueue

NOW = 1700000000.0


def events(first: int, count: int) -> list:
    return [(NOW, b'{"n":%d}' % n) for n in range(first, first + count)]


class Answers:
    """
    The C{done} callables of several requests, and what each was told.
    """

    def __init__(self) -> None:
        self.told: dict = {}

    def done(self, name: str):
        def done(refusal) -> None:
            assert name not in self.told, f"{name} answered twice"
            self.told[name] = "admitted" if refusal is None else refusal.reason
        return done


class WaitingQueueAdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics(CollectorRegistry())
        self.queue = EventQueue(4)
        self.answers = Answers()

    def tearDown(self) -> None:
        # No timer outlives the waiters it was for.
        if not getattr(self, "timers_may_remain", False):
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def admission(self, **kwargs) -> WaitingQueueAdmission:
        kwargs.setdefault("max_wait", 1.0)
        kwargs.setdefault("max_waiting_events", 10)
        return WaitingQueueAdmission(self.queue, clock=self.clock, metrics=self.metrics,
                                     **kwargs)

    def admit(self, admission, name: str, evs: list) -> None:
        admission.admit(evs, self.answers.done(name))

    def sample(self, name: str, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_provides(self):
        self.assertTrue(verifyObject(IAdmission, self.admission()))

    def test_room_admits_at_once(self):
        admission = self.admission()
        self.admit(admission, "a", events(0, 4))
        self.assertEqual(self.answers.told, {"a": "admitted"})
        self.assertEqual(len(self.queue), 4)
        self.assertEqual(admission.waiting, 0)

    def test_full_queue_waits_then_admits_when_room_appears(self):
        """
        A request that finds no room is not answered; once the batcher has
        taken enough events it is admitted, its events queued.
        """
        admission = self.admission()
        self.admit(admission, "a", events(0, 3))
        self.admit(admission, "b", events(3, 3))
        self.assertEqual(self.answers.told, {"a": "admitted"})
        self.assertEqual(admission.waiting, 1)
        self.assertEqual(self.sample("event_queue_waiting_requests"), 1)
        self.assertEqual(self.sample("event_queue_waiting_events"), 3)

        self.clock.advance(0.25)
        self.assertEqual(self.queue.take(1), events(0, 1))
        self.assertEqual(self.answers.told, {"a": "admitted"})
        self.queue.take(1)
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "admitted"})
        self.assertEqual(self.queue.take(10), events(2, 4))
        self.assertEqual(self.sample("event_queue_waiting_requests"), 0)
        self.assertEqual(self.sample("event_queue_waiting_events"), 0)
        self.assertEqual(self.sample("event_queue_waits_total", outcome="admitted"), 1)
        self.assertEqual(self.sample("event_queue_wait_duration_seconds_count"), 1)
        self.assertEqual(self.sample("event_queue_wait_duration_seconds_sum"), 0.25)

    def test_first_come_first_served(self):
        """
        Waiters are admitted in the order they came; a later, smaller
        request that would fit does not overtake, and a new request waits
        behind those already waiting.
        """
        admission = self.admission()
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 3))
        self.admit(admission, "c", events(7, 1))
        self.queue.take(1)
        self.assertEqual(set(self.answers.told), {"a"})
        self.assertFalse(admission.try_admit(events(8, 1)))
        self.assertEqual(len(self.queue), 3)
        self.queue.take(2)
        self.assertEqual(set(self.answers.told), {"a", "b"})
        self.queue.take(1)
        self.assertEqual(set(self.answers.told), {"a", "b", "c"})
        self.assertEqual(self.queue.take(10), events(4, 4))

    def test_refused_after_max_wait(self):
        """
        A request still waiting after C{max_wait} is refused: 503
        C{queue_full}, and counted.
        """
        admission = self.admission(max_wait=1.5)
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 1))
        self.clock.advance(1.4)
        self.assertNotIn("b", self.answers.told)
        self.clock.advance(0.1)
        self.assertEqual(self.answers.told["b"], "queue_full")
        self.assertEqual(admission.waiting, 0)
        self.assertEqual(self.sample("event_queue_waits_total", outcome="timed_out"), 1)
        # Room that comes later admits nothing twice.
        self.queue.take(4)
        self.assertEqual(len(self.queue), 0)

    def test_each_waiter_has_its_own_deadline(self):
        admission = self.admission()
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 1))
        self.clock.advance(0.5)
        self.admit(admission, "c", events(5, 1))
        self.clock.advance(0.5)
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "queue_full"})
        self.clock.advance(0.4)
        self.assertNotIn("c", self.answers.told)
        self.clock.advance(0.1)
        self.assertEqual(self.answers.told["c"], "queue_full")

    def test_a_refused_head_lets_the_next_in(self):
        """
        When the head waiter's time is up, the next one is admitted if it
        fits now.
        """
        admission = self.admission(max_waiting_events=10)
        self.admit(admission, "a", events(0, 2))
        self.admit(admission, "b", events(2, 4))
        self.clock.advance(0.5)
        self.admit(admission, "c", events(6, 2))
        self.assertEqual(set(self.answers.told), {"a"})
        self.clock.advance(0.5)
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "queue_full",
                                             "c": "admitted"})
        self.assertEqual(self.queue.take(10), events(0, 2) + events(6, 2))

    def test_waiting_events_are_bounded(self):
        """
        A request that would take the waiting events past
        C{max_waiting_events} is refused at once.
        """
        admission = self.admission(max_waiting_events=5)
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 3))
        self.admit(admission, "c", events(7, 3))
        self.assertEqual(self.answers.told, {"a": "admitted", "c": "queue_full"})
        self.admit(admission, "d", events(10, 2))
        self.assertNotIn("d", self.answers.told)
        self.assertEqual(admission.waiting_events, 5)
        self.queue.take(4)
        self.assertEqual(self.answers.told["b"], "admitted")
        self.assertEqual(self.answers.told.get("d"), None)
        self.queue.take(1)
        self.assertEqual(self.answers.told["d"], "admitted")

    def test_more_than_the_queue_holds_is_refused_at_once(self):
        admission = self.admission()
        self.admit(admission, "a", events(0, 5))
        self.assertEqual(self.answers.told, {"a": "queue_full"})
        self.assertEqual(admission.waiting, 0)

    def test_no_wait(self):
        """
        C{max_wait=0}: a full queue refuses at once, as before waiting
        existed.
        """
        admission = self.admission(max_wait=0)
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 1))
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "queue_full"})

    def test_shutdown_refuses_every_waiter(self):
        """
        When the queue closes (the batcher drains it on stop) every waiter
        is answered 503 at once and its timer cancelled: nothing hangs, and
        nothing was acknowledged that is not queued.
        """
        admission = self.admission()
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 1))
        self.admit(admission, "c", events(5, 2))
        self.queue.close()
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "queue_full",
                                             "c": "queue_full"})
        self.assertEqual(self.sample("event_queue_waits_total", outcome="shutdown"), 2)
        self.admit(admission, "d", events(7, 1))
        self.assertEqual(self.answers.told["d"], "queue_full")
        self.assertEqual(self.queue.take(10), events(0, 4))

    def test_refusal_for_counts_a_wait_as_a_refusal(self):
        """
        L{admit_both} asks both streams first so that a request goes to
        both or neither: a request that would have to wait is refused, and
        neither stream takes its events.
        """
        admission = self.admission()
        bad_queue = EventQueue(10)
        bad = WaitingQueueAdmission(bad_queue, clock=self.clock,
                                    metrics=Metrics(CollectorRegistry()))
        self.assertIsNone(admission.refusal_for(4))
        self.admit(admission, "a", events(0, 3))
        self.assertEqual(admission.refusal_for(2).reason, "queue_full")
        admit_both(admission, events(3, 2), bad, events(5, 1), self.answers.done("b"))
        self.assertEqual(self.answers.told["b"], "queue_full")
        self.assertEqual(len(bad_queue), 0)
        admit_both(admission, events(3, 1), bad, events(5, 1), self.answers.done("c"))
        self.assertEqual(self.answers.told["c"], "admitted")
        self.assertEqual(len(bad_queue), 1)

    def test_room_made_by_the_early_wake_admits_at_once(self):
        """
        With the reactor's coalesced wake, a request that finds the queue
        full while the batcher's wake is due is admitted without waiting.
        """
        self.queue = EventQueue(4, call_soon=lambda f: None)
        admission = self.admission()
        got = self.queue.get()
        got.addCallback(lambda first: self.queue.take(10))
        self.admit(admission, "a", events(0, 4))
        self.admit(admission, "b", events(4, 4))
        self.assertEqual(self.answers.told, {"a": "admitted", "b": "admitted"})
        self.assertEqual(self.queue.take(10), events(4, 4))


class IngestCoreWaitTests(SynchronousTestCase):
    """
    Through the ingest core: the answer after a wait is the same 202, or
    the same 503 with its body, C{Retry-After} and metrics.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics(CollectorRegistry())
        self.queue = EventQueue(2)
        self.core = IngestCore(
            admission=WaitingQueueAdmission(self.queue, clock=self.clock, metrics=self.metrics,
                                            max_wait=1.0, max_waiting_events=10,
                                            retry_after=1),
            metrics=self.metrics, clock=self.clock)

    def post(self, body: bytes) -> list:
        answers = []
        self.core.collect(IngestRequest(b"POST", b"/collect", b"",
                                        {b"content-type": b"application/json"}, body,
                                        "192.0.2.7", self.clock.seconds()),
                          answers.append)
        return answers

    def test_accepted_after_a_wait(self):
        self.assertEqual(self.post(b'[{"n":1},{"n":2}]')[0].status, 202)
        answers = self.post(b'[{"n":3},{"n":4}]')
        self.assertEqual(answers, [])
        self.clock.advance(0.2)
        self.queue.take(2)
        self.assertEqual(len(answers), 1)
        self.assertEqual((answers[0].status, answers[0].body), (202, b'{"accepted":2}'))
        self.assertEqual(self.metrics.registry.get_sample_value("events_accepted_total"), 4)

    def test_queue_full_after_the_wait(self):
        self.post(b'[{"n":1},{"n":2}]')
        answers = self.post(b'{"n":3}')
        self.clock.advance(1.0)
        self.assertEqual(len(answers), 1)
        answer = answers[0]
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.body, b'{"error":"event queue is full, retry later"}')
        self.assertIn((b"retry-after", b"1"), answer.headers)
        self.assertEqual(self.metrics.registry.get_sample_value(
            "http_requests_rejected_queue_full_total"), 1)


class BatcherWaitTests(SynchronousTestCase):
    """
    With the real batcher: while every slot is being uploaded the queue is
    truly full and requests wait; as batches finish they are admitted, in
    order, and every admitted event is stored once.
    """

    def test_burst_waits_for_the_batcher(self):
        clock = Clock()
        clock.advance(NOW)
        metrics = Metrics(CollectorRegistry())
        queue = EventQueue(4)
        uploads: list = []

        def sink(batch) -> Deferred:
            d = Deferred()
            uploads.append((batch, d))
            return d

        batcher = Batcher(queue=queue, sink=sink,
                          key_maker=KeyMaker("raw", "dlq", "t", entropy=lambda n: b"\0" * n),
                          metrics=metrics, clock=clock, batch_size=4, max_pending=1)
        batcher.startService()
        admission = WaitingQueueAdmission(queue, clock=clock, metrics=metrics,
                                          max_wait=1.0, max_waiting_events=8)
        answers = Answers()
        for n in range(5):
            admission.admit(events(2 * n, 2), answers.done(str(n)))
        # Two requests made the first batch, two fill the queue, one waits.
        self.assertEqual(len(uploads), 1)
        self.assertEqual(sorted(answers.told), ["0", "1", "2", "3"])
        self.assertEqual(admission.waiting, 1)
        clock.advance(0.5)
        uploads[0][1].callback(None)
        self.assertEqual(len(uploads), 2)
        self.assertEqual(answers.told["4"], "admitted")
        uploads[1][1].callback(None)
        batcher.stopService()
        for _, d in uploads[2:]:
            d.callback(None)
        self.assertEqual([e for batch, _ in uploads for e in batch.events], events(0, 10))
        self.assertEqual(clock.getDelayedCalls(), [])
