# -*- test-case-name: estat.test.test_encoder -*-
"""
Tests for L{estat.encoder}.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
import zlib

from twisted.trial.unittest import SynchronousTestCase

from estat.encoder import (
    Batch,
    EncodedObject,
    content_md5,
    encode_batch,
    encode_object,
    gzip_bytes,
)
from estat.event import UnencodedEvent

KEY = "raw/dt=2024-01-02/hour=03/h-20240102T030405006Z-0011223344556677.jsonl.gz"
POISON_KEY = "raw_dlq/dt=2024-01-02/hour=03/h-20240102T030405006Z-0011223344556677.jsonl.gz"


def batch(*payloads) -> Batch:
    return Batch(
        key=KEY,
        poison_key=POISON_KEY,
        events=[(1704164645.0 + i, p) for i, p in enumerate(payloads)],
        first_event_at=1704164645.0,
        sealed_at=1704164645.006,
    )


def gunzip(body: bytes) -> bytes:
    """
    Decompress with the gzip module (which checks the header, CRC and
    length), refusing trailing garbage.
    """
    with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
        data = f.read()
    d = zlib.decompressobj(31)
    again = d.decompress(body) + d.flush()
    if again != data or d.unused_data:
        raise ValueError("not exactly one gzip member")
    return data


def poison_event(value, raw: bytes, server=None) -> UnencodedEvent:
    obj = {"v": value, "_estat": server if server is not None else {"ip": "1.2.3.4"}}
    return UnencodedEvent(obj=obj, raw=raw)


class EncodeBatchTests(SynchronousTestCase):
    def test_linesRoundTrip(self) -> None:
        lines = [b'{"a":1}', b'{"b":"\xed\x95\x9c"}', b"{}"]
        [obj] = encode_batch(batch(*lines))
        self.assertIsInstance(obj, EncodedObject)
        self.assertEqual(gunzip(obj.body), b'{"a":1}\n{"b":"\xed\x95\x9c"}\n{}\n')
        self.assertEqual(obj.key, KEY)
        self.assertEqual(obj.count, 3)
        self.assertFalse(obj.poison)

    def test_singleLine(self) -> None:
        [obj] = encode_batch(batch(b'{"a":1}'))
        self.assertEqual(gunzip(obj.body), b'{"a":1}\n')
        self.assertEqual(obj.count, 1)

    def test_manyLines(self) -> None:
        lines = [b'{"i":%d}' % i for i in range(5000)]
        [obj] = encode_batch(batch(*lines))
        self.assertEqual(gunzip(obj.body).split(b"\n"), lines + [b""])
        self.assertEqual(obj.count, 5000)
        self.assertLess(len(obj.body), sum(map(len, lines)))

    def test_validGzip(self) -> None:
        [obj] = encode_batch(batch(b'{"a":1}'))
        self.assertEqual(obj.body[:3], b"\x1f\x8b\x08")
        # MTIME is zero, so equal batches give equal bytes.
        self.assertEqual(struct.unpack("<I", obj.body[4:8])[0], 0)
        self.assertEqual(gzip.decompress(obj.body), b'{"a":1}\n')

    def test_contentMD5(self) -> None:
        [obj] = encode_batch(batch(b'{"a":1}', b'{"a":2}'))
        self.assertEqual(obj.content_md5,
                         base64.b64encode(hashlib.md5(obj.body).digest()).decode("ascii"))
        self.assertEqual(len(base64.b64decode(obj.content_md5)), 16)

    def test_deterministic(self) -> None:
        lines = [b'{"a":%d}' % i for i in range(100)]
        first = encode_batch(batch(*lines))
        second = encode_batch(batch(*lines))
        self.assertEqual(first, second)
        self.assertEqual(first[0].body, second[0].body)

    def test_level(self) -> None:
        lines = [b'{"a":%d,"pad":"%s"}' % (i, b"x" * (i % 50)) for i in range(500)]
        fast = encode_batch(batch(*lines), level=1)[0]
        best = encode_batch(batch(*lines), level=9)[0]
        self.assertEqual(gunzip(fast.body), gunzip(best.body))
        self.assertNotEqual(fast.body, best.body)
        self.assertNotEqual(fast.content_md5, best.content_md5)

    def test_emptyBatch(self) -> None:
        self.assertEqual(encode_batch(batch()), [])

    def test_bigIntegerEncodedExactly(self) -> None:
        big = 123456789012345678901234567890
        event = UnencodedEvent(obj={"n": big, "s": "\ud55c", "_estat": {"ip": "1.2.3.4"}},
                               raw=b'{"n":123456789012345678901234567890,"s":"\xed\x95\x9c"}')
        [obj] = encode_batch(batch(b'{"a":1}', event, b'{"a":3}'))
        lines = gunzip(obj.body).split(b"\n")
        self.assertEqual(lines[-1], b"")
        self.assertEqual(lines[0], b'{"a":1}')
        self.assertEqual(lines[2], b'{"a":3}')
        self.assertIn(b"123456789012345678901234567890", lines[1])
        self.assertEqual(json.loads(lines[1]),
                         {"n": big, "s": "\ud55c", "_estat": {"ip": "1.2.3.4"}})
        self.assertEqual(obj.count, 3)
        self.assertFalse(obj.poison)


class PoisonTests(SynchronousTestCase):
    """
    An event that cannot be encoded never fails its batch.
    """

    def assertPoisonRecord(self, line: bytes, raw: bytes, error_type: str, server) -> dict:
        self.assertEqual(line.decode("ascii").encode("ascii"), line)
        record = json.loads(line)
        self.assertEqual(record["raw"], raw.decode("utf-8", "backslashreplace"))
        self.assertTrue(record["error"].startswith(error_type + ":"), record["error"])
        self.assertLessEqual(len(record["error"]), 500)
        self.assertEqual(record["_estat"], server)
        return record

    def test_loneSurrogate(self) -> None:
        raw = b'{"v":"\\ud800","n":123456789012345678901234}'
        bad = poison_event("\ud800", raw)
        objects = encode_batch(batch(b'{"a":1}', bad, b'{"a":3}'))
        self.assertEqual(len(objects), 2)
        main, poison = objects
        self.assertEqual((main.key, main.count, main.poison), (KEY, 2, False))
        self.assertEqual(gunzip(main.body), b'{"a":1}\n{"a":3}\n')
        self.assertEqual((poison.key, poison.count, poison.poison), (POISON_KEY, 1, True))
        self.assertEqual(poison.content_md5,
                         base64.b64encode(hashlib.md5(poison.body).digest()).decode())
        [line, end] = gunzip(poison.body).split(b"\n")
        self.assertEqual(end, b"")
        self.assertPoisonRecord(line, raw, "UnicodeEncodeError", {"ip": "1.2.3.4"})

    def test_unserialisableObject(self) -> None:
        bad = poison_event(object(), b'{"v":"?"}')
        main, poison = encode_batch(batch(bad, b'{"a":2}'))
        self.assertEqual(gunzip(main.body), b'{"a":2}\n')
        [line] = gunzip(poison.body).splitlines()
        self.assertPoisonRecord(line, b'{"v":"?"}', "TypeError", {"ip": "1.2.3.4"})

    def test_nonFiniteFloat(self) -> None:
        bad = poison_event(float("inf"), b'{"v":1e999}')
        main, poison = encode_batch(batch(b'{"a":1}', bad))
        self.assertEqual(gunzip(main.body), b'{"a":1}\n')
        [line] = gunzip(poison.body).splitlines()
        self.assertPoisonRecord(line, b'{"v":1e999}', "ValueError", {"ip": "1.2.3.4"})

    def test_tooDeepToWrite(self) -> None:
        """
        Even a recursion error while writing one event is only that event's
        problem.
        """
        deep = 1
        for _ in range(100000):
            deep = {"a": deep}
        bad = UnencodedEvent(obj={"v": deep, "_estat": {}}, raw=b"{...}")
        main, poison = encode_batch(batch(b'{"a":1}', bad))
        self.assertEqual(gunzip(main.body), b'{"a":1}\n')
        self.assertEqual(poison.count, 1)

    def test_rawKeptWhenNotUTF8(self) -> None:
        raw = b'{"v":"\xff\xfe"}'
        bad = poison_event(object(), raw)
        [poison] = encode_batch(batch(bad))
        [line] = gunzip(poison.body).splitlines()
        record = self.assertPoisonRecord(line, raw, "TypeError", {"ip": "1.2.3.4"})
        self.assertEqual(record["raw"], '{"v":"\\xff\\xfe"}')

    def test_noRawOriginal(self) -> None:
        """
        An event that came without its own raw body (one of a batch request)
        is set aside with its object written as text.
        """
        bad = UnencodedEvent(obj={"v": "\ud800", "_estat": {"ip": "1.2.3.4"}}, raw=None)
        [poison] = encode_batch(batch(bad))
        [line] = gunzip(poison.body).splitlines()
        record = json.loads(line)
        self.assertEqual(record["raw"], repr(bad.obj))
        self.assertEqual(record["_estat"], {"ip": "1.2.3.4"})
        self.assertTrue(record["error"].startswith("UnicodeEncodeError:"))

    def test_onlyPoison(self) -> None:
        raws = [b'{"v":"\\ud800"}', b'{"v":"\\udfff"}']
        events = [poison_event("\ud800", raws[0], {"n": 1}),
                  poison_event("\udfff", raws[1], {"n": 2})]
        [poison] = encode_batch(batch(*events))
        self.assertTrue(poison.poison)
        self.assertEqual(poison.key, POISON_KEY)
        self.assertEqual(poison.count, 2)
        lines = gunzip(poison.body).splitlines()
        self.assertEqual(len(lines), 2)
        self.assertPoisonRecord(lines[0], raws[0], "UnicodeEncodeError", {"n": 1})
        self.assertPoisonRecord(lines[1], raws[1], "UnicodeEncodeError", {"n": 2})

    def test_serverFieldsThatCannotBeWritten(self) -> None:
        """
        The poison record itself never fails, whatever the server fields hold.
        """
        bad = UnencodedEvent(obj={"v": object(), "_estat": {"x": object()}}, raw=b"r")
        [poison] = encode_batch(batch(bad))
        [line] = gunzip(poison.body).splitlines()
        record = json.loads(line)
        self.assertEqual(record["raw"], "r")
        self.assertIn("object", record["_estat"]["x"])

    def test_objectNotADict(self) -> None:
        bad = UnencodedEvent(obj=[object()], raw=b"[?]")
        [poison] = encode_batch(batch(bad))
        [line] = gunzip(poison.body).splitlines()
        self.assertIsNone(json.loads(line)["_estat"])

    def test_longErrorTruncated(self) -> None:
        class Loud(dict):
            def items(self):
                raise ValueError("x" * 5000)

        bad = poison_event(Loud(a=1), b"r")
        [poison] = encode_batch(batch(bad))
        [line] = gunzip(poison.body).splitlines()
        self.assertEqual(len(json.loads(line)["error"]), 500)


class HelperTests(SynchronousTestCase):
    def test_gzipBytes(self) -> None:
        data = b"hello\n" * 100
        body = gzip_bytes(data, 6)
        self.assertEqual(gunzip(body), data)
        self.assertEqual(gzip_bytes(data, 6), body)
        self.assertEqual(gunzip(gzip_bytes(b"", 6)), b"")

    def test_contentMD5KnownValue(self) -> None:
        # RFC 1864 form of MD5("") = d41d8cd98f00b204e9800998ecf8427e.
        self.assertEqual(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==")

    def test_encodeObject(self) -> None:
        obj = encode_object("k", [b"a", b"b"], 6, poison=True)
        self.assertEqual(gunzip(obj.body), b"a\nb\n")
        self.assertEqual((obj.key, obj.count, obj.poison), ("k", 2, True))
        self.assertEqual(obj.content_md5, content_md5(obj.body))
        self.assertFalse(encode_object("k", [b"a"], 6).poison)

    def test_batchCount(self) -> None:
        self.assertEqual(batch(b"1", b"2", b"3").count, 3)
        self.assertEqual(batch().count, 0)
