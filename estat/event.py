# -*- test-case-name: estat.test.test_event -*-
"""
One event, from request body to the bytes of its stored line.

An accepted event is parsed once, given its server fields (the ``_estat``
object), serialised once, and carried through the queue and the batcher as
C{(received_at, line)}.  Only when the fast serialiser cannot write it (an
integer beyond 64 bits, say) is it carried as an L{UnencodedEvent} for the
encoder to try again in a worker thread.

Nothing here does I/O or touches the reactor.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
from functools import lru_cache
from typing import Any, Union

import attr
import orjson

__all__ = [
    "SERVER_FIELD",
    "EventRejected",
    "UnencodedEvent",
    "QueuedEvent",
    "parse_event",
    "parse_json",
    "check_event",
    "anonymize_ip",
    "make_line",
    "format_received_at",
    "ClientAddressResolver",
]

#: The one key under which Estat puts its server fields.  A client event
#: that already has it is refused rather than overwritten.
SERVER_FIELD = "_estat"


class EventRejected(ValueError):
    """
    A request body is not an event Estat can store.

    @ivar reason: a short machine-readable reason for metrics.
    @ivar message: a short human sentence for the JSON error body.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@attr.s(slots=True, frozen=True)
class UnencodedEvent:
    """
    An event the fast serialiser refused; the encoder serialises it with
    the standard library, or stores C{raw} under C{DLQ_PREFIX}.
    """

    obj: Any = attr.ib()
    raw: bytes | None = attr.ib()


#: What travels on the event queue: (receive time in epoch seconds, payload).
QueuedEvent = tuple  # (float, Union[bytes, UnencodedEvent])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400 is valid JSON but no float holds it; orjson refuses it too.
        raise ValueError(f"number {text} is out of range")
    return value


#: A run of 19 digits may be an integer beyond 64 bits (-9999999999999999999
#: already is), which orjson would silently turn into a float; such bodies
#: take the exact, slower parser.  Found by mapping every digit to b"0" and
#: searching for nineteen of them: C speed, where a regex costs ~20 us/KB.
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_NINETEEN_DIGITS = b"0" * 19


def _has_long_digit_run(body: bytes) -> bool:
    # find(), not "in": bytes.__contains__ first tries its argument as an
    # integer, and raises (and drops) a TypeError with a formatted message
    # for anything else: 90 ns per request here.
    return body.translate(_DIGITS_TO_ZERO).find(_NINETEEN_DIGITS) >= 0


def parse_json(body: bytes) -> Any:
    """
    Parse a JSON document.

    orjson is strict RFC 8259 (no NaN/Infinity, valid UTF-8 only, at most
    1024 levels of nesting) and fast.  A body with a run of 20 digits is
    parsed by the standard library instead, so that integers beyond 64
    bits are kept exactly rather than rounded to a float.

    @raise EventRejected: if it is not valid JSON.
    """
    try:
        if not _has_long_digit_run(body):
            return orjson.loads(body)
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant,
                          parse_float=_finite_float)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e):
            raise EventRejected("too_deep", "JSON nesting is too deep") from None
        raise EventRejected("invalid_json", "body is not valid JSON") from None
    except RecursionError:
        raise EventRejected("too_deep", "JSON nesting is too deep") from None
    except (ValueError, UnicodeDecodeError):
        raise EventRejected("invalid_json", "body is not valid JSON") from None


def check_event(obj: Any) -> dict:
    """
    @raise EventRejected: unless C{obj} is an event Estat can store.
    """
    if type(obj) is not dict:
        raise EventRejected("not_an_object", "an event must be a JSON object")
    if SERVER_FIELD in obj:
        raise EventRejected(
            "reserved_field", f"field {SERVER_FIELD!r} is reserved for the server")
    return obj


def parse_event(body: bytes) -> dict:
    """
    Parse one request body into an event object.

    @raise EventRejected: for anything that is not a JSON object Estat can
        store.
    """
    obj = parse_json(body)
    if type(obj) is not dict:
        raise EventRejected("not_an_object", "body must be a JSON object")
    return check_event(obj)


def make_line(obj: dict, server_fields: dict, raw: bytes | None) -> Union[bytes, UnencodedEvent]:
    """
    Add the server fields to C{obj} and serialise it as one JSON line
    (without the newline).  Returns an L{UnencodedEvent} when orjson
    cannot serialise the object.
    """
    obj[SERVER_FIELD] = server_fields
    try:
        line = orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):
        return UnencodedEvent(obj=obj, raw=raw)
    # orjson's bytes keep a 4 KiB allocation whatever their length (measured:
    # 20,000 lines of 435 bytes hold 79 MB, copies 9.5 MB).  Lines wait in
    # the queue and in batches, so keep a right-sized copy: ~0.2 us.
    return memoryview(line).tobytes()


def make_lines(items: list, server_fields: dict, received_at: float, overhead: int,
               limit: int) -> list:
    """
    L{make_line} for every C{(obj, raw)} of a batch, as queued events
    C{(received_at, line)}, in one loop (a call per element is a tenth of a
    batched event's CPU).

    @raise ValueError: C{(index,)} of the first element whose line, less
        C{overhead} (its server fields), is longer than C{limit}.
    """
    events = []
    append = events.append
    dumps = orjson.dumps
    for index, (obj, raw) in enumerate(items):
        obj[SERVER_FIELD] = server_fields
        try:
            line = memoryview(dumps(obj)).tobytes()
        except (orjson.JSONEncodeError, TypeError):
            append((received_at, UnencodedEvent(obj=obj, raw=raw)))
            continue
        if len(line) - overhead > limit:
            raise ValueError(index)
        append((received_at, line))
    return events


class _ReceivedAtFormatter:
    """
    Formats epoch seconds as ISO 8601 UTC with milliseconds, caching the
    part that only changes once a second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, when: float) -> str:
        return self.format(when)

    def format(self, when: float) -> str:
        """
        C{when} as C{2026-12-07T10:56:01.123Z}.  (A method, not only
        C{__call__}: compiled, the ingest core calls it as a C function.)
        """
        # Within the second already formatted (nearly every call): the
        # same split as below, as when - int(when) is exact for when >= 1.
        second = int(when)
        if second == self._second and when >= 1.0:
            micros = round((when - second) * 1e6)
            if micros < 1000000:
                return self._prefix + _MILLIS[micros // 1000]
        # Split the way datetime.fromtimestamp does, so both always agree.
        frac, whole = math.modf(when)
        micros = round(frac * 1e6)
        if micros >= 1000000:
            whole += 1
            micros -= 1000000
        second = int(whole)
        if second != self._second:
            self._prefix = datetime.datetime.fromtimestamp(
                second, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}Z"


#: ".000Z" to ".999Z"
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
format_received_at = _ReceivedAtFormatter()


def anonymize_ip(address: str) -> str:
    """
    Zero the last octet of an IPv4 address and the last 80 bits of an IPv6
    address (keeping the /48), as analytics privacy rules usually ask.
    Anything that is not an IP address is returned as an empty string.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


@attr.s
class ClientAddressResolver:
    """
    Decides an event's client IP.

    The socket peer is the client unless it is a trusted proxy; then
    C{X-Forwarded-For} is read right to left, skipping trusted hops, and
    the first address that is not trusted is the client.  A malformed
    entry stops the walk: the last trusted hop is then the answer, so a
    client can never choose its own address through a trusted proxy.
    """

    trusted: tuple = attr.ib(default=())
    anonymize: bool = attr.ib(default=False)

    def __attrs_post_init__(self) -> None:
        self._is_trusted = lru_cache(maxsize=4096)(self._check)

    def _check(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)

    def trusts(self, peer: str) -> bool:
        """
        Whether C{peer} is a trusted proxy (whose C{X-Forwarded-*} fields
        are believed).
        """
        return self._is_trusted(peer)

    def resolve(self, peer: str, forwarded_for: list | None) -> str:
        """
        The client's address, anonymised if so configured.
        """
        client = self._resolve(peer, forwarded_for)
        if self.anonymize:
            return anonymize_ip(client)
        return client

    def _resolve(self, peer: str, forwarded_for: list | None) -> str:
        if not forwarded_for or not self._is_trusted(peer):
            return peer
        client = peer
        hops = []
        for header in forwarded_for:
            hops.extend(h.strip() for h in header.split(","))
        for hop in reversed(hops):
            if not hop:
                continue
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            client = hop
            if not self._is_trusted(hop):
                break
        return client
