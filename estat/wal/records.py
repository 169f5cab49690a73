# -*- test-case-name: estat.test.test_wal_records -*-
"""
The record format of the write-ahead log.

A segment file is a run of records, each::

    magic (4 bytes) | body length (u32) | CRC-32 of type + body (u32) | type (u8) | body

Two record types:

 - C{EVENTS}: the events of one admitted request, in one stream:
   C{seq (u64) | stream | count (u32) | count x (received_at f64 | kind u8 | len u32 | data)}.
   The events get the sequence numbers C{seq .. seq + count - 1}.
 - C{SEAL}: a batch was sealed, before it is uploaded:
   C{stream | first (u64) | last (u64) | count (u32) | sealed_at (f64) | key | poison key}.
   Replay rebuilds exactly that batch (the stream's events with sequence
   numbers in C{[first, last]}) under exactly that key, so a replay
   overwrites an object that was already stored instead of duplicating it.

The magic lets L{scan} find the next good record after a damaged one.
Everything here is pure computation on bytes: no I/O.
"""

from __future__ import annotations

import json
import struct
import zlib

import attr

from ..event import UnencodedEvent

__all__ = [
    "EVENTS", "SEAL", "MAGIC", "HEADER", "EventsRecord", "SealRecord", "ScanResult",
    "encode_events", "encode_seal", "scan",
]

MAGIC = b"\xe5WAL"
_HEADER = struct.Struct("<4sIIB")
HEADER = _HEADER.size
#: A length above this is damage, not a record (a request is at most ~1 MB).
MAX_BODY = 64 << 20

EVENTS = 1
SEAL = 2

#: Kinds of an event's data.
LINE = 0          # the serialised line, as stored
UNENCODED = 1     # JSON of [obj, raw]: an event the fast serialiser refused
RAW_ONLY = 2      # its raw bytes only (not even JSON could hold obj)

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_EVENT = struct.Struct("<dBI")
_SEAL = struct.Struct("<QQId")
_U16 = struct.Struct("<H")
_ONE = _U32.pack(1)


_CRC_SEED = {kind: zlib.crc32(bytes((kind,))) for kind in (1, 2)}
_pack_header = _HEADER.pack


def _frame(kind: int, body: bytes) -> bytes:
    return _pack_header(MAGIC, len(body), zlib.crc32(body, _CRC_SEED[kind]), kind) + body


_NAMES: dict = {}


def _name(stream: str) -> bytes:
    name = _NAMES.get(stream)
    if name is None:
        b = stream.encode("utf-8")
        if len(b) > 255:
            raise ValueError("stream name too long")
        name = _NAMES[stream] = bytes((len(b),)) + b
    return name


def _unencoded(payload: UnencodedEvent) -> tuple[int, bytes]:
    raw = payload.raw
    try:
        text = json.dumps([payload.obj, None if raw is None else raw.decode("utf-8", "surrogateescape")],
                          ensure_ascii=True, allow_nan=False)
        return UNENCODED, text.encode("ascii")
    except (ValueError, TypeError, RecursionError):
        return RAW_ONLY, raw or b""


def encode_events(stream: str, seq: int, events: list) -> bytes:
    """
    The record of one request's C{events} (L{estat.event.QueuedEvent}s).
    """
    pack = _EVENT.pack
    if len(events) == 1:
        received_at, payload = events[0][0], events[0][1]
        if type(payload) is bytes:
            # The common request: one event, already serialised.
            return _frame(EVENTS, b"".join((
                _U64.pack(seq), _name(stream), _ONE,
                pack(received_at, LINE, len(payload)), payload)))
    parts = [_U64.pack(seq), _name(stream), _U32.pack(len(events))]
    for event in events:
        received_at, payload = event[0], event[1]
        if type(payload) is bytes:
            parts.append(pack(received_at, LINE, len(payload)))
            parts.append(payload)
        else:
            kind, data = _unencoded(payload)
            parts.append(pack(received_at, kind, len(data)))
            parts.append(data)
    return _frame(EVENTS, b"".join(parts))


def encode_seal(stream: str, first: int, last: int, count: int, sealed_at: float,
                key: str, poison_key: str) -> bytes:
    k, p = key.encode("utf-8"), poison_key.encode("utf-8")
    return _frame(SEAL, b"".join((
        _name(stream), _SEAL.pack(first, last, count, sealed_at),
        _U16.pack(len(k)), k, _U16.pack(len(p)), p)))


class _Unreplayable:
    """
    Stands for an event whose object could not be logged; encoding it fails,
    so its raw original is stored under C{DLQ_PREFIX}, as it would have been.
    """

    def __repr__(self) -> str:
        return "<event object not kept in the write-ahead log>"


@attr.s(slots=True, frozen=True)
class EventsRecord:
    stream: str = attr.ib()
    seq: int = attr.ib()
    events: list = attr.ib(repr=False)  # of (received_at, bytes | UnencodedEvent)

    @property
    def last(self) -> int:
        return self.seq + len(self.events) - 1


@attr.s(slots=True, frozen=True)
class SealRecord:
    stream: str = attr.ib()
    first: int = attr.ib()
    last: int = attr.ib()
    count: int = attr.ib()
    sealed_at: float = attr.ib()
    key: str = attr.ib()
    poison_key: str = attr.ib()


def _read_name(body: bytes, pos: int) -> tuple[str, int]:
    n = body[pos]
    return body[pos + 1:pos + 1 + n].decode("utf-8"), pos + 1 + n


def _decode_event_data(kind: int, data: bytes):
    if kind == LINE:
        return data
    if kind == UNENCODED:
        obj, raw = json.loads(data)
        return UnencodedEvent(obj, None if raw is None else raw.encode("utf-8", "surrogateescape"))
    if kind == RAW_ONLY:
        return UnencodedEvent(_Unreplayable(), data)
    raise ValueError(f"unknown event kind {kind}")


def _decode(kind: int, body: bytes):
    if kind == EVENTS:
        (seq,) = _U64.unpack_from(body, 0)
        stream, pos = _read_name(body, 8)
        (count,) = _U32.unpack_from(body, pos)
        pos += 4
        events = []
        unpack = _EVENT.unpack_from
        for _ in range(count):
            received_at, k, n = unpack(body, pos)
            pos += _EVENT.size
            data = body[pos:pos + n]
            if len(data) != n:
                raise ValueError("event runs past its record")
            pos += n
            events.append((received_at, _decode_event_data(k, data)))
        if pos != len(body):
            raise ValueError("trailing bytes in an events record")
        return EventsRecord(stream, seq, events)
    if kind == SEAL:
        stream, pos = _read_name(body, 0)
        first, last, count, sealed_at = _SEAL.unpack_from(body, pos)
        pos += _SEAL.size
        (n,) = _U16.unpack_from(body, pos)
        key = body[pos + 2:pos + 2 + n].decode("utf-8")
        pos += 2 + n
        (n,) = _U16.unpack_from(body, pos)
        poison_key = body[pos + 2:pos + 2 + n].decode("utf-8")
        if pos + 2 + n != len(body):
            raise ValueError("trailing bytes in a seal record")
        return SealRecord(stream, first, last, count, sealed_at, key, poison_key)
    raise ValueError(f"unknown record type {kind}")


@attr.s(slots=True)
class ScanResult:
    """
    What one segment holds.

    @ivar records: the good records, in order.
    @ivar damaged: C{[(offset, length)]} of damaged stretches that good
        records follow (corruption: set aside).
    @ivar bad_tail: the offset where an unreadable stretch begins that runs
        to the end of the data, or C{None}.  In the newest segment that is
        a torn write (truncate it); elsewhere it is damage.
    @ivar good_end: the end of the last good record.
    """

    records: list = attr.ib(factory=list)
    damaged: list = attr.ib(factory=list)
    bad_tail: int | None = attr.ib(default=None)
    good_end: int = attr.ib(default=0)


def _record_at(data: bytes, pos: int):
    """
    The record at C{pos} and its end, or C{None} if there is none there.
    """
    if len(data) - pos < HEADER:
        return None
    magic, length, crc, kind = _HEADER.unpack_from(data, pos)
    if magic != MAGIC or length > MAX_BODY:
        return None
    end = pos + HEADER + length
    if end > len(data):
        return None
    body = data[pos + HEADER:end]
    if zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
        return None
    try:
        return _decode(kind, body), end
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return None


def scan(data: bytes) -> ScanResult:
    """
    Read every good record of one segment's bytes, skipping damage.
    """
    result = ScanResult()
    pos = 0
    size = len(data)
    while pos < size:
        found = _record_at(data, pos)
        if found is not None:
            record, pos = found
            result.records.append(record)
            result.good_end = pos
            continue
        # Damage at pos: look for the next good record after it.
        bad = pos
        probe = data.find(MAGIC, pos + 1)
        while probe >= 0:
            if _record_at(data, probe) is not None:
                break
            probe = data.find(MAGIC, probe + 1)
        if probe < 0:
            result.bad_tail = bad
            return result
        result.damaged.append((bad, probe - bad))
        pos = probe
    return result
