# -*- test-case-name: estat.test.test_ingest_segment_rules -*-
"""
Segment's tracking API, as rules: from the JSON a Segment SDK sends to the
messages Estat stores, one line each.

What the SDKs send (read from analytics-python, analytics-node and
analytics-next):

 - analytics-python and analytics-node POST C{/v1/batch} with
   C{{"batch": [...], "sentAt": ..., "writeKey": ...}} and C{Authorization:
   Basic base64(writeKey + ":")}; analytics-python gzips when asked;
 - analytics.js POSTs one message to C{/v1/t}, C{/v1/p}, C{/v1/i}, C{/v1/g},
   C{/v1/a} or C{/v1/s} (C{/v1/b} when batching), as C{text/plain} JSON
   carrying its own C{writeKey} and C{sentAt};
 - all of them drop a batch answered 400 and retry 5xx, 408 and 429 (with
   C{Retry-After}), whole, with the same C{messageId}s.

A stored message is the message as sent, with the batch's C{context} and
C{integrations} merged under it (the message's own keys win), C{type} from
the route, a C{messageId} when it has none, and the server fields
C{receivedAt}, C{originalTimestamp} (the client's C{timestamp}) and
C{timestamp} corrected for the client's clock skew:
C{receivedAt - (sentAt - originalTimestamp)}.  C{context.ip} and
C{context.userAgent} come from the request unless the client set them.  The
write key is never stored.

Pure functions and attrs records: no I/O, no reactor, no HTTP.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import uuid
from typing import Any, Callable

import attr
import orjson

from ..event import SERVER_FIELD, EventRejected, anonymize_ip, make_line, parse_json
from .rejected import Rejected

__all__ = [
    "EVENT_ROUTES",
    "MESSAGE_TYPES",
    "Received",
    "SegmentLimits",
    "decode_pixel",
    "normalise",
    "parse_document",
    "settings_document",
    "to_lines",
]

#: The message types of Segment's spec.
MESSAGE_TYPES = ("track", "identify", "page", "screen", "group", "alias")

#: Event routes and the type each names (C{None}: a batch, types per message).
EVENT_ROUTES: dict[bytes, str | None] = {}
for _type in MESSAGE_TYPES:
    EVENT_ROUTES[b"/v1/" + _type.encode()] = _type
    EVENT_ROUTES[b"/v1/" + _type[0].encode()] = _type
EVENT_ROUTES[b"/v1/batch"] = None
EVENT_ROUTES[b"/v1/b"] = None
del _type

#: Pixel routes (GET, C{?data=<base64 JSON>}) and the type each names.
PIXEL_ROUTES: dict[bytes, str] = {b"/v1/pixel/track": "track", b"/v1/pixel/page": "page"}


@attr.s(frozen=True, slots=True)
class SegmentLimits:
    """
    Segment's documented limits.

    @ivar message_size: the largest message, in bytes of compact JSON as
        sent (32 KB).
    @ivar batch_size: the largest request body, decoded (500 KB).
    @ivar messages_per_batch: the most messages one request may carry
        (C{MAX_EVENTS_PER_REQUEST}: the queue takes a batch whole).
    """

    message_size: int = attr.ib(default=32 * 1024)
    batch_size: int = attr.ib(default=500 * 1024)
    messages_per_batch: int = attr.ib(default=500)


@attr.s(frozen=True, slots=True)
class Received:
    """
    What the server knows of a request.

    @ivar received_at: epoch seconds.
    @ivar ip: the client's address, as L{estat.event.ClientAddressResolver}
        decided (already anonymised when so configured).
    @ivar user_agent: the C{User-Agent} header, or C{None}.
    @ivar source: the source name of the write key (C{WRITE_KEYS=key=name}),
        or C{None}.
    @ivar anonymize: C{IP_ANONYMIZE}: a client's own C{context.ip} is
        anonymised too.
    """

    received_at: float = attr.ib()
    ip: str = attr.ib()
    user_agent: str | None = attr.ib(default=None)
    source: str | None = attr.ib(default=None)
    anonymize: bool = attr.ib(default=False)


def parse_document(body: bytes, route_type: str | None, limits: SegmentLimits) -> dict:
    """
    The JSON object of a (decoded) request body.

    @raise Rejected: for a body too large, not JSON, or not an
        object.
    """
    if route_type is not None and len(body) > limits.message_size:
        raise Rejected(400, "too_large",
                              f"a message may be at most {limits.message_size} bytes")
    if len(body) > limits.batch_size:
        raise Rejected(400, "too_large",
                              f"a request body may be at most {limits.batch_size} bytes")
    try:
        doc = parse_json(body)
    except EventRejected as e:
        raise Rejected(400, e.reason, e.message) from None
    if type(doc) is not dict:
        raise Rejected(400, "not_an_object", "the body must be a JSON object")
    return doc


def write_key_of(doc: dict) -> str | None:
    """
    The C{writeKey} a body carries (analytics.js and the pixel put it
    there), if it is a non-empty string.
    """
    key = doc.get("writeKey")
    return key if type(key) is str and key else None


def decode_pixel(data: bytes) -> dict:
    """
    The message of a pixel request's C{data} parameter: base64 (standard
    or URL-safe, padding optional) of a JSON object.

    @raise Rejected: if it is not.
    """
    text = data.strip().replace(b"-", b"+").replace(b"_", b"/").replace(b" ", b"+")
    text += b"=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "bad_pixel_data", "data is not base64") from None
    if not raw:
        raise Rejected(400, "bad_pixel_data", "data is empty")
    try:
        doc = parse_json(raw)
    except EventRejected as e:
        raise Rejected(400, e.reason, "data is not base64 of a JSON object") from None
    if type(doc) is not dict:
        raise Rejected(400, "not_an_object", "data must be a JSON object")
    return doc


def _present(value: Any) -> bool:
    if type(value) is str:
        return bool(value)
    return type(value) in (int, float)


_REQUIRED = {
    "track": ("event", "a track call needs an event name ('event')"),
    "group": ("groupId", "a group call needs a 'groupId'"),
    "alias": ("previousId", "an alias call needs a 'previousId'"),
}


def _check(message: Any, route_type: str | None, index: int | None) -> str:
    """
    The message's type, after Segment's checks.

    @raise Rejected: naming what is wrong.
    """
    if type(message) is not dict:
        raise Rejected(400, "not_an_object", "a message must be a JSON object", index)
    if SERVER_FIELD in message:
        raise Rejected(400, "reserved_field",
                              f"field {SERVER_FIELD!r} is reserved for the server", index)
    kind = route_type or message.get("type")
    if kind not in MESSAGE_TYPES:
        raise Rejected(400, "bad_type", "'type' must be one of " + ", ".join(MESSAGE_TYPES),
                              index)
    if not (_present(message.get("userId")) or _present(message.get("anonymousId"))):
        raise Rejected(400, "missing_user", "a message needs a 'userId' or an 'anonymousId'",
                              index)
    required = _REQUIRED.get(kind)
    if required is not None:
        field, text = required
        value = message.get(field)
        if not (_present(value) if field != "event" else type(value) is str and value):
            raise Rejected(400, "missing_" + field, text, index)
    for field in ("context", "integrations"):
        value = message.get(field)
        if value is not None and type(value) is not dict:
            raise Rejected(400, "bad_" + field, f"{field!r} must be an object", index)
    message_id = message.get("messageId")
    if message_id is not None and (type(message_id) is not str or not message_id):
        raise Rejected(400, "bad_message_id", "'messageId' must be a non-empty string", index)
    return kind


def messages_of(doc: dict, route_type: str | None, limits: SegmentLimits) -> tuple[list, dict]:
    """
    The messages a document carries, checked, and the batch-level fields
    to merge under each (C{context}, C{integrations}, C{sentAt}).

    @return: C{([(type, message), ...], defaults)}.
    @raise Rejected: naming the first bad message's index.
    """
    if route_type is not None:
        return [(_check(doc, route_type, None), doc)], {}
    batch = doc.get("batch")
    if type(batch) is not list:
        raise Rejected(400, "bad_batch", "'batch' must be an array of messages")
    if not batch:
        raise Rejected(400, "empty_batch", "the batch holds no messages")
    count = len(batch)
    if count > limits.messages_per_batch:
        raise Rejected(400, "too_many_events",
                              f"a batch may carry at most {limits.messages_per_batch} messages",
                              count=count)
    defaults = {}
    for field in ("context", "integrations"):
        value = doc.get(field)
        if value is not None:
            if type(value) is not dict:
                raise Rejected(400, "bad_" + field, f"{field!r} must be an object",
                                      count=count)
            defaults[field] = value
    if "sentAt" in doc:
        defaults["sentAt"] = doc["sentAt"]
    limit = limits.message_size
    checked = []
    for index, message in enumerate(batch):
        try:
            kind = _check(message, None, index)
            if len(orjson.dumps(message)) > limit:
                raise Rejected(400, "too_large", f"a message may be at most {limit} bytes",
                                      index)
        except Rejected as e:
            e.count = count
            raise
        except (orjson.JSONEncodeError, TypeError):
            pass  # an integer beyond 64 bits: the encoder stores it exactly
        checked.append((kind, message))
    return checked, defaults


def parse_time(value: Any) -> float | None:
    """
    Epoch seconds of an ISO 8601 date (C{Z}, an offset, or none: UTC), or
    C{None} if C{value} is not one.
    """
    if type(value) is not str or not 10 <= len(value) <= 40:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, ValueError, OSError):
        return None


def format_time(epoch: float) -> str | None:
    """
    ISO 8601 UTC with milliseconds (C{2026-12-01T08:00:00.123Z}), as the
    SDKs write dates; C{None} past the years datetime can hold.
    """
    try:
        when = datetime.datetime.fromtimestamp(round(epoch, 3), tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def new_message_id() -> str:
    return str(uuid.uuid4())


def normalise(kind: str, message: dict, defaults: dict, received: Received,
              received_at_text: str, new_id: Callable[[], str] = new_message_id) -> dict:
    """
    The message to store: C{message} (left untouched) with the batch's
    fields under it and the server's fields set.
    """
    out = dict(message)
    out.pop("writeKey", None)
    for field in ("context", "integrations"):
        under = defaults.get(field)
        if under:
            own = message.get(field)
            out[field] = {**under, **own} if own else dict(under)
    if "sentAt" not in out and "sentAt" in defaults:
        out["sentAt"] = defaults["sentAt"]
    out["type"] = kind
    if not out.get("messageId"):
        out["messageId"] = new_id()

    context = out.get("context")
    context = dict(context) if context else {}
    own_ip = context.get("ip")
    if own_ip is None or own_ip == "":
        context["ip"] = received.ip
    elif received.anonymize and type(own_ip) is str:
        context["ip"] = anonymize_ip(own_ip) or own_ip
    if not context.get("userAgent") and received.user_agent is not None:
        context["userAgent"] = received.user_agent
    out["context"] = context

    out["receivedAt"] = received_at_text
    client_time = out.get("timestamp")
    if client_time is None:
        client_time = message.get("originalTimestamp")
    if client_time is None:
        out["timestamp"] = received_at_text
    else:
        out["originalTimestamp"] = client_time
        original = parse_time(client_time)
        sent = parse_time(out.get("sentAt"))
        corrected = None
        if original is not None and sent is not None:
            corrected = format_time(received.received_at - (sent - original))
        elif original is None:
            corrected = received_at_text  # not a date: receivedAt stands in
        if corrected is not None:
            out["timestamp"] = corrected
    return out


def server_fields(received: Received, received_at_text: str) -> dict:
    """
    Estat's own C{_estat} object of a stored message.
    """
    return {
        "received_at": received_at_text,
        "ip": received.ip,
        "user_agent": received.user_agent,
        "source": received.source,
    }


def to_lines(messages: list, received: Received, received_at_text: str) -> list:
    """
    C{[(received_at, line)]}, L{estat.event.QueuedEvent}s of normalised
    messages (a line is bytes, or an L{estat.event.UnencodedEvent}).
    """
    fields = server_fields(received, received_at_text)
    when = received.received_at
    return [(when, make_line(m, fields, None)) for m in messages]


def settings_document(write_key: str, api_host: str, protocol: str) -> dict:
    """
    The source settings analytics.js loads from C{cdnURL} at start-up:
    C{Segment.io} is the only destination and this server its API host
    (C{host[:port]/v1}); no device-mode destination, middleware, plan or
    remote plugin, so nothing more is fetched; no SDK telemetry.
    """
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
            }
        },
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }
