# -*- test-case-name: estat.test.test_event -*-
"""
Tests for L{estat.event}.
"""

from __future__ import annotations

import datetime
import ipaddress
import json

from twisted.trial.unittest import SynchronousTestCase

from estat.event import (
    SERVER_FIELD,
    ClientAddressResolver,
    EventRejected,
    UnencodedEvent,
    _ReceivedAtFormatter,
    anonymize_ip,
    check_event,
    format_received_at,
    make_line,
    parse_event,
    parse_json,
)


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    """
    A JSON object nested C{depth} levels deep.
    """
    return b'{"a":' * depth + leaf + b"}" * depth


def utc(*args) -> float:
    return datetime.datetime(*args, tzinfo=datetime.timezone.utc).timestamp()


class ParseEventTests(SynchronousTestCase):
    """
    L{parse_event} accepts one JSON object and nothing else.
    """

    def assertRejected(self, body: bytes, reason: str) -> EventRejected:
        with self.assertRaises(EventRejected, msg=repr(body[:60])) as cm:
            parse_event(body)
        self.assertEqual(cm.exception.reason, reason, repr(body[:60]))
        self.assertTrue(cm.exception.message)
        return cm.exception

    def test_object(self) -> None:
        self.assertEqual(
            parse_event(b'{"type":"click","n":1,"x":[1,2.5,null,true],"s":"\xed\x95\x9c"}'),
            {"type": "click", "n": 1, "x": [1, 2.5, None, True], "s": "\ud55c"},
        )

    def test_emptyObject(self) -> None:
        self.assertEqual(parse_event(b"{}"), {})

    def test_surroundingWhitespace(self) -> None:
        self.assertEqual(parse_event(b' \n{"a":1}\r\n '), {"a": 1})

    def test_invalidJSON(self) -> None:
        for body in [b"", b"{", b'{"a":}', b"{'a':1}", b'{"a":1,}', b'{"a":1}{"b":2}',
                     b"not json", b'{"a":01}']:
            self.assertRejected(body, "invalid_json")

    def test_notAnObject(self) -> None:
        for body in [b"[]", b'[{"a":1}]', b"1", b"-2.5", b'"text"', b"null", b"true", b"false"]:
            self.assertRejected(body, "not_an_object")

    def test_nanAndInfinity(self) -> None:
        for body in [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}']:
            self.assertRejected(body, "invalid_json")

    def test_nanAndInfinityOnTheExactPath(self) -> None:
        """
        A body with a long run of digits goes to the standard library parser,
        which must refuse NaN and Infinity just the same.
        """
        for const in [b"NaN", b"Infinity", b"-Infinity"]:
            self.assertRejected(b'{"id":123456789012345678901234,"a":' + const + b"}",
                                "invalid_json")

    def test_outOfRangeNumberOnBothPaths(self) -> None:
        """
        A number too large for a double is refused whichever parser reads
        the body; it is never stored as C{null} or C{Infinity}.
        """
        self.assertRejected(b'{"n":1e400}', "invalid_json")
        self.assertRejected(b'{"n":1e400,"s":"12345678901234567890"}', "invalid_json")

    def test_invalidUTF8(self) -> None:
        self.assertRejected(b'{"a":"\xff"}', "invalid_json")
        self.assertRejected(b'{"a":"\xc3"}', "invalid_json")
        self.assertRejected(b'{"\xed\xa0\x80":1}', "invalid_json")

    def test_invalidUTF8OnTheExactPath(self) -> None:
        self.assertRejected(b'{"a":"\xff","id":123456789012345678901234}', "invalid_json")

    def test_deepestAccepted(self) -> None:
        obj = parse_event(nested(1024))
        depth = 0
        while isinstance(obj, dict):
            obj = obj["a"]
            depth += 1
        self.assertEqual(depth, 1024)

    def test_tooDeep(self) -> None:
        self.assertRejected(nested(1025), "too_deep")
        self.assertRejected(b"[" * 5000 + b"]" * 5000, "too_deep")

    def test_tooDeepOnTheExactPath(self) -> None:
        self.assertRejected(nested(1025, b"123456789012345678901234"), "too_deep")
        self.assertRejected(nested(100000, b"123456789012345678901234"), "too_deep")

    def test_reservedField(self) -> None:
        exc = self.assertRejected(b'{"a":1,"_estat":{"ip":"1.2.3.4"}}', "reserved_field")
        self.assertIn(SERVER_FIELD, exc.message)
        self.assertRejected(b'{"_estat":null}', "reserved_field")
        self.assertRejected(b'{"_estat":1,"id":123456789012345678901234}', "reserved_field")

    def test_reservedFieldOnlyAtTopLevel(self) -> None:
        self.assertEqual(parse_event(b'{"x":{"_estat":1}}'), {"x": {"_estat": 1}})

    def test_bigIntegersKeptExactly(self) -> None:
        big = 2 ** 64
        body = b'{"n":%d,"m":-%d,"f":1.5}' % (big, 123456789012345678901234567890)
        obj = parse_event(body)
        self.assertEqual(obj, {"n": big, "m": -123456789012345678901234567890, "f": 1.5})
        self.assertIs(type(obj["n"]), int)
        self.assertIs(type(obj["m"]), int)

    def test_sixtyFourBitBoundaries(self) -> None:
        """
        Every integer just outside the signed and unsigned 64-bit ranges is
        kept as the exact integer, not rounded to a float.
        """
        for n in [2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64,
                  -(2 ** 63), -(2 ** 63) - 1, -(2 ** 64) - 1]:
            obj = parse_event(b'{"n":%d}' % (n,))
            self.assertEqual(obj["n"], n, n)
            self.assertIs(type(obj["n"]), int, n)

    def test_eventRejectedIsValueError(self) -> None:
        exc = EventRejected("r", "m")
        self.assertIsInstance(exc, ValueError)
        self.assertEqual((exc.reason, exc.message, str(exc)), ("r", "m", "m"))


class ParseJSONTests(SynchronousTestCase):
    """
    L{parse_json} parses any JSON document with the same strictness, and
    L{check_event} decides whether a parsed value is an event.
    """

    def test_anyDocument(self) -> None:
        self.assertEqual(parse_json(b'[{"a":1},{"b":2}]'), [{"a": 1}, {"b": 2}])
        self.assertEqual(parse_json(b"3"), 3)
        self.assertEqual(parse_json(b"[%d]" % (2 ** 70,)), [2 ** 70])

    def test_invalid(self) -> None:
        for body in [b"[", b"[NaN]", b"[1e400]", b'["\xff"]']:
            with self.assertRaises(EventRejected, msg=repr(body)) as cm:
                parse_json(body)
            self.assertEqual(cm.exception.reason, "invalid_json")

    def test_checkEvent(self) -> None:
        event = {"a": 1}
        self.assertIs(check_event(event), event)
        for value, reason in [([], "not_an_object"), ("s", "not_an_object"),
                              (None, "not_an_object"), ({"_estat": 1}, "reserved_field")]:
            with self.assertRaises(EventRejected) as cm:
                check_event(value)
            self.assertEqual(cm.exception.reason, reason)


class MakeLineTests(SynchronousTestCase):
    """
    L{make_line} adds the server fields and serialises the event once.
    """

    def test_addsServerFields(self) -> None:
        raw = b'{"type":"click","n":1}'
        line = make_line(parse_event(raw), {"received_at": "2024-01-01T00:00:00.000Z",
                                            "ip": "1.2.3.4"}, raw)
        self.assertIsInstance(line, bytes)
        self.assertNotIn(b"\n", line)
        self.assertEqual(
            json.loads(line),
            {"type": "click", "n": 1,
             "_estat": {"received_at": "2024-01-01T00:00:00.000Z", "ip": "1.2.3.4"}},
        )

    def test_keepsUnicode(self) -> None:
        raw = '{"s":"\ud55c\uae00 \U0001f600"}'.encode("utf-8")
        line = make_line(parse_event(raw), {}, raw)
        self.assertEqual(json.loads(line.decode("utf-8"))["s"], "\ud55c\uae00 \U0001f600")

    def test_bigIntegerIsUnencoded(self) -> None:
        raw = b'{"n":123456789012345678901234567890}'
        obj = parse_event(raw)
        result = make_line(obj, {"ip": "1.2.3.4"}, raw)
        self.assertIsInstance(result, UnencodedEvent)
        self.assertEqual(result.raw, raw)
        self.assertEqual(result.obj, {"n": 123456789012345678901234567890,
                                      "_estat": {"ip": "1.2.3.4"}})

    def test_unserialisableIsUnencoded(self) -> None:
        result = make_line({"x": object()}, {}, b"raw")
        self.assertIsInstance(result, UnencodedEvent)
        self.assertEqual(result.raw, b"raw")

    def test_deepButAcceptedEventIsUnencoded(self) -> None:
        """
        orjson writes fewer levels than it reads: an accepted event it
        cannot write is handed on, not lost or raised.
        """
        raw = nested(600)
        result = make_line(parse_event(raw), {}, raw)
        self.assertIsInstance(result, UnencodedEvent)


class FormatReceivedAtTests(SynchronousTestCase):
    """
    L{format_received_at} writes ISO 8601 UTC with milliseconds.
    """

    def test_format(self) -> None:
        when = utc(2024, 3, 5, 7, 8, 9, 456000)
        text = format_received_at(when)
        self.assertEqual(text, "2024-03-05T07:08:09.456Z")
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_wholeSecond(self) -> None:
        self.assertEqual(format_received_at(0.0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(format_received_at(utc(2024, 12, 31, 23, 59, 59)),
                         "2024-12-31T23:59:59.000Z")

    def test_lastMillisecond(self) -> None:
        self.assertEqual(format_received_at(utc(2024, 12, 31, 23, 59, 59, 999000)),
                         "2024-12-31T23:59:59.999Z")

    def test_millisecondsAgreeWithDatetime(self) -> None:
        """
        The milliseconds are those of the time, not one less because of how
        a float stores it: 1700000000.123 is .123, and 1.001 is .001.
        """
        formatter = _ReceivedAtFormatter()
        for when in [1.001, 1700000000.123, 1700000000.001, 1700000000.007,
                     1712345678.456, 1712345678.999]:
            expected = datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc)
            expected_text = expected.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            self.assertEqual(formatter(when), expected_text, repr(when))

    def test_withinTheSecondAgreesWithDatetime(self) -> None:
        """
        The path for a second already formatted gives what datetime does,
        for times all through the second, the last microseconds included
        (which round up into the next second).
        """
        import random

        rng = random.Random(3)
        formatter = _ReceivedAtFormatter()
        for second in (1.0, 1700000000.0, 1799999999.0, 4102444799.0):
            times = [second + rng.random() for _ in range(3000)]
            times += [second + 1 - 1e-7, second + 0.9999995, second + 0.0005, second + 1e-9]
            for when in times:
                formatter(second + 0.5)  # that second formatted already
                expected = datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc)
                text = expected.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                self.assertEqual(formatter(when), text, repr(when))

    def test_cacheFollowsSeconds(self) -> None:
        formatter = _ReceivedAtFormatter()
        base = utc(2024, 2, 29, 23, 59, 58)
        self.assertEqual(formatter(base + 0.25), "2024-02-29T23:59:58.250Z")
        self.assertEqual(formatter(base + 0.75), "2024-02-29T23:59:58.750Z")
        self.assertEqual(formatter(base + 1.5), "2024-02-29T23:59:59.500Z")
        self.assertEqual(formatter(base + 2.0), "2024-03-01T00:00:00.000Z")
        # Time going backwards (a clock step) does not reuse the later second.
        self.assertEqual(formatter(base + 0.5), "2024-02-29T23:59:58.500Z")
        self.assertEqual(formatter(base + 3600 * 24 * 366), "2025-03-01T23:59:58.000Z")

    def test_moduleFormatter(self) -> None:
        self.assertIsInstance(format_received_at, _ReceivedAtFormatter)
        self.assertEqual(format_received_at(utc(2030, 1, 2, 3, 4, 5, 250000)),
                         "2030-01-02T03:04:05.250Z")
        self.assertEqual(format_received_at(utc(2030, 1, 2, 3, 4, 6, 250000)),
                         "2030-01-02T03:04:06.250Z")


def resolver(*networks: str) -> ClientAddressResolver:
    return ClientAddressResolver(tuple(ipaddress.ip_network(n) for n in networks))


class ClientAddressResolverTests(SynchronousTestCase):
    """
    L{ClientAddressResolver} believes X-Forwarded-For only from trusted
    proxies, and never lets a client choose its own address.
    """

    def test_noTrustedProxies(self) -> None:
        r = ClientAddressResolver()
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4"]), "10.0.0.1")
        self.assertEqual(r.resolve("10.0.0.1", None), "10.0.0.1")

    def test_untrustedPeerIgnoresHeader(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("203.0.113.9", ["1.2.3.4"]), "203.0.113.9")
        self.assertEqual(r.resolve("203.0.113.9", ["10.0.0.2"]), "203.0.113.9")

    def test_trustedPeerWithoutHeader(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", None), "10.0.0.1")
        self.assertEqual(r.resolve("10.0.0.1", []), "10.0.0.1")
        self.assertEqual(r.resolve("10.0.0.1", [""]), "10.0.0.1")
        self.assertEqual(r.resolve("10.0.0.1", [" , ,"]), "10.0.0.1")

    def test_trustedPeerUsesRightMostUntrustedHop(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4"]), "1.2.3.4")
        # The client wrote "6.6.6.6" itself; the proxy appended the real peer.
        self.assertEqual(r.resolve("10.0.0.1", ["6.6.6.6, 1.2.3.4"]), "1.2.3.4")

    def test_multipleTrustedHops(self) -> None:
        r = resolver("10.0.0.0/8", "172.16.0.0/12")
        self.assertEqual(
            r.resolve("10.0.0.1", ["6.6.6.6, 1.2.3.4, 172.16.5.5, 10.9.9.9"]), "1.2.3.4")

    def test_allHopsTrusted(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", ["10.0.0.3, 10.0.0.2"]), "10.0.0.3")

    def test_emptyEntriesSkipped(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4,, ,10.0.0.2,"]), "1.2.3.4")

    def test_malformedEntryStopsTheWalk(self) -> None:
        r = resolver("10.0.0.0/8")
        # Right-most entry malformed: the peer is the answer.
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4, garbage"]), "10.0.0.1")
        # Malformed behind a trusted hop: that hop is the answer, never the
        # address the client put in front of the garbage.
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4, garbage, 10.0.0.5"]), "10.0.0.5")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4:5678"]), "10.0.0.1")
        self.assertEqual(r.resolve("10.0.0.1", ["unknown"]), "10.0.0.1")

    def test_multipleHeaderLines(self) -> None:
        """
        Several X-Forwarded-For lines are one list, in order.
        """
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", ["6.6.6.6", "1.2.3.4, 10.0.0.7"]), "1.2.3.4")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4", "5.6.7.8"]), "5.6.7.8")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4", "10.0.0.8"]), "1.2.3.4")

    def test_ipv4MappedPeer(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("::ffff:10.0.0.1", ["1.2.3.4"]), "1.2.3.4")
        self.assertEqual(r.resolve("::ffff:203.0.113.9", ["1.2.3.4"]), "::ffff:203.0.113.9")

    def test_ipv4MappedHop(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.0.0.1", ["1.2.3.4, ::ffff:10.0.0.9"]), "1.2.3.4")

    def test_ipv6(self) -> None:
        r = resolver("fd00::/8")
        self.assertEqual(r.resolve("fd00::1", ["2001:db8::1, fd00::2"]), "2001:db8::1")
        self.assertEqual(r.resolve("2001:db8::9", ["2001:db8::1"]), "2001:db8::9")

    def test_unparseablePeer(self) -> None:
        r = resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("unix-socket", ["1.2.3.4"]), "unix-socket")


class AnonymizeTests(SynchronousTestCase):
    def test_ipv4LastOctet(self) -> None:
        self.assertEqual(anonymize_ip("203.0.113.77"), "203.0.113.0")
        self.assertEqual(anonymize_ip("10.1.2.255"), "10.1.2.0")

    def test_ipv6Keeps48Bits(self) -> None:
        self.assertEqual(anonymize_ip("2001:db8:abcd:1234:5678:9abc:def0:1"), "2001:db8:abcd::")

    def test_ipv4Mapped(self) -> None:
        self.assertEqual(anonymize_ip("::ffff:203.0.113.77"), "203.0.113.0")

    def test_notAnAddress(self) -> None:
        self.assertEqual(anonymize_ip("unix-socket"), "")
        self.assertEqual(anonymize_ip(""), "")

    def test_resolverAnonymizesTheResolvedClient(self) -> None:
        r = ClientAddressResolver(
            (ipaddress.ip_network("10.0.0.0/8"),), anonymize=True)
        self.assertEqual(r.resolve("10.0.0.1", ["6.6.6.6, 1.2.3.4"]), "1.2.3.0")
        self.assertEqual(r.resolve("203.0.113.9", ["1.2.3.4"]), "203.0.113.0")
        self.assertEqual(r.resolve("10.0.0.1", None), "10.0.0.0")

    def test_resolverDoesNotAnonymizeByDefault(self) -> None:
        self.assertEqual(ClientAddressResolver().resolve("203.0.113.9", None), "203.0.113.9")
