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
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib

import duckdb
import orjson
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from estat.encoder import (
    LEVELS,
    Batch,
    EncodedObject,
    content_md5,
    encode_batch,
    encode_object,
    gzip_bytes,
)
from estat.event import UnencodedEvent, format_received_at, make_line
from estat.store.local import LocalDirectoryStore

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


TITLES = ["가격 안내", "시작하기 — 빠른 설치", "ドキュメント: はじめに", "Préférences du compte",
          "Größentabelle", "Поиск", "Café ☕", "Pricing"]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15",
          "okhttp/4.12.0"]


def realistic_lines(count: int, seed: int = 5) -> list:
    """
    Lines like the benchmark's (bench/compression.py): varied events with
    non-ASCII text and nested objects, through make_line with server fields.
    """
    rnd = random.Random(seed)
    lines = []
    for n in range(count):
        event = {
            "event": rnd.choice(["page_view", "click", "search", "purchase"]),
            "id": f"{rnd.randint(1, 10**9)}-{n}",
            "user_id": f"u-{rnd.randint(1, 10**6)}",
            "session_id": f"s-{rnd.getrandbits(31):08x}",
            "path": rnd.choice(["/", "/pricing", "/ko/블로그/출시", "/docs/getting-started"]),
            "referrer": f"https://ref{rnd.randint(1, 50)}.example.com/p/{rnd.randint(1, 10**4)}",
            "screen": {"w": rnd.randint(320, 2320), "h": rnd.randint(480, 1680)},
            "page": {"title": rnd.choice(TITLES), "section": {"depth": rnd.randint(0, 4)}},
            "value": round(rnd.uniform(0, 10000), 2),
            "tags": [f"t{rnd.randint(1, 100)}" for _ in range(rnd.randint(1, 4))],
            "client_ts": 1764000000000 + n,
        }
        server = {"received_at": format_received_at(1764000000.0 + n * 0.001),
                  "ip": f"203.0.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}",
                  "user_agent": rnd.choice(AGENTS)}
        lines.append(make_line(event, server, orjson.dumps(event)))
    return lines


def members(body: bytes) -> int:
    """
    How many gzip members C{body} holds (each checked: CRC, length).
    """
    count = 0
    while body:
        d = zlib.decompressobj(31)
        d.decompress(body)
        if not d.eof:
            raise ValueError("truncated gzip member")
        body = d.unused_data
        count += 1
    return count


class LevelTests(SynchronousTestCase):
    """
    C{GZIP_LEVEL} keeps its meaning with libdeflate: 1-9, each level no
    larger than zlib's at the same level.
    """

    def setUp(self) -> None:
        self.data = b"\n".join(realistic_lines(500)) + b"\n"

    def test_levelsCoverTheSetting(self) -> None:
        # config.py accepts GZIP_LEVEL 1-9: every one of them has a level.
        self.assertEqual(sorted(LEVELS), list(range(1, 10)))
        self.assertEqual(list(LEVELS.values()), sorted(LEVELS.values()))
        for level in LEVELS.values():
            self.assertIn(level, range(1, 13))

    def test_everyLevelValid(self) -> None:
        for level in LEVELS:
            body = gzip_bytes(self.data, level)
            self.assertEqual(gunzip(body), self.data, level)
            self.assertEqual(members(body), 1)
            self.assertEqual(gzip.decompress(body), self.data)

    def test_noLargerThanZlib(self) -> None:
        """
        At each level the output is at most zlib's at that level, so a
        setting tuned for zlib never gives bigger objects.
        """
        for level in LEVELS:
            ours = len(gzip_bytes(self.data, level))
            theirs = len(zlib.compress(self.data, level, wbits=31))
            self.assertLessEqual(ours, theirs, f"level {level}")

    def test_defaultNoLargerThanZlib6(self) -> None:
        """
        The default, 6, is no larger than zlib level 6 on a full batch
        (BATCH_SIZE's default, 5,000 events) and on a small one.
        """
        lines = realistic_lines(5000, seed=9)
        for data in (b"\n".join(lines) + b"\n", b"\n".join(lines[:100]) + b"\n"):
            self.assertLessEqual(len(gzip_bytes(data, 6)),
                                 len(zlib.compress(data, 6, wbits=31)))

    def test_levelsDiffer(self) -> None:
        fast, default, best = (len(gzip_bytes(self.data, n)) for n in (1, 6, 9))
        self.assertGreater(fast, default)
        self.assertGreater(default, best)

    def test_unknownLevel(self) -> None:
        self.assertRaises(KeyError, gzip_bytes, b"x", 0)
        self.assertRaises(KeyError, gzip_bytes, b"x", 10)


class GzipFormatTests(SynchronousTestCase):
    """
    One standard gzip member (RFC 1952), the same bytes for the same input.
    """

    def test_header(self) -> None:
        data = b'{"a":"\xed\x95\x9c"}\n' * 50
        for level in LEVELS:
            body = gzip_bytes(data, level)
            magic, method, flags, mtime = struct.unpack("<HBBI", body[:8])
            self.assertEqual((magic, method), (0x8B1F, 8))
            # No FTEXT, FHCRC, FEXTRA, FNAME or FCOMMENT: nothing but the data.
            self.assertEqual(flags, 0)
            self.assertEqual(mtime, 0)
            crc, size = struct.unpack("<II", body[-8:])
            self.assertEqual(crc, zlib.crc32(data))
            self.assertEqual(size, len(data))

    def test_bytes(self) -> None:
        self.assertIs(type(gzip_bytes(b"abc", 6)), bytes)

    def test_empty(self) -> None:
        body = gzip_bytes(b"", 6)
        self.assertEqual(gunzip(body), b"")
        self.assertEqual(members(body), 1)

    def test_deterministicEveryLevel(self) -> None:
        data = b"\n".join(realistic_lines(300)) + b"\n"
        for level in LEVELS:
            first = gzip_bytes(data, level)
            self.assertEqual(gzip_bytes(bytes(data), level), first, level)
            self.assertEqual(gzip_bytes(data, level), first, level)

    def test_deterministicAcrossProcesses(self) -> None:
        """
        Another process (a replay after a restart) writes the same bytes.
        """
        data = b"\n".join(realistic_lines(300)) + b"\n"
        script = ("import hashlib, sys; from estat.encoder import gzip_bytes; "
                  "data = sys.stdin.buffer.read(); "
                  "print(hashlib.md5(gzip_bytes(data, 6)).hexdigest())")
        out = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
        self.assertEqual(out.stdout.decode().strip(),
                         hashlib.md5(gzip_bytes(data, 6)).hexdigest())

    def test_roundTripProperties(self) -> None:
        rnd = random.Random(3)
        for _ in range(50):
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 3000)))
            data += b"\n".join(realistic_lines(rnd.randint(0, 20), seed=rnd.random()))
            level = rnd.choice(list(LEVELS))
            self.assertEqual(gunzip(gzip_bytes(data, level)), data)


class ReadersTests(SynchronousTestCase):
    """
    A stored object is read by the tools that read the bucket: zcat/gzip
    and DuckDB (Athena reads the same standard gzip JSON Lines).
    """

    def setUp(self) -> None:
        self.lines = realistic_lines(1000)
        [self.obj] = encode_batch(batch(*self.lines))
        root = self.mktemp()
        store = LocalDirectoryStore(root, lambda f, *a: maybeDeferred(f, *a))
        self.successResultOf(store.put(self.obj.key, self.obj.body, self.obj.content_md5))
        self.path = os.path.join(root, *KEY.split("/"))

    def test_gzipDecompresses(self) -> None:
        gz = shutil.which("gzip")
        if gz is None:
            self.skipTest("gzip is not installed")
        out = subprocess.run([gz, "-dc", self.path], capture_output=True, check=True)
        self.assertEqual(out.stdout, b"\n".join(self.lines) + b"\n")
        self.assertEqual(out.stderr, b"")
        subprocess.run([gz, "-t", self.path], check=True)

    def test_zcat(self) -> None:
        zcat = shutil.which("zcat")
        if zcat is None:
            self.skipTest("zcat is not installed")
        out = subprocess.run([zcat, self.path], capture_output=True, check=True)
        self.assertEqual(out.stdout.splitlines(), self.lines)

    def test_duckdb(self) -> None:
        con = duckdb.connect(config={"autoinstall_known_extensions": False})
        try:
            rows = con.execute(
                "SELECT id, page.title, page.section.depth, screen.w, tags, "
                "_estat.ip, _estat.user_agent "
                "FROM read_json(?, format = 'newline_delimited') ORDER BY client_ts",
                [self.path]).fetchall()
            [(received_at,)] = con.execute(
                "SELECT min(CAST(_estat.received_at AS VARCHAR)) "
                "FROM read_json(?, format = 'newline_delimited')", [self.path]).fetchall()
        finally:
            con.close()
        expected = []
        for line in self.lines:
            e = json.loads(line)
            expected.append((e["id"], e["page"]["title"], e["page"]["section"]["depth"],
                             e["screen"]["w"], e["tags"], e["_estat"]["ip"],
                             e["_estat"]["user_agent"]))
        self.assertEqual(len(rows), 1000)
        self.assertEqual([tuple(r) for r in rows], expected)
        self.assertTrue(received_at.startswith("2025-11-24"), received_at)
