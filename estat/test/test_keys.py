# -*- test-case-name: estat.test.test_keys -*-
"""
Tests for L{estat.keys}.
"""

from __future__ import annotations

import datetime
import re

from twisted.trial.unittest import SynchronousTestCase

from estat.keys import KeyMaker, default_instance_id, sanitize

KEY = re.compile(
    r"^raw/dt=(?P<date>\d{4}-\d\d-\d\d)/hour=(?P<hour>\d\d)/"
    r"(?P<instance>[A-Za-z0-9._-]+)-(?P<stamp>\d{8}T\d{6}\d{3}Z)-(?P<unique>[0-9a-f]{16})"
    r"\.jsonl\.gz$"
)


def utc(*args) -> float:
    return datetime.datetime(*args, tzinfo=datetime.timezone.utc).timestamp()


class CountingEntropy:
    """
    A deterministic C{os.urandom}: successive byte values, recording the
    sizes asked for.
    """

    def __init__(self) -> None:
        self.sizes = []
        self.next = 0

    def __call__(self, n: int) -> bytes:
        self.sizes.append(n)
        out = bytes((self.next + i) % 256 for i in range(n))
        self.next += n
        return out


class BatchKeyTests(SynchronousTestCase):
    def test_exactLayout(self) -> None:
        entropy = CountingEntropy()
        maker = KeyMaker("raw", "raw_dlq", "ip-10-0-1-2-ab12", entropy=entropy)
        key = maker.batch_key(utc(2024, 3, 5, 7, 8, 9, 100000), utc(2024, 3, 5, 7, 10, 9, 456000))
        self.assertEqual(
            key,
            "raw/dt=2024-03-05/hour=07/ip-10-0-1-2-ab12-20240305T071009456Z-0001020304050607.jsonl.gz",
        )
        self.assertEqual(entropy.sizes, [8])

    def test_partitionIsFirstEventTime(self) -> None:
        """
        A batch whose first event came at 23:59:59.9 and that was sealed
        after midnight is in the partition of the day and hour it started;
        only the name carries the seal time.
        """
        maker = KeyMaker("raw", "raw_dlq", "host", entropy=lambda n: b"\xff" * n)
        key = maker.batch_key(utc(2023, 12, 31, 23, 59, 59, 900000),
                              utc(2024, 1, 1, 0, 0, 1, 5000))
        self.assertEqual(
            key,
            "raw/dt=2023-12-31/hour=23/host-20240101T000001005Z-ffffffffffffffff.jsonl.gz",
        )

    def test_partitionIsUTC(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h", entropy=lambda n: bytes(n))
        key = maker.batch_key(utc(2024, 6, 30, 15, 0, 0), utc(2024, 6, 30, 15, 0, 0))
        match = KEY.match(key)
        self.assertIsNotNone(match)
        self.assertEqual((match["date"], match["hour"]), ("2024-06-30", "15"))
        self.assertEqual(match["stamp"], "20240630T150000000Z")

    def test_hourIsTwoDigits(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h", entropy=lambda n: bytes(n))
        key = maker.batch_key(utc(2024, 1, 2, 3, 4, 5), utc(2024, 1, 2, 3, 4, 5))
        self.assertIn("/dt=2024-01-02/hour=03/", key)

    def test_otherPrefix(self) -> None:
        maker = KeyMaker("events/raw", "events/dlq", "h", entropy=lambda n: bytes(n))
        key = maker.batch_key(utc(2024, 1, 2, 3), utc(2024, 1, 2, 3))
        self.assertTrue(key.startswith("events/raw/dt=2024-01-02/hour=03/h-"), key)

    def test_realEntropyMakesUniqueKeys(self) -> None:
        """
        With the default entropy, keys made at the same instant by the same
        process differ, and each has 16 hex digits of its own.
        """
        maker = KeyMaker("raw", "raw_dlq", "host-1")
        first = sealed = utc(2024, 1, 1, 12)
        keys = [maker.batch_key(first, sealed) for _ in range(5000)]
        self.assertEqual(len(set(keys)), len(keys))
        uniques = set()
        for key in keys:
            match = KEY.match(key)
            self.assertIsNotNone(match, key)
            self.assertEqual(match["instance"], "host-1")
            uniques.add(match["unique"])
        self.assertEqual(len(uniques), len(keys))

    def test_deterministicWithInjectedEntropy(self) -> None:
        a = KeyMaker("raw", "raw_dlq", "h", entropy=CountingEntropy())
        b = KeyMaker("raw", "raw_dlq", "h", entropy=CountingEntropy())
        times = [(utc(2024, 1, 1, 0, 0, s), utc(2024, 1, 1, 0, 2, s)) for s in range(5)]
        self.assertEqual([a.batch_key(*t) for t in times], [b.batch_key(*t) for t in times])

    def test_successiveKeysDifferWithInjectedEntropy(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h", entropy=CountingEntropy())
        t = utc(2024, 1, 1)
        self.assertNotEqual(maker.batch_key(t, t), maker.batch_key(t, t))


class PoisonKeyTests(SynchronousTestCase):
    def test_swapsPrefix(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h", entropy=lambda n: bytes(n))
        key = maker.batch_key(utc(2024, 1, 2, 3), utc(2024, 1, 2, 3))
        self.assertEqual(
            maker.poison_key(key),
            "raw_dlq/dt=2024-01-02/hour=03/h-20240102T030000000Z-0000000000000000.jsonl.gz",
        )

    def test_nestedPrefixes(self) -> None:
        maker = KeyMaker("a/raw", "a/dlq", "h")
        self.assertEqual(maker.poison_key("a/raw/dt=2024-01-02/hour=03/x.jsonl.gz"),
                         "a/dlq/dt=2024-01-02/hour=03/x.jsonl.gz")

    def test_prefixMustBeAWholeSegment(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h")
        self.assertEqual(maker.poison_key("rawdata/x.jsonl.gz"), "raw_dlq/rawdata/x.jsonl.gz")

    def test_poisonKeyDiffersFromBatchKey(self) -> None:
        maker = KeyMaker("raw", "raw_dlq", "h")
        key = maker.batch_key(utc(2024, 1, 2), utc(2024, 1, 2))
        poison = maker.poison_key(key)
        self.assertNotEqual(poison, key)
        self.assertTrue(poison.startswith("raw_dlq/"))
        self.assertEqual(poison.split("/", 1)[1], key.split("/", 1)[1])


class SanitizeTests(SynchronousTestCase):
    def test_safeNamesUnchanged(self) -> None:
        for name in ["ip-10-0-1-2.ap-northeast-2.compute.internal", "host_1", "A.b-C"]:
            self.assertEqual(sanitize(name), name)

    def test_unsafeRunsBecomeOneDash(self) -> None:
        self.assertEqual(sanitize("my host/name"), "my-host-name")
        self.assertEqual(sanitize("a  //  b"), "a-b")
        self.assertEqual(sanitize("\ud638\uc2a4\ud2b8-1"), "1")

    def test_edgesStripped(self) -> None:
        self.assertEqual(sanitize("/host/"), "host")
        self.assertEqual(sanitize("..host.."), "host")

    def test_nothingLeft(self) -> None:
        for name in ["", "///", "...", "\ud638\uc2a4\ud2b8"]:
            self.assertEqual(sanitize(name), "estat")

    def test_lengthCapped(self) -> None:
        self.assertEqual(sanitize("x" * 200), "x" * 64)

    def test_resultIsSafe(self) -> None:
        for name in ["a/b\\c:d*e?f\"g<h>i|j k\x00l\nm", "../../etc/passwd"]:
            self.assertRegex(sanitize(name), r"^[A-Za-z0-9._-]+$")
            self.assertNotIn("/", sanitize(name))


class DefaultInstanceIdTests(SynchronousTestCase):
    def test_hostnameFromEnvironment(self) -> None:
        def hostname() -> str:
            raise AssertionError("hostname() must not be called when HOSTNAME is set")

        entropy = CountingEntropy()
        instance = default_instance_id({"HOSTNAME": "task-1"}, hostname=hostname,
                                       entropy=entropy)
        self.assertEqual(instance, "task-1-0001")
        self.assertEqual(entropy.sizes, [2])

    def test_hostnameFunction(self) -> None:
        instance = default_instance_id({}, hostname=lambda: "box.local",
                                       entropy=lambda n: b"\xab\xcd")
        self.assertEqual(instance, "box.local-abcd")

    def test_emptyHostnameVariableFallsBack(self) -> None:
        instance = default_instance_id({"HOSTNAME": ""}, hostname=lambda: "box",
                                       entropy=lambda n: b"\x00\x01")
        self.assertEqual(instance, "box-0001")

    def test_sanitised(self) -> None:
        instance = default_instance_id({"HOSTNAME": "my host/1"}, entropy=lambda n: b"\x12\x34")
        self.assertEqual(instance, "my-host-1-1234")

    def test_randomBits(self) -> None:
        """
        With real entropy, two processes on the same host get different
        names (20 draws of 16 bits are never all equal in practice).
        """
        names = {default_instance_id({"HOSTNAME": "same"}) for _ in range(20)}
        self.assertGreater(len(names), 1)
        for name in names:
            self.assertRegex(name, r"^same-[0-9a-f]{4}$")
