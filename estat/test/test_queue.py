# -*- test-case-name: estat.test.test_queue -*-
"""
Tests for L{estat.queue}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, QueueUnderflow
from twisted.trial.unittest import SynchronousTestCase

from estat.queue import EventQueue


def events(*names: str) -> list:
    return [(float(i), name.encode()) for i, name in enumerate(names)]


class OfferTests(SynchronousTestCase):
    def test_offerAll(self) -> None:
        q = EventQueue(3)
        self.assertTrue(q.offer(events("a", "b")))
        self.assertEqual(len(q), 2)
        self.assertEqual(q.free, 1)

    def test_allOrNothing(self) -> None:
        q = EventQueue(3)
        self.assertTrue(q.offer(events("a", "b")))
        self.assertFalse(q.offer(events("c", "d")))
        self.assertEqual(len(q), 2)
        self.assertEqual(q.take(10), events("a", "b"))

    def test_exactFit(self) -> None:
        q = EventQueue(3)
        self.assertTrue(q.offer(events("a")))
        self.assertTrue(q.offer(events("b", "c")))
        self.assertEqual(len(q), 3)
        self.assertEqual(q.free, 0)

    def test_fullQueueRefuses(self) -> None:
        q = EventQueue(2)
        self.assertTrue(q.offer(events("a", "b")))
        self.assertFalse(q.offer(events("c")))
        self.assertEqual(len(q), 2)
        q.take(1)
        self.assertTrue(q.offer(events("c")))

    def test_tooManyForAnEmptyQueue(self) -> None:
        q = EventQueue(2)
        self.assertFalse(q.offer(events("a", "b", "c")))
        self.assertEqual(len(q), 0)

    def test_closedQueueRefuses(self) -> None:
        q = EventQueue(10)
        self.assertTrue(q.offer(events("a")))
        q.close()
        self.assertTrue(q.closed)
        self.assertFalse(q.offer(events("b")))
        # What was queued before closing stays to be taken.
        self.assertEqual(q.take(10), events("a"))

    def test_closedQueueRefusesAWaitingConsumer(self) -> None:
        q = EventQueue(10)
        d = q.get()
        q.close()
        self.assertFalse(q.offer(events("a")))
        self.assertNoResult(d)

    def test_offerNothing(self) -> None:
        q = EventQueue(2)
        self.assertTrue(q.offer([]))
        self.assertEqual(len(q), 0)

    def test_offerNothingToAWaitingConsumer(self) -> None:
        """
        Offering no events succeeds and leaves a waiting consumer waiting.
        """
        q = EventQueue(2)
        d = q.get()
        self.assertTrue(q.offer([]))
        self.assertNoResult(d)
        self.assertTrue(q.offer(events("a")))
        self.assertEqual(self.successResultOf(d), events("a")[0])


class TakeTests(SynchronousTestCase):
    def test_order(self) -> None:
        q = EventQueue(10)
        all_events = events("a", "b", "c", "d", "e")
        q.offer(all_events[:2])
        q.offer(all_events[2:])
        self.assertEqual(q.take(2), all_events[:2])
        self.assertEqual(len(q), 3)
        self.assertEqual(q.take(10), all_events[2:])
        self.assertEqual(q.take(1), [])
        self.assertEqual(len(q), 0)
        self.assertEqual(q.free, 10)

    def test_takeExactlyAll(self) -> None:
        q = EventQueue(3)
        q.offer(events("a", "b", "c"))
        self.assertEqual(q.take(3), events("a", "b", "c"))
        self.assertEqual(len(q), 0)

    def test_takeZero(self) -> None:
        q = EventQueue(3)
        q.offer(events("a"))
        self.assertEqual(q.take(0), [])
        self.assertEqual(len(q), 1)

    def test_takenListIsACopy(self) -> None:
        q = EventQueue(3)
        q.offer(events("a", "b"))
        taken = q.take(10)
        q.offer(events("c"))
        self.assertEqual(taken, events("a", "b"))
        self.assertEqual(q.take(10), events("c"))


class GetTests(SynchronousTestCase):
    def test_getNonEmpty(self) -> None:
        q = EventQueue(3)
        q.offer(events("a", "b"))
        self.assertEqual(self.successResultOf(q.get()), events("a")[0])
        self.assertEqual(q.take(10), events("a", "b")[1:])

    def test_waitingGetReceivesFirst(self) -> None:
        q = EventQueue(5)
        d = q.get()
        self.assertNoResult(d)
        batch = events("a", "b", "c")
        self.assertTrue(q.offer(batch))
        self.assertEqual(self.successResultOf(d), batch[0])
        self.assertEqual(len(q), 2)
        self.assertEqual(q.take(10), batch[1:])

    def test_restAreQueuedBeforeTheConsumerRuns(self) -> None:
        """
        A consumer woken by C{offer} finds the rest of the events already
        queued, in order.
        """
        q = EventQueue(5)
        seen = []
        d = q.get()
        d.addCallback(lambda first: seen.append([first] + q.take(10)))
        batch = events("a", "b", "c")
        q.offer(batch)
        self.assertEqual(seen, [batch])

    def test_waitingConsumerFreesRoom(self) -> None:
        q = EventQueue(2)
        d = q.get()
        self.assertTrue(q.offer(events("a", "b")))
        self.successResultOf(d)
        self.assertEqual(len(q), 1)
        self.assertEqual(q.free, 1)

    def test_oneConsumer(self) -> None:
        q = EventQueue(2)
        q.get()
        self.assertRaises(QueueUnderflow, q.get)

    def test_cancel(self) -> None:
        q = EventQueue(3)
        d = q.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        # The cancelled get takes nothing: the event is queued for the next.
        self.assertTrue(q.offer(events("a")))
        self.assertEqual(len(q), 1)
        self.assertEqual(self.successResultOf(q.get()), events("a")[0])
        self.assertEqual(len(q), 0)

    def test_cancelFreesTheConsumerSlot(self) -> None:
        q = EventQueue(3)
        cancelled = q.get()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        d = q.get()
        q.offer(events("a"))
        self.assertEqual(self.successResultOf(d), events("a")[0])


class CoalescedWakeupTests(SynchronousTestCase):
    """
    With C{call_soon}, a waiting consumer is woken once per turn with
    everything offered in it, not once per offer.
    """

    def test_one_wakeup_for_many_offers(self):
        scheduled = []
        queue = EventQueue(10, call_soon=scheduled.append)
        got = queue.get()
        self.assertTrue(queue.offer([(1.0, b"a")]))
        self.assertTrue(queue.offer([(2.0, b"b"), (3.0, b"c")]))
        self.assertNoResult(got)
        self.assertEqual(len(scheduled), 1)
        scheduled.pop()()
        self.assertEqual(self.successResultOf(got), (1.0, b"a"))
        self.assertEqual(queue.take(10), [(2.0, b"b"), (3.0, b"c")])

    def test_bound_holds(self):
        """
        Woken early, a consumer that takes only the first event leaves the
        rest queued: what still does not fit is refused.
        """
        queue = EventQueue(2, call_soon=lambda f: None)
        got = queue.get()
        self.assertTrue(queue.offer([(1.0, b"a"), (2.0, b"b")]))
        self.assertTrue(queue.offer([(3.0, b"c")]))
        self.assertEqual(self.successResultOf(got), (1.0, b"a"))
        self.assertFalse(queue.offer([(4.0, b"d")]))
        self.assertEqual(queue.take(10), [(2.0, b"b"), (3.0, b"c")])

    def test_full_offer_wakes_the_consumer_at_once(self):
        """
        An offer that would find the queue full while the consumer's wake
        is still to come wakes it now: the consumer takes what is queued and
        the offer fits.  (One reactor turn can read more requests than the
        queue holds.)
        """
        scheduled = []
        queue = EventQueue(3, call_soon=scheduled.append)
        taken = []

        def consume(first):
            taken.append([first] + queue.take(10))

        queue.get().addCallback(consume)
        self.assertTrue(queue.offer([(1.0, b"a"), (2.0, b"b")]))
        self.assertEqual(taken, [])
        self.assertTrue(queue.offer([(3.0, b"c"), (4.0, b"d")]))
        self.assertEqual(taken, [[(1.0, b"a"), (2.0, b"b")]])
        self.assertEqual(queue.take(10), [(3.0, b"c"), (4.0, b"d")])
        # The scheduled wake, run later, finds nobody waiting: harmless.
        scheduled.pop()()
        self.assertEqual(len(queue), 0)

    def test_no_early_wake_for_more_than_the_bound(self):
        """
        A request bigger than the whole queue is refused without waking the
        consumer: it could never fit.
        """
        scheduled = []
        queue = EventQueue(2, call_soon=scheduled.append)
        got = queue.get()
        self.assertTrue(queue.offer([(1.0, b"a")]))
        self.assertFalse(queue.offer([(2.0, b"b"), (3.0, b"c"), (4.0, b"d")]))
        self.assertNoResult(got)

    def test_room_for_wakes_a_consumer_due(self):
        """
        L{EventQueue.room_for} answers as L{EventQueue.offer} would: it
        wakes a consumer due to be woken before it says no.
        """
        queue = EventQueue(2, call_soon=lambda f: None)
        got = queue.get()
        self.assertTrue(queue.offer([(1.0, b"a"), (2.0, b"b")]))
        self.assertTrue(queue.room_for(1))
        self.assertEqual(self.successResultOf(got), (1.0, b"a"))
        self.assertFalse(queue.room_for(2))
        self.assertTrue(queue.room_for(0))

    def test_closed_queue_wakes_nobody(self):
        queue = EventQueue(2, call_soon=lambda f: None)
        got = queue.get()
        self.assertTrue(queue.offer([(1.0, b"a"), (2.0, b"b")]))
        queue.close()
        self.assertFalse(queue.offer([(3.0, b"c")]))
        self.assertNoResult(got)

    def test_cancelled_consumer_is_not_woken(self):
        scheduled = []
        queue = EventQueue(10, call_soon=scheduled.append)
        got = queue.get()
        queue.offer([(1.0, b"a")])
        got.cancel()
        self.failureResultOf(got)
        scheduled.pop()()
        self.assertEqual(queue.take(10), [(1.0, b"a")])
