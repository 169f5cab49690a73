# -*- test-case-name: estat.test.test_dedup -*-
"""
Tests for L{estat.dedup}: the window of recently admitted message ids.
"""

from __future__ import annotations

import tracemalloc
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.dedup import FRESH, PENDING, SEEN, DedupWindow, id_key


class IdKeyTests(SynchronousTestCase):
    def test_namespaced_and_60_bits(self) -> None:
        self.assertEqual(id_key("segment:web", "m-1"), id_key("segment:web", "m-1"))
        self.assertNotEqual(id_key("segment:web", "m-1"), id_key("segment:app", "m-1"))
        self.assertNotEqual(id_key("collect", "m-1"), id_key("collect", "m-2"))
        for i in range(1000):
            key = id_key("collect", str(i))
            self.assertTrue(0 <= key < 1 << 60)


class DedupWindowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.evicted = []
        self.window = DedupWindow(self.clock, window=80.0, max_ids=80, generations=8,
                                  on_evicted_early=self.evicted.append)

    def test_fresh_then_seen_after_commit(self) -> None:
        self.assertEqual(self.window.check([1, 2]), [FRESH, FRESH])
        self.window.reserve([1, 2])
        self.window.commit([1, 2])
        self.assertEqual(self.window.check([1, 2, 3]), [SEEN, SEEN, FRESH])
        self.assertEqual(len(self.window), 2)

    def test_repeated_in_one_request(self) -> None:
        self.assertEqual(self.window.check([5, 5, 6, 5]), [FRESH, SEEN, FRESH, SEEN])

    def test_pending_until_commit_or_release(self) -> None:
        self.window.reserve([1])
        self.assertEqual(self.window.check([1]), [PENDING])
        self.window.release([1])
        self.assertEqual(self.window.check([1]), [FRESH])
        self.assertEqual(len(self.window), 0)

    def test_remembered_for_the_window_then_forgotten(self) -> None:
        self.window.add([1])
        self.clock.advance(79.9)
        self.assertEqual(self.window.check([1]), [SEEN])
        # Forgotten at most one generation (window / 8) after the window.
        self.clock.advance(10.2)
        self.assertEqual(self.window.check([1]), [FRESH])
        self.assertEqual(len(self.window), 0)
        self.assertEqual(self.evicted, [])

    def test_memory_bound_forgets_the_oldest_early(self) -> None:
        for i in range(200):
            self.window.add([i])
        self.assertLessEqual(len(self.window), 80)
        self.assertEqual(sum(self.evicted), 200 - len(self.window))
        # The newest are remembered, the oldest forgotten.
        self.assertEqual(self.window.check([199, 0]), [SEEN, FRESH])

    def test_disabled(self) -> None:
        window = DedupWindow(self.clock, window=0)
        window.add([1])
        self.assertEqual(window.check([1, 1]), [FRESH, FRESH])
        self.assertEqual(len(window), 0)

    def test_oldest_age(self) -> None:
        self.assertEqual(self.window.oldest_age, 0.0)
        self.window.add([1])
        self.clock.advance(30)
        self.window.add([2])
        self.assertEqual(self.window.oldest_age, 30.0)


class MemoryBudgetTests(SynchronousTestCase):
    """
    The stated budget: at most 10 MB per 100,000 ids held.
    """

    def test_100k_ids_under_10_mb(self) -> None:
        clock = Clock()
        ids = [str(uuid.uuid4()) for _ in range(100_000)]
        keys = [id_key("segment:web", i) for i in ids]
        del ids
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            window = DedupWindow(clock, window=3600.0, max_ids=100_000)
            for start in range(0, len(keys), 100):
                clock.advance(0.01)
                window.add(keys[start:start + 100])
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(len(window), 100_000)
        # The keys themselves were made before tracing began: count them.
        key_bytes = 32 * len(keys)
        total = held + key_bytes
        self.assertLess(total, 10_000_000, f"{total / 1e6:.1f} MB for 100,000 ids")


class FindRetriesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.window = DedupWindow(self.clock, window=60.0, max_ids=100)

    def test_no_window_or_no_ids(self) -> None:
        from estat.dedup import find_retries

        self.assertEqual(find_retries(None, "ns", ["a"]).fresh, [])
        self.assertEqual(find_retries(self.window, "ns", [None, 5, ""]).fresh, [])

    def test_seen_fresh_pending(self) -> None:
        from estat.dedup import find_retries

        first = find_retries(self.window, "ns", ["a", None, "b", "a"])
        self.assertFalse(first.pending)
        self.assertEqual(first.seen, frozenset({3}))
        self.assertEqual(first.fresh, [id_key("ns", "a"), id_key("ns", "b")])
        self.window.reserve(first.fresh)
        self.assertTrue(find_retries(self.window, "ns", ["b"]).pending)
        self.assertFalse(find_retries(self.window, "other", ["b"]).pending)
        self.window.commit(first.fresh)
        again = find_retries(self.window, "ns", ["c", "b"])
        self.assertEqual((again.seen, again.fresh), (frozenset({1}), [id_key("ns", "c")]))
