# -*- test-case-name: estat.test.test_properties -*-
"""
Property-based tests (hypothesis) of the pure parts of the pipeline:

 - the encoder gives back every event, exactly, once, in order;
 - request bodies (one object, an array, NDJSON, gzip) parse back to what
   was sent, and anything else is refused with a L{Rejected};
 - object keys follow the documented layout and partition by the UTC
   time of the first event;
 - duration and size settings parse exactly what they say;
 - the batcher seals every offered event once, in order, in batches no
   larger than C{BATCH_SIZE}.

Every property runs a fixed, derandomised set of examples, so a run is
reproducible.
"""

from __future__ import annotations

import base64
import copy
import datetime
import gzip
import hashlib
import json
import math
import re
import zlib
from fractions import Fraction

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.batcher import Batcher
from estat.config import SETTINGS_BY_ENV, ConfigError, load_config, parse_duration
from estat.encoder import Batch, encode_batch
from estat.event import (
    SERVER_FIELD,
    EventRejected,
    UnencodedEvent,
    format_received_at,
    make_line,
    parse_event,
)
from estat.keys import KeyMaker, sanitize
from estat.metrics import Metrics
from estat.queue import EventQueue
from estat.ingest.body import Limits, decode_content, decode_events
from estat.ingest.rejected import Rejected

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: 2023-11-14T22:13:20Z
START = 1700000000.0

UNLIMITED = Limits(event_size=10 ** 9, body_size=10 ** 9, events_per_request=10 ** 6)


# --- JSON values ---------------------------------------------------------------

I64_MIN, U64_MAX = -(2 ** 63), 2 ** 64 - 1

#: Integers no 64-bit JSON library holds; kept below Python's 4300-digit
#: limit on int/str conversion.
big_ints = st.one_of(
    st.integers(min_value=U64_MAX + 1, max_value=10 ** 300),
    st.integers(min_value=-(10 ** 300), max_value=I64_MIN - 1),
    st.sampled_from([U64_MAX + 1, I64_MIN - 1, 2 ** 100, -(2 ** 100)]),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=I64_MIN, max_value=U64_MAX),
    big_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    # Any unicode (no lone surrogates: no UTF-8 holds them), control
    # characters included.
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x20) | st.sampled_from(
        ["\u2028", "\u2029", "\ufeff", "\U0001f600", '"', "\\", "\n", "/"])),
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)

client_keys = st.text(max_size=10).filter(lambda k: k != SERVER_FIELD)

events = st.dictionaries(client_keys, json_values, max_size=4)


def tagged(value):
    """
    C{value} with every scalar tagged by its type and every object's keys
    in order: equal only if exactly equal (1 is not 1.0, -0.0 is not 0.0,
    key order counts).
    """
    if value is None or isinstance(value, bool):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", [tagged(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(k, tagged(v)) for k, v in value.items()])
    raise TypeError(f"not a JSON value: {value!r}")


def has_big_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not I64_MIN <= value <= U64_MAX
    if isinstance(value, list):
        return any(has_big_int(v) for v in value)
    if isinstance(value, dict):
        return any(has_big_int(v) for v in value.values())
    return False


def server_fields(n: int) -> dict:
    return {"received_at": format_received_at(START + n / 1000),
            "ip": "203.0.113.7", "user_agent": None if n % 2 else f"agent/{n}"}


def make_batch(payloads: list) -> Batch:
    key = f"raw/dt=2023-11-14/hour=22/p-20231114T221320000Z-{len(payloads):016x}.jsonl.gz"
    return Batch(key=key, poison_key="raw_dlq/" + key[len("raw/"):],
                 events=[(START + i / 1000, p) for i, p in enumerate(payloads)],
                 first_event_at=START, sealed_at=START + 1)


def gunzip_lines(body: bytes) -> list:
    d = zlib.decompressobj(31)
    text = d.decompress(body) + d.flush()
    assert d.eof and not d.unused_data, "not exactly one gzip member"
    assert text.endswith(b"\n")
    return text[:-1].split(b"\n")


# --- (a) the encoder ---------------------------------------------------------------


class EncoderProperties(SynchronousTestCase):

    @PROPERTY
    @given(st.lists(events, max_size=8), st.integers(min_value=1, max_value=9))
    def test_every_event_comes_back_exactly_once_in_order(self, sent, level):
        """
        make_line + encode_batch + gunzip: one line per event, each
        C{json.loads}ing to the event plus its C{_estat}.
        """
        payloads = []
        for n, event in enumerate(sent):
            line = make_line(copy.deepcopy(event), server_fields(n),
                             json.dumps(event).encode("utf-8"))
            if has_big_int(event):
                self.assertIsInstance(line, UnencodedEvent)
            else:
                self.assertIsInstance(line, bytes)
            payloads.append(line)
        batch = make_batch(payloads)

        objects = encode_batch(batch, level)

        if not sent:
            self.assertEqual(objects, [])
            return
        self.assertEqual(len(objects), 1, "no event here may be poison")
        (obj,) = objects
        self.assertEqual((obj.key, obj.count, obj.poison), (batch.key, len(sent), False))
        self.assertEqual(obj.content_md5, base64.b64encode(
            hashlib.md5(obj.body).digest()).decode("ascii"))
        lines = gunzip_lines(obj.body)
        self.assertEqual(len(lines), len(sent))
        for n, (line, event) in enumerate(zip(lines, sent)):
            expected = dict(event)
            expected[SERVER_FIELD] = server_fields(n)
            self.assertEqual(tagged(json.loads(line)), tagged(expected))
        # Equal input, equal bytes (zero mtime): a retry writes the same object.
        self.assertEqual(encode_batch(batch, level)[0].body, obj.body)

    @PROPERTY
    @given(st.lists(st.tuples(events, st.booleans()), min_size=1, max_size=8))
    def test_unencodable_events_are_set_aside_never_lost(self, sent):
        """
        Events that cannot be written as UTF-8 (a lone surrogate) go to
        the poison object with their raw original; the others are stored
        in order; together they are every event once.
        """
        payloads, good, bad = [], [], []
        for n, (event, poison) in enumerate(sent):
            event = dict(event)
            if poison:
                event["bad"] = "\ud800"
            raw = json.dumps(event).encode("ascii")
            line = make_line(copy.deepcopy(event), server_fields(n), raw)
            payloads.append(line)
            (bad if poison else good).append((n, event, raw))

        objects = encode_batch(make_batch(payloads))

        by_kind = {o.poison: o for o in objects}
        self.assertEqual(len(by_kind), len(objects))
        self.assertEqual(sum(o.count for o in objects), len(sent))
        if good:
            lines = gunzip_lines(by_kind[False].body)
            self.assertEqual([tagged(json.loads(line)) for line in lines],
                             [tagged({**e, SERVER_FIELD: server_fields(n)})
                              for n, e, _ in good])
        else:
            self.assertNotIn(False, by_kind)
        if bad:
            poison = by_kind[True]
            self.assertTrue(poison.key.startswith("raw_dlq/"))
            records = [json.loads(line) for line in gunzip_lines(poison.body)]
            self.assertEqual([r["raw"] for r in records],
                             [raw.decode("ascii") for _, _, raw in bad])
            self.assertEqual([r[SERVER_FIELD] for r in records],
                             [server_fields(n) for n, _, _ in bad])
        else:
            self.assertNotIn(True, by_kind)


# --- (b) request bodies -----------------------------------------------------------------


def dumps(value, style: str) -> bytes:
    """
    C{value} as JSON bytes, written as different clients write it.
    """
    if style == "orjson" and not has_big_int(value):
        return orjson.dumps(value)
    if style == "ascii":
        return json.dumps(value, ensure_ascii=True).encode("ascii")
    if style == "pretty":
        return json.dumps(value, ensure_ascii=False, indent=2).encode("utf-8")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


styles = st.sampled_from(["orjson", "ascii", "pretty", "compact"])


class RequestBodyProperties(SynchronousTestCase):

    @PROPERTY
    @given(events, styles)
    def test_one_object_parses_back_exactly(self, event, style):
        body = dumps(event, style)
        self.assertEqual(tagged(parse_event(body)), tagged(event))
        items, batch = decode_events(body, b"application/json", UNLIMITED)
        self.assertFalse(batch)
        ((obj, raw),) = items
        self.assertEqual(tagged(obj), tagged(event))
        self.assertEqual(raw, body)

    @PROPERTY
    @given(st.lists(events, min_size=1, max_size=6), styles)
    def test_an_array_parses_back_exactly(self, sent, style):
        body = dumps(sent, style)
        items, batch = decode_events(body, b"application/json; charset=utf-8", UNLIMITED)
        self.assertTrue(batch)
        self.assertEqual([tagged(obj) for obj, _ in items], [tagged(e) for e in sent])
        self.assertEqual([raw for _, raw in items], [None] * len(sent))

    @PROPERTY
    @given(st.lists(events, min_size=1, max_size=6),
           st.sampled_from(["orjson", "ascii", "compact"]),
           st.sampled_from([b"\n", b"\r\n"]), st.booleans(),
           st.sampled_from([b"application/x-ndjson", b"application/jsonl",
                            b"Application/NDJSON; charset=utf-8"]))
    def test_ndjson_parses_back_exactly(self, sent, style, newline, blank_lines, ctype):
        lines = [dumps(e, style) for e in sent]
        separator = newline * 2 if blank_lines else newline
        body = separator.join(lines) + newline
        items, batch = decode_events(body, ctype, UNLIMITED)
        self.assertTrue(batch)
        self.assertEqual([tagged(obj) for obj, _ in items], [tagged(e) for e in sent])
        self.assertEqual([raw for _, raw in items], lines)

    @PROPERTY
    @given(st.one_of(
        st.binary(max_size=200),
        # Near-JSON: an event's text with bytes cut, doubled or swapped in.
        st.tuples(events, st.integers(0, 400), st.integers(0, 400), st.binary(max_size=3))
        .map(lambda t: (lambda b: b[:t[1]] + t[3] + b[t[2]:])(dumps(t[0], "compact"))),
    ), st.sampled_from([None, b"application/json", b"application/x-ndjson"]))
    def test_any_body_is_events_or_a_body_rejected(self, body, ctype):
        """
        No body makes the parser raise anything but L{Rejected}, with
        400 or 413; what it accepts is a list of events (objects without
        C{_estat}).
        """
        limits = Limits(event_size=300, body_size=600, events_per_request=5)
        try:
            items, _ = decode_events(body, ctype, limits)
        except Rejected as e:
            self.assertIn(e.status, (400, 413))
            return
        self.assertTrue(1 <= len(items) <= 5)
        for obj, _ in items:
            self.assertIs(type(obj), dict)
            self.assertNotIn(SERVER_FIELD, obj)

    @PROPERTY
    @given(st.binary(max_size=3000), st.integers(min_value=0, max_value=3000),
           st.sampled_from([b"gzip", b"x-gzip", b"deflate", b"raw-deflate"]))
    def test_compressed_body_decodes_to_itself_or_413(self, data, cap, encoding):
        if encoding == b"raw-deflate":
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body, encoding = c.compress(data) + c.flush(), b"deflate"
        elif encoding == b"deflate":
            body = zlib.compress(data)
        else:
            body = gzip.compress(data, mtime=0)
        if len(data) <= cap:
            self.assertEqual(decode_content(body, encoding, cap), data)
        else:
            e = self.assertRaises(Rejected, decode_content, body, encoding, cap)
            self.assertEqual(e.status, 413)

    @PROPERTY
    @given(st.lists(st.binary(min_size=1, max_size=200), min_size=2, max_size=4))
    def test_gzip_members_are_never_silently_dropped(self, members):
        """
        A body of several gzip members (C{cat a.gz b.gz}, valid gzip) is
        decoded whole or refused; a prefix is never taken as the body.
        """
        body = b"".join(gzip.compress(m) for m in members)
        try:
            decoded = decode_content(body, b"gzip", 10 ** 6)
        except Rejected as e:
            self.assertEqual(e.status, 400)
            return
        self.assertEqual(decoded, b"".join(members))

    @PROPERTY
    @given(json_scalars | st.lists(json_scalars, max_size=3),
           styles)
    def test_anything_but_an_object_is_refused(self, value, style):
        body = dumps(value, style)
        e = self.assertRaises(EventRejected, parse_event, body)
        self.assertEqual(e.reason, "not_an_object")


# --- (c) keys -------------------------------------------------------------------------

KEY = re.compile(
    r"^(?P<prefix>.+)/dt=(?P<date>\d{4}-\d\d-\d\d)/hour=(?P<hour>\d\d)/"
    r"(?P<instance>[A-Za-z0-9._-]+)-(?P<stamp>\d{8}T\d{6}\d{3}Z)-(?P<unique>[0-9a-f]{16})"
    r"\.jsonl\.gz$"
)

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
#: 9999-12-31T23:59:59Z
LAST = 253402300799.0

prefixes = st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_=]{1,8}){0,2}", fullmatch=True)

utc_datetimes = st.datetimes(min_value=datetime.datetime(1970, 1, 1),
                             max_value=datetime.datetime(9999, 12, 31, 23, 0),
                             timezones=st.just(datetime.timezone.utc))

#: Epoch seconds: anywhere, near the ends of days (leap days included),
#: and a hair before or after them.
epoch_seconds = st.one_of(
    st.floats(min_value=0.0, max_value=LAST - 3600),
    utc_datetimes.map(lambda d: d.timestamp()),
    st.tuples(utc_datetimes, st.sampled_from([-1e-3, -5e-4, -1e-6, -5e-7, 0.0, 4e-7, 1e-3]))
    .map(lambda t: max(0.0, t[0].replace(hour=0, minute=0, second=0, microsecond=0)
                       .timestamp() + t[1])),
    st.sampled_from([951782400.0, 951868799.999, 1709164800.0, 1709251199.9995,
                     4107542399.9999995, 0.0]),
)


def utc_of(seconds: float) -> datetime.datetime:
    """
    An independent reading of epoch seconds (timedelta arithmetic, to
    the microsecond).
    """
    return EPOCH + datetime.timedelta(seconds=seconds)


class KeyProperties(SynchronousTestCase):

    @PROPERTY
    @given(epoch_seconds, epoch_seconds, prefixes, prefixes, st.text(min_size=1, max_size=80),
           st.binary(min_size=8, max_size=8))
    def test_key_layout_and_partition(self, first, sealed, raw_prefix, dlq_prefix, host,
                                      entropy):
        instance = sanitize(host)
        sizes = []

        def urandom(n: int) -> bytes:
            sizes.append(n)
            return entropy

        maker = KeyMaker(raw_prefix, dlq_prefix, instance, entropy=urandom)
        key = maker.batch_key(first, sealed)

        m = KEY.match(key)
        self.assertIsNotNone(m, key)
        self.assertEqual(m["prefix"], raw_prefix)
        self.assertEqual(m["instance"], instance)
        self.assertEqual(m["unique"], entropy.hex())
        self.assertEqual(sizes, [8])
        # The partition is the UTC time of the first event, and agrees with
        # the received_at stored in that event.
        when = utc_of(first)
        self.assertEqual((m["date"], m["hour"]), (f"{when:%Y-%m-%d}", f"{when:%H}"))
        received_at = format_received_at(first)
        self.assertEqual((m["date"], m["hour"]), (received_at[:10], received_at[11:13]))
        # The name carries the sealing time, to the millisecond.
        at = utc_of(sealed)
        self.assertEqual(m["stamp"], f"{at:%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}Z")
        # The poison key is the same key under DLQ_PREFIX.
        self.assertEqual(maker.poison_key(key), dlq_prefix + key[len(raw_prefix):])

    @PROPERTY
    @given(st.lists(st.binary(min_size=8, max_size=8), min_size=2, max_size=50, unique=True),
           epoch_seconds)
    def test_distinct_entropy_distinct_keys(self, draws, when):
        pool = list(draws)
        maker = KeyMaker("raw", "raw_dlq", "host-abcd", entropy=lambda n: pool.pop(0))
        keys = [maker.batch_key(when, when) for _ in draws]
        self.assertEqual(len(set(keys)), len(keys))
        self.assertEqual(len({maker.poison_key(k) for k in keys}), len(keys))

    @PROPERTY
    @given(st.text(max_size=200))
    def test_sanitized_names_are_safe(self, name):
        safe = sanitize(name)
        self.assertRegex(safe, r"^[A-Za-z0-9._-]{1,64}$")
        self.assertFalse(safe.startswith(("-", ".")), safe)


# --- (d) durations and sizes ----------------------------------------------------------------

UNIT_SECONDS = {"ns": Fraction(1, 10 ** 9), "us": Fraction(1, 10 ** 6),
                "\u00b5s": Fraction(1, 10 ** 6), "\u03bcs": Fraction(1, 10 ** 6),
                "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60),
                "h": Fraction(3600)}

numbers = st.one_of(
    st.integers(0, 10 ** 6).map(str),
    st.tuples(st.integers(0, 10 ** 4), st.integers(0, 10 ** 6))
    .map(lambda t: f"{t[0]}.{t[1]}"),
    st.integers(0, 999).map(lambda n: f".{n}"),
    st.integers(0, 999).map(lambda n: f"{n}."),
)
duration_parts = st.lists(st.tuples(numbers, st.sampled_from(sorted(UNIT_SECONDS))),
                          min_size=1, max_size=5)

#: Go's time.ParseDuration syntax, without the sign (negatives are
#: refused), ASCII digits only.
GO_DURATION = re.compile(
    r"^\+?(?:0|(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)$")

duration_alphabet = st.sampled_from(list("0123456789.+-smhnu \u00b5\u03bc") + [
    "\u0661", "\uff11", "\u00b2", "e", "d", "_", "\t", "\u00a0"])


class DurationAndSizeProperties(SynchronousTestCase):

    @PROPERTY
    @given(duration_parts, st.sampled_from(["", "+"]))
    def test_a_duration_is_the_sum_of_its_parts(self, parts, sign):
        text = sign + "".join(n + u for n, u in parts)
        expected = sum(Fraction(n) * UNIT_SECONDS[u] for n, u in parts)
        value = parse_duration(text)
        self.assertTrue(math.isclose(value, float(expected), rel_tol=1e-12, abs_tol=1e-15),
                        (text, value, float(expected)))

    @PROPERTY
    @given(duration_parts)
    def test_negative_durations_are_refused(self, parts):
        text = "-" + "".join(n + u for n, u in parts)
        self.assertRaises(ValueError, parse_duration, text)
        env = {"FLUSH_INTERVAL": text}
        e = self.assertRaises(ConfigError, load_config, {}, env, {})
        self.assertIn("FLUSH_INTERVAL", str(e))

    @PROPERTY
    @given(st.text(alphabet=duration_alphabet, max_size=12) | st.text(max_size=8))
    def test_only_go_durations_parse(self, text):
        """
        Whatever the text, either it is a Go duration (around optional
        white space) and parses, or C{ValueError}.
        """
        valid = GO_DURATION.match(text.strip()) is not None
        try:
            parse_duration(text)
        except ValueError:
            self.assertFalse(valid, f"{text!r} is a valid duration but was refused")
        else:
            self.assertTrue(valid, f"{text!r} is not a Go duration but was accepted")

    @PROPERTY
    @given(st.sampled_from(["MAX_BODY_SIZE", "MAX_BATCH_BODY_SIZE", "DLQ_MAX_SIZE_BYTES",
                            "CHANNEL_SIZE", "BATCH_SIZE"]),
           st.integers(min_value=-(10 ** 20), max_value=10 ** 20))
    def test_sizes_parse_exactly_and_must_be_positive(self, name, n):
        parse = SETTINGS_BY_ENV[name].parse
        if n > 0:
            self.assertEqual(parse(str(n)), n)
            self.assertEqual(parse(f" {n}\n"), n)
            config = load_config({}, {name: str(n)}, {})
            self.assertEqual(getattr(config, name.lower()), n)
        else:
            self.assertRaises(ValueError, parse, str(n))
            self.assertRaises(ConfigError, load_config, {}, {name: str(n)}, {})

    @PROPERTY
    @given(st.text(max_size=10) | st.text(alphabet=st.sampled_from(list("0123456789+-_ .eEkKbB")),
                                          max_size=8))
    def test_sizes_refuse_what_is_not_a_number(self, text):
        # int() is lenient (underscores, other scripts' digits): only text
        # that is no integer at all must be refused.
        assume(not re.fullmatch(r"\s*[+-]?[\d_]+\s*", text))
        self.assertRaises(ValueError, SETTINGS_BY_ENV["MAX_BODY_SIZE"].parse, text)


# --- (e) batching -------------------------------------------------------------------------


class ManualSink:
    """
    A batch sink that records batches and answers at once or when told.
    """

    def __init__(self, immediate: bool) -> None:
        self.immediate = immediate
        self.batches: list = []
        self.pending: list = []

    def __call__(self, batch) -> Deferred:
        self.batches.append(batch)
        d = Deferred()
        if self.immediate:
            d.callback(None)
        else:
            self.pending.append(d)
        return d

    def complete(self, n: int) -> None:
        for _ in range(min(n, len(self.pending))):
            self.pending.pop(0).callback(None)


operations = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.integers(min_value=0, max_value=12)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=4.0)),
    st.tuples(st.just("complete"), st.integers(min_value=1, max_value=3)),
), max_size=60)


class BatchingProperties(SynchronousTestCase):

    @PROPERTY
    @given(operations,
           st.integers(min_value=1, max_value=8),    # batch_size
           st.integers(min_value=1, max_value=25),   # queue size
           st.floats(min_value=0.5, max_value=5.0),  # flush_interval
           st.integers(min_value=1, max_value=3),    # max_pending
           st.booleans(),                            # the sink answers at once
           st.booleans())                            # let it flush before draining
    def test_every_offered_event_is_sealed_once_in_order(
            self, ops, batch_size, queue_size, flush_interval, max_pending, immediate,
            flush_first):
        clock = Clock()
        clock.advance(START)
        queue = EventQueue(queue_size)
        sink = ManualSink(immediate)
        metrics = Metrics(CollectorRegistry())
        batcher = Batcher(queue=queue, sink=sink,
                          key_maker=KeyMaker("raw", "raw_dlq", "p", entropy=lambda n: b"\0" * n),
                          metrics=metrics, clock=clock, batch_size=batch_size,
                          flush_interval=flush_interval, max_pending=max_pending, tick=0.25)
        batcher.startService()
        offered = []
        serial = 0
        for op, arg in ops:
            if op == "offer":
                new = []
                for _ in range(arg):
                    new.append((clock.seconds(), b'{"n":%d}' % serial))
                    serial += 1
                free = queue.free
                accepted = queue.offer(new)
                self.assertEqual(accepted, len(new) <= free, (len(new), free))
                if accepted:
                    offered.extend(new)
            elif op == "advance":
                clock.advance(arg)
            else:
                sink.complete(arg)
            self.assertLessEqual(len(sink.pending), max_pending)
            self.assertLessEqual(len(queue), queue_size)

        if flush_first:
            # With the store keeping up, nothing waits longer than the flush
            # interval, without a shutdown.
            for _ in range(200):
                sink.complete(len(sink.pending))
                if not len(queue) and not batcher.open_count and not sink.pending:
                    break
                clock.advance(0.25)
            self.assertEqual([e for b in sink.batches for e in b.events], offered)
        sealed_before_drain = len(sink.batches)

        drained = batcher.drain()
        for _ in range(100):
            if drained.called:
                break
            sink.complete(len(sink.pending))
        self.assertIsNone(self.successResultOf(drained))

        delivered = [e for b in sink.batches for e in b.events]
        self.assertEqual(delivered, offered)
        for index, batch in enumerate(sink.batches):
            self.assertTrue(1 <= batch.count <= batch_size, batch.count)
            self.assertEqual(batch.first_event_at, batch.events[0][0])
            when = utc_of(batch.first_event_at)
            self.assertIn(f"/dt={when:%Y-%m-%d}/hour={when:%H}/", batch.key)
            if index < sealed_before_drain and batch.count < batch_size:
                # Only age seals a partial batch before shutdown.
                self.assertGreaterEqual(batch.sealed_at - batch.first_event_at,
                                        flush_interval)
        self.assertEqual(batcher.pending_batches, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        sealed = sum(metrics.registry.get_sample_value("batches_sealed_total",
                                                       {"trigger": t}) or 0
                     for t in ("size", "interval", "shutdown"))
        self.assertEqual(sealed, len(sink.batches))
