# -*- test-case-name: estat.test.test_ingest_body -*-
"""
Tests for L{estat.ingest.body}: content decoding with a hard cap, and the
events of one JSON object, a JSON array or an NDJSON body.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

from twisted.trial.unittest import SynchronousTestCase

from estat.ingest.body import Limits, decode_content, decode_events, is_ndjson
from estat.ingest.rejected import Rejected

NDJSON = b"application/x-ndjson"
JSON = b"application/json"


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class DecodeContentTests(SynchronousTestCase):
    payload = b'{"event":"click","n":1}\n' * 20

    def rejected(self, body: bytes, encoding: bytes | None, cap: int = 1 << 20) -> Rejected:
        return self.assertRaises(Rejected, decode_content, body, encoding, cap)

    def test_no_encoding(self):
        """
        Without C{Content-Encoding} the body is returned as it is.
        """
        self.assertIs(decode_content(self.payload, None, 1 << 20), self.payload)
        self.assertIs(decode_content(self.payload, b"", 1 << 20), self.payload)

    def test_identity(self):
        self.assertEqual(decode_content(self.payload, b"identity", 1 << 20), self.payload)
        self.assertEqual(decode_content(self.payload, b" Identity ", 1 << 20), self.payload)

    def test_gzip(self):
        body = gzip.compress(self.payload)
        self.assertEqual(decode_content(body, b"gzip", 1 << 20), self.payload)

    def test_gzip_names(self):
        """
        The encoding name is case-insensitive, and C{x-gzip} is gzip.
        """
        body = gzip.compress(self.payload)
        for name in (b"GZIP", b"x-gzip", b" gzip "):
            self.assertEqual(decode_content(body, name, 1 << 20), self.payload, name)

    def test_deflate_zlib_wrapped(self):
        """
        RFC 9110's C{deflate}: a zlib stream.
        """
        self.assertEqual(decode_content(zlib.compress(self.payload), b"deflate", 1 << 20),
                         self.payload)

    def test_deflate_raw(self):
        """
        Raw deflate, which some clients send as C{deflate}, is accepted too.
        """
        self.assertEqual(decode_content(raw_deflate(self.payload), b"deflate", 1 << 20),
                         self.payload)

    def test_deflate_raw_every_level(self):
        for level in range(0, 10):
            compressor = zlib.compressobj(level, wbits=-zlib.MAX_WBITS)
            body = compressor.compress(self.payload) + compressor.flush()
            self.assertEqual(decode_content(body, b"deflate", 1 << 20), self.payload, level)

    def test_unknown_encoding(self):
        for name in (b"br", b"zstd", b"compress", b"gzip, br"):
            e = self.rejected(self.payload, name)
            self.assertEqual((e.status, e.reason), (415, "unsupported_encoding"), name)
            self.assertIsNone(e.index)

    def test_corrupt_gzip(self):
        e = self.rejected(b"this is not gzip at all", b"gzip")
        self.assertEqual((e.status, e.reason), (400, "bad_encoding"))

    def test_corrupt_deflate(self):
        e = self.rejected(b"\x78\x9c this is not deflate", b"deflate")
        self.assertEqual((e.status, e.reason), (400, "bad_encoding"))

    def test_bad_gzip_checksum(self):
        body = bytearray(gzip.compress(self.payload))
        body[-8] ^= 0xFF  # the CRC32 of the trailer
        e = self.rejected(bytes(body), b"gzip")
        self.assertEqual((e.status, e.reason), (400, "bad_encoding"))

    def test_truncated_gzip(self):
        """
        A gzip stream cut short (here, without its trailer; there, in the
        middle of its data) is refused, not half-accepted.
        """
        body = gzip.compress(self.payload)
        for cut in (body[:-4], body[:-8], body[:len(body) // 2], body[:12]):
            e = self.rejected(cut, b"gzip")
            self.assertEqual((e.status, e.reason), (400, "bad_encoding"), len(cut))

    def test_truncated_deflate(self):
        body = zlib.compress(self.payload)
        e = self.rejected(body[:-4], b"deflate")
        self.assertEqual((e.status, e.reason), (400, "bad_encoding"))

    def test_exactly_cap(self):
        """
        A body that decodes to exactly C{cap} bytes is accepted; one byte
        more is refused.
        """
        data = b"x" * 1000
        self.assertEqual(decode_content(gzip.compress(data), b"gzip", 1000), data)
        e = self.rejected(gzip.compress(data + b"x"), b"gzip", cap=1000)
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))

    def test_cap_applies_to_deflate(self):
        e = self.rejected(zlib.compress(b"\0" * 5000), b"deflate", cap=4096)
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))
        e = self.rejected(raw_deflate(b"\0" * 5000), b"deflate", cap=4096)
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))

    def test_gzip_bomb(self):
        """
        50 MB of zeros gzipped (about 50 KB on the wire) is refused with 413
        C{too_large_decoded}, and decoding it never holds anywhere near the
        decompressed size: the memory allocated while refusing it stays
        within a small multiple of the cap.
        """
        bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), compresslevel=9)
        self.assertLess(len(bomb), 100 * 1024)
        cap = 64 * 1024
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            e = self.assertRaises(Rejected, decode_content, bomb, b"gzip", cap)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))
        # cap + 1 bytes of output, zlib's 32 KiB window and its state, and
        # the exception: far below even 1 MB.  Without a cap it would be
        # 50 MB.
        self.assertLess(peak, 1024 * 1024)

    def test_bomb_with_small_cap(self):
        """
        With a small cap, decoding a bomb allocates no more than about the
        cap: the decompressor is never asked for more than C{cap + 1}
        bytes.
        """
        bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), compresslevel=9)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            e = self.assertRaises(Rejected, decode_content, bomb, b"gzip", 100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))
        self.assertIn("100", e.message)
        # zlib's inflate state and window (~40 KB) dominate; an uncapped
        # decompression would allocate its whole 50 MB output.
        self.assertLess(peak, 256 * 1024)

    def test_bomb_in_many_members(self):
        """
        Output bounded by the cap even when the input is itself larger than
        the cap (every byte of it is still read only up to the cap's worth
        of output).
        """
        bomb = zlib.compress(b"\0" * (10 * 1024 * 1024), 9)
        e = self.rejected(bomb, b"deflate", cap=10)
        self.assertEqual((e.status, e.reason), (413, "too_large_decoded"))


class DecodeEventsTests(SynchronousTestCase):
    limits = Limits(event_size=64, body_size=1024, events_per_request=5)

    def rejected(self, body: bytes, content_type: bytes | None = JSON,
                 limits: Limits | None = None) -> Rejected:
        return self.assertRaises(Rejected, decode_events, body, content_type,
                                 limits or self.limits)

    def test_defaults(self):
        """
        The defaults are the documented ones: C{MAX_BODY_SIZE} 16384,
        C{MAX_BATCH_BODY_SIZE} 512 KiB, C{MAX_EVENTS_PER_REQUEST} 500.
        """
        self.assertEqual(Limits(), Limits(event_size=16384, body_size=512 * 1024,
                                          events_per_request=500))
        self.assertEqual(Limits().request_size, 512 * 1024)
        self.assertEqual(Limits(event_size=2000, body_size=1000).request_size, 2000)

    def test_single_object(self):
        body = b'{"event":"click"}'
        events, batch = decode_events(body, JSON, self.limits)
        self.assertEqual(events, [({"event": "click"}, body)])
        self.assertFalse(batch)

    def test_single_object_without_content_type(self):
        events, batch = decode_events(b' {"a":1} ', None, self.limits)
        self.assertEqual([obj for obj, _ in events], [{"a": 1}])
        self.assertFalse(batch)

    def test_text_plain_is_json(self):
        """
        C{navigator.sendBeacon} sends a string as C{text/plain}: it is read
        as JSON.
        """
        events, batch = decode_events(b'{"a":1}', b"text/plain;charset=UTF-8", self.limits)
        self.assertEqual([obj for obj, _ in events], [{"a": 1}])
        events, batch = decode_events(b'[{"a":1},{"a":2}]', b"text/plain", self.limits)
        self.assertEqual([obj for obj, _ in events], [{"a": 1}, {"a": 2}])
        self.assertTrue(batch)

    def test_array(self):
        events, batch = decode_events(b' [{"a":1}, {"b":2}, {}]', JSON, self.limits)
        self.assertEqual([obj for obj, _ in events], [{"a": 1}, {"b": 2}, {}])
        self.assertTrue(batch)

    def test_array_larger_than_one_event(self):
        """
        C{MAX_BODY_SIZE} limits one event, not a batch: an array body
        larger than it is accepted when each element is small.
        """
        body = b"[" + b",".join([b'{"n":"' + b"x" * 40 + b'"}'] * 5) + b"]"
        self.assertGreater(len(body), self.limits.event_size)
        events, batch = decode_events(body, JSON, self.limits)
        self.assertEqual(len(events), 5)
        self.assertTrue(batch)

    def test_ndjson(self):
        """
        NDJSON: one object per line; blank lines and CRLF line ends are
        fine, and each event keeps its own line as its raw bytes.
        """
        body = b'{"a":1}\r\n\r\n  \n{"b":2}\r\n{"c":3}'
        events, batch = decode_events(body, b"application/x-ndjson; charset=utf-8",
                                      self.limits)
        self.assertTrue(batch)
        self.assertEqual(events, [({"a": 1}, b'{"a":1}'), ({"b": 2}, b'{"b":2}'),
                                  ({"c": 3}, b'{"c":3}')])

    def test_ndjson_larger_than_one_event(self):
        body = b"\n".join([b'{"n":"' + b"x" * 40 + b'"}'] * 5) + b"\n"
        self.assertGreater(len(body), self.limits.event_size)
        events, _ = decode_events(body, NDJSON, self.limits)
        self.assertEqual(len(events), 5)

    def test_empty_array(self):
        e = self.rejected(b"[]")
        self.assertEqual((e.status, e.reason), (400, "empty_batch"))
        e = self.rejected(b"  [ ]  ")
        self.assertEqual((e.status, e.reason), (400, "empty_batch"))

    def test_empty_ndjson(self):
        for body in (b"", b"\n", b"\r\n\r\n  \n"):
            e = self.rejected(body, NDJSON)
            self.assertEqual((e.status, e.reason), (400, "empty_batch"), body)

    def test_too_many_events_array(self):
        body = b"[" + b",".join([b"{}"] * 6) + b"]"
        e = self.rejected(body)
        self.assertEqual((e.status, e.reason), (413, "too_many_events"))
        events, _ = decode_events(b"[" + b",".join([b"{}"] * 5) + b"]", JSON, self.limits)
        self.assertEqual(len(events), 5)

    def test_too_many_events_ndjson(self):
        e = self.rejected(b"{}\n" * 6, NDJSON)
        self.assertEqual((e.status, e.reason), (413, "too_many_events"))
        events, _ = decode_events(b"{}\n\n" * 5, NDJSON, self.limits)
        self.assertEqual(len(events), 5)

    def test_array_element_not_an_object(self):
        """
        The first bad element is named by its index.
        """
        e = self.rejected(b'[{"a":1}, 2, "three", {}]')
        self.assertEqual((e.status, e.reason, e.index), (400, "not_an_object", 1))

    def test_array_element_reserved_field(self):
        e = self.rejected(b'[{}, {}, {"_estat":{"ip":"1.2.3.4"}}]')
        self.assertEqual((e.status, e.reason, e.index), (400, "reserved_field", 2))
        self.assertIn("_estat", e.message)

    def test_array_nested_estat_is_fine(self):
        """
        Only a top-level C{_estat} is reserved.
        """
        events, _ = decode_events(b'[{"x":{"_estat":1}}]', JSON, self.limits)
        self.assertEqual([obj for obj, _ in events], [{"x": {"_estat": 1}}])

    def test_array_invalid_json(self):
        e = self.rejected(b'[{"a":1}, {"b":')
        self.assertEqual((e.status, e.reason, e.index), (400, "invalid_json", None))

    def test_ndjson_bad_line_index(self):
        """
        In NDJSON the index counts events, not lines: blank lines do not
        shift it.
        """
        e = self.rejected(b'{"a":1}\n\n{"a":2}\n\nnot json\n{"a":3}\n', NDJSON)
        self.assertEqual((e.status, e.reason, e.index), (400, "invalid_json", 2))

    def test_ndjson_non_object_line(self):
        e = self.rejected(b'{"a":1}\n[{"a":2}]\n', NDJSON)
        self.assertEqual((e.status, e.reason, e.index), (400, "not_an_object", 1))

    def test_ndjson_reserved_field(self):
        e = self.rejected(b'{"a":1}\r\n{"_estat":{}}\r\n', NDJSON)
        self.assertEqual((e.status, e.reason, e.index), (400, "reserved_field", 1))

    def test_ndjson_line_too_large(self):
        """
        An NDJSON line longer than C{MAX_BODY_SIZE} is refused with 413 and
        its index, even though the whole body is within the batch limit.
        """
        big = b'{"n":"' + b"x" * 64 + b'"}'
        e = self.rejected(b'{"a":1}\n' + big + b"\n", NDJSON)
        self.assertEqual((e.status, e.reason, e.index), (413, "too_large", 1))

    def test_ndjson_line_exactly_event_size(self):
        line = b'{"n":"' + b"x" * (64 - 8) + b'"}'
        self.assertEqual(len(line), 64)
        events, _ = decode_events(line + b"\n", NDJSON, self.limits)
        self.assertEqual(len(events), 1)

    def test_single_object_too_large(self):
        body = b'{"n":"' + b"x" * 64 + b'"}'
        e = self.rejected(body)
        self.assertEqual((e.status, e.reason, e.index), (413, "too_large", None))

    def test_single_object_exactly_event_size(self):
        body = b'{"n":"' + b"x" * (64 - 8) + b'"}'
        self.assertEqual(len(body), 64)
        events, _ = decode_events(body, JSON, self.limits)
        self.assertEqual([raw for _, raw in events], [body])

    def test_array_body_too_large(self):
        body = b"[" + b",".join([b'{"n":"' + b"x" * 300 + b'"}'] * 4) + b"]"
        self.assertGreater(len(body), self.limits.body_size)
        e = self.rejected(body, limits=Limits(event_size=64, body_size=1024,
                                              events_per_request=500))
        self.assertEqual((e.status, e.reason), (413, "too_large"))

    def test_ndjson_body_too_large(self):
        body = b'{"n":"' + b"x" * 50 + b'"}\n'
        body = body * (self.limits.body_size // len(body) + 1)
        e = self.rejected(body, NDJSON, limits=Limits(event_size=64, body_size=1024,
                                                      events_per_request=500))
        self.assertEqual((e.status, e.reason), (413, "too_large"))

    def test_scalar_body(self):
        for body in (b"1", b'"x"', b"null", b"true"):
            e = self.rejected(body)
            self.assertEqual((e.status, e.reason), (400, "not_an_object"), body)

    def test_invalid_json(self):
        e = self.rejected(b'{"a":')
        self.assertEqual((e.status, e.reason, e.index), (400, "invalid_json", None))

    def test_reserved_field_in_single_object(self):
        e = self.rejected(b'{"_estat":1}')
        self.assertEqual((e.status, e.reason, e.index), (400, "reserved_field", None))


class IsNdjsonTests(SynchronousTestCase):
    def test_ndjson_types(self):
        for value in (b"application/x-ndjson", b"application/ndjson",
                      b"Application/X-NDJSON", b"application/x-ndjson; charset=utf-8",
                      b" application/x-ndjson ", b"application/jsonl",
                      b"application/x-jsonlines"):
            self.assertTrue(is_ndjson(value), value)

    def test_other_types(self):
        for value in (None, b"", b"application/json", b"text/plain",
                      b"text/plain;charset=UTF-8", b"application/x-ndjsonx",
                      b"multipart/form-data"):
            self.assertFalse(is_ndjson(value), value)


class RejectedTests(SynchronousTestCase):
    """
    L{Rejected} is the one refusal of both streams' rules.
    """

    def test_segment_answers_400_for_413(self):
        """
        Segment's routes answer a body too large with 400 C{too_large}
        (the SDKs retry a 413 for ever); other statuses are kept.
        """
        self.assertEqual(Rejected(413, "too_many_events", "m").segment(), (400, "too_large"))
        self.assertEqual(Rejected(415, "unsupported_encoding", "m").segment(),
                         (415, "unsupported_encoding"))
        self.assertEqual(Rejected(401, "unauthorized", "m").segment(), (401, "unauthorized"))

    def test_fields(self):
        e = Rejected(400, "bad_json", "not JSON", index=3, count=7)
        self.assertEqual((e.status, e.reason, e.message, e.index, e.count, str(e)),
                         (400, "bad_json", "not JSON", 3, 7, "not JSON"))
