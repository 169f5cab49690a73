# -*- test-case-name: estat.test.test_ingest_body -*-
"""
From a request body to the events it carries: content decoding (gzip,
deflate) with a hard cap on the decoded size, then one JSON object, a JSON
array of objects, or NDJSON (one object per line).

A batch is all or nothing: the first bad element rejects the whole request
and names its index.  Pure functions; no I/O.
"""

from __future__ import annotations

import zlib
from typing import Any

import attr

import orjson

from ..event import SERVER_FIELD, EventRejected, _has_long_digit_run, check_event, parse_json
from .rejected import Rejected

__all__ = ["Limits", "decode_content", "decode_events", "is_ndjson"]


@attr.s(frozen=True, slots=True)
class Limits:
    """
    @ivar event_size: C{MAX_BODY_SIZE}: the largest single event, in bytes.
    @ivar body_size: C{MAX_BATCH_BODY_SIZE}: the largest request body,
        and the largest body after decompression.
    @ivar events_per_request: C{MAX_EVENTS_PER_REQUEST}.
    """

    event_size: int = attr.ib(default=16384)
    body_size: int = attr.ib(default=524288)
    events_per_request: int = attr.ib(default=500)

    @property
    def request_size(self) -> int:
        """
        The most a request body may be on the wire.
        """
        return max(self.event_size, self.body_size)


def decode_content(body: bytes, encoding: bytes | None, cap: int) -> bytes:
    """
    Undo C{Content-Encoding}.  Decompression stops as soon as the output
    passes C{cap}: a small gzip bomb costs at most C{cap} bytes.

    @raise Rejected: 415 for an unknown encoding, 400 for a corrupt
        stream, 413 past the cap.
    """
    if not encoding:
        return body
    name = encoding.strip().lower()
    if name in (b"identity", b""):
        return body
    if name in (b"gzip", b"x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif name == b"deflate":
        # RFC 9110's deflate is zlib-wrapped; some clients send raw deflate.
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
    else:
        raise Rejected(415, "unsupported_encoding",
                           "unsupported Content-Encoding; use gzip, deflate or identity")
    out = bytearray()
    data = body
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            out += decompressor.decompress(data, cap + 1 - len(out))
            if len(out) > cap or decompressor.unconsumed_tail:
                raise Rejected(413, "too_large_decoded",
                                   f"decompressed body is larger than {cap} bytes")
            out += decompressor.flush()
        except zlib.error:
            raise Rejected(400, "bad_encoding", "body is not valid for its Content-Encoding") from None
        if len(out) > cap:
            raise Rejected(413, "too_large_decoded",
                               f"decompressed body is larger than {cap} bytes")
        if not decompressor.eof:
            raise Rejected(400, "bad_encoding", "compressed body is truncated")
        data = decompressor.unused_data
        if not data:
            return bytes(out)
        if wbits != 16 + zlib.MAX_WBITS:
            # Only gzip has members; anything after a deflate stream is junk.
            raise Rejected(400, "bad_encoding", "data after the end of the compressed body")
        # Concatenated gzip members (cat a.gz b.gz) are one valid gzip body.


_NDJSON_TYPES = (b"application/x-ndjson", b"application/ndjson",
                 b"application/jsonl", b"application/x-jsonlines")
#: Content-Type values seen, and whether each is NDJSON (clients send a few).
_NDJSON_SEEN: dict = {}


def is_ndjson(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    known = _NDJSON_SEEN.get(content_type)
    if known is None:
        known = content_type.split(b";", 1)[0].strip().lower() in _NDJSON_TYPES
        if len(_NDJSON_SEEN) < 256:
            _NDJSON_SEEN[content_type] = known
    return known


def _element(obj: Any, index: int | None) -> dict:
    try:
        return check_event(obj)
    except EventRejected as e:
        raise Rejected(400, e.reason, e.message, index) from None


def decode_events(body: bytes, content_type: bytes | None, limits: Limits) -> tuple[list, bool]:
    """
    The events of a (decoded) body.

    @return: C{(events, batch)}: a list of C{(obj, raw)} pairs (C{raw} is
        the element's original bytes where known) and whether the body was
        a batch (array or NDJSON).
    @raise Rejected: naming the first bad element's index in a batch.
    """
    if content_type is not None and is_ndjson(content_type):
        return _decode_ndjson(body, limits), True
    first = body[:1]
    if (first == b"{" and len(body) <= limits.event_size
            and not _has_long_digit_run(body)):
        # The common case, one plain object, in one step; anything else
        # (and every refusal) takes the general path below.
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict and SERVER_FIELD not in obj:
            return [(obj, body)], False
    if first != b"{" and body.lstrip()[:1] == b"[":
        if len(body) > limits.body_size:
            raise Rejected(413, "too_large", f"batch body is larger than {limits.body_size} bytes")
        try:
            items = parse_json(body)
        except EventRejected as e:
            raise Rejected(400, e.reason, e.message) from None
        if not items:
            raise Rejected(400, "empty_batch", "the batch holds no events")
        if len(items) > limits.events_per_request:
            raise Rejected(413, "too_many_events",
                               f"a request may carry at most {limits.events_per_request} events")
        if type(items) is list and all(type(obj) is dict and SERVER_FIELD not in obj
                                       for obj in items):
            return [(obj, None) for obj in items], True
        try:
            return [(_element(obj, i), None) for i, obj in enumerate(items)], True
        except Rejected as e:
            e.count = len(items) if isinstance(items, list) else 1
            raise
    if len(body) > limits.event_size:
        raise Rejected(413, "too_large", f"an event may be at most {limits.event_size} bytes")
    try:
        obj = parse_json(body)
    except EventRejected as e:
        raise Rejected(400, e.reason, e.message) from None
    if type(obj) is not dict:
        raise Rejected(400, "not_an_object", "body must be a JSON object or an array of objects")
    return [(_element(obj, None), body)], False


def _decode_ndjson(body: bytes, limits: Limits) -> list:
    if len(body) > limits.body_size:
        raise Rejected(413, "too_large", f"batch body is larger than {limits.body_size} bytes")
    events = []
    index = 0
    for line in body.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        if len(events) >= limits.events_per_request:
            raise Rejected(413, "too_many_events",
                               f"a request may carry at most {limits.events_per_request} events")
        if len(line) > limits.event_size:
            raise Rejected(413, "too_large",
                               f"an event may be at most {limits.event_size} bytes", index)
        try:
            obj = parse_json(line)
        except EventRejected as e:
            raise Rejected(400, e.reason, e.message, index) from None
        events.append((_element(obj, index), line))
        index += 1
    if not events:
        raise Rejected(400, "empty_batch", "the batch holds no events")
    return events
