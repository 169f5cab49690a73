# -*- test-case-name: estat.test.test_ingest_segment_rules -*-
"""
Tests for L{estat.ingest.segment_rules}: Segment's rules, with no HTTP.
"""

from __future__ import annotations

import base64

import orjson
from twisted.trial.unittest import SynchronousTestCase

from estat.event import UnencodedEvent
from estat.ingest.rejected import Rejected
from estat.ingest.segment_rules import (
    EVENT_ROUTES,
    Received,
    SegmentLimits,
    decode_pixel,
    format_time,
    messages_of,
    normalise,
    parse_document,
    parse_time,
    settings_document,
    to_lines,
    write_key_of,
)

RECEIVED_AT = 1_764_576_000.250  # 2025-12-01T08:00:00.250Z
RECEIVED_TEXT = "2025-12-01T08:00:00.250Z"
RECEIVED = Received(received_at=RECEIVED_AT, ip="203.0.113.7", user_agent="curl/8",
                    source="web")


def _ids():
    n = iter(range(1, 1000))
    return lambda: f"generated-{next(n)}"


class RoutesTests(SynchronousTestCase):
    def test_long_and_short_forms(self) -> None:
        for name in ("track", "identify", "page", "screen", "group", "alias"):
            self.assertEqual(EVENT_ROUTES[b"/v1/" + name.encode()], name)
            self.assertEqual(EVENT_ROUTES[b"/v1/" + name[0].encode()], name)
        self.assertIsNone(EVENT_ROUTES[b"/v1/batch"])
        self.assertIsNone(EVENT_ROUTES[b"/v1/b"])
        self.assertEqual(len(EVENT_ROUTES), 14)


class ParseDocumentTests(SynchronousTestCase):
    limits = SegmentLimits()

    def test_object(self) -> None:
        self.assertEqual(parse_document(b'{"a":1}', "track", self.limits), {"a": 1})

    def test_not_json_or_not_object(self) -> None:
        for body in (b"{", b"[1]", b'"x"', b"NaN"):
            e = self.assertRaises(Rejected, parse_document, body, None, self.limits)
            self.assertEqual(e.status, 400)

    def test_message_over_32_kb(self) -> None:
        body = b'{"p":"' + b"x" * (32 * 1024) + b'"}'
        e = self.assertRaises(Rejected, parse_document, body, "track", self.limits)
        self.assertEqual((e.status, e.reason), (400, "too_large"))
        self.assertIn("32768", e.message)

    def test_batch_over_500_kb(self) -> None:
        body = b'{"batch":[],"p":"' + b"x" * (500 * 1024) + b'"}'
        e = self.assertRaises(Rejected, parse_document, body, None, self.limits)
        self.assertEqual((e.status, e.reason), (400, "too_large"))

    def test_write_key(self) -> None:
        self.assertEqual(write_key_of({"writeKey": "k"}), "k")
        self.assertIsNone(write_key_of({"writeKey": ""}))
        self.assertIsNone(write_key_of({"writeKey": 3}))
        self.assertIsNone(write_key_of({}))


class ValidationTests(SynchronousTestCase):
    limits = SegmentLimits()

    def reject(self, doc, route_type=None) -> Rejected:
        return self.assertRaises(Rejected, messages_of, doc, route_type, self.limits)

    def test_single_message_takes_the_route_type(self) -> None:
        messages, defaults = messages_of({"userId": "u", "event": "E", "type": "page"},
                                         "track", self.limits)
        self.assertEqual(messages[0][0], "track")
        self.assertEqual(defaults, {})

    def test_user_or_anonymous_id(self) -> None:
        e = self.reject({"event": "E"}, "track")
        self.assertEqual(e.reason, "missing_user")
        e = self.reject({"event": "E", "userId": ""}, "track")
        self.assertEqual(e.reason, "missing_user")
        messages_of({"event": "E", "anonymousId": "a"}, "track", self.limits)
        messages_of({"event": "E", "userId": 42}, "track", self.limits)

    def test_required_fields(self) -> None:
        self.assertEqual(self.reject({"userId": "u"}, "track").reason, "missing_event")
        self.assertEqual(self.reject({"userId": "u", "event": ""}, "track").reason,
                         "missing_event")
        self.assertEqual(self.reject({"userId": "u"}, "group").reason, "missing_groupId")
        self.assertEqual(self.reject({"userId": "u"}, "alias").reason, "missing_previousId")
        for kind in ("identify", "page", "screen"):
            messages_of({"userId": "u"}, kind, self.limits)

    def test_reserved_and_typed_fields(self) -> None:
        self.assertEqual(self.reject({"userId": "u", "_estat": 1}, "page").reason,
                         "reserved_field")
        self.assertEqual(self.reject({"userId": "u", "context": []}, "page").reason,
                         "bad_context")
        self.assertEqual(self.reject({"userId": "u", "integrations": 1}, "page").reason,
                         "bad_integrations")
        self.assertEqual(self.reject({"userId": "u", "messageId": 7}, "page").reason,
                         "bad_message_id")

    def test_batch(self) -> None:
        doc = {"batch": [{"type": "track", "event": "E", "userId": "u"},
                         {"type": "identify", "anonymousId": "a"}],
               "context": {"app": "x"}, "integrations": {"All": True},
               "sentAt": "2025-12-01T08:00:00.000Z", "writeKey": "k"}
        messages, defaults = messages_of(doc, None, self.limits)
        self.assertEqual([k for k, _ in messages], ["track", "identify"])
        self.assertEqual(defaults, {"context": {"app": "x"}, "integrations": {"All": True},
                                    "sentAt": "2025-12-01T08:00:00.000Z"})

    def test_batch_names_the_first_bad_message(self) -> None:
        e = self.reject({"batch": [{"type": "page", "userId": "u"},
                                   {"type": "track", "userId": "u"},
                                   {"type": "nope"}]})
        self.assertEqual((e.status, e.reason, e.index, e.count), (400, "missing_event", 1, 3))
        e = self.reject({"batch": [{"type": "nope", "userId": "u"}]})
        self.assertEqual((e.reason, e.index), ("bad_type", 0))
        e = self.reject({"batch": [[]]})
        self.assertEqual((e.reason, e.index), ("not_an_object", 0))

    def test_batch_shape(self) -> None:
        self.assertEqual(self.reject({}).reason, "bad_batch")
        self.assertEqual(self.reject({"batch": {}}).reason, "bad_batch")
        self.assertEqual(self.reject({"batch": []}).reason, "empty_batch")
        self.assertEqual(self.reject({"batch": [{}], "context": 1}).reason, "bad_context")

    def test_batch_limits(self) -> None:
        limits = SegmentLimits(messages_per_batch=2)
        e = self.assertRaises(Rejected, messages_of,
                              {"batch": [{"type": "page", "userId": "u"}] * 3}, None, limits)
        self.assertEqual((e.status, e.reason, e.count), (400, "too_many_events", 3))
        big = {"type": "page", "userId": "u", "p": "x" * (32 * 1024)}
        e = self.reject({"batch": [{"type": "page", "userId": "u"}, big]})
        self.assertEqual((e.status, e.reason, e.index), (400, "too_large", 1))

    def test_huge_integer_is_not_a_size_error(self) -> None:
        messages, _ = messages_of({"batch": [{"type": "page", "userId": "u", "n": 2 ** 70}]},
                                  None, self.limits)
        self.assertEqual(len(messages), 1)


class TimeTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_time("2025-12-01T08:00:00.250Z"), RECEIVED_AT)
        self.assertEqual(parse_time("2025-12-01T08:00:00.250+00:00"), RECEIVED_AT)
        self.assertEqual(parse_time("2025-12-01T17:00:00.250+09:00"), RECEIVED_AT)
        self.assertEqual(parse_time("2025-12-01T08:00:00.250"), RECEIVED_AT)
        for bad in (None, 5, "", "yesterday", "2025-13-01T00:00:00Z", "x" * 100):
            self.assertIsNone(parse_time(bad))

    def test_format(self) -> None:
        self.assertEqual(format_time(RECEIVED_AT), RECEIVED_TEXT)
        self.assertIsNone(format_time(1e20))


class NormaliseTests(SynchronousTestCase):
    def norm(self, message, kind="track", defaults=None, received=RECEIVED, new_id=None):
        return normalise(kind, message, defaults or {}, received, RECEIVED_TEXT,
                         new_id or _ids())

    def test_server_fields(self) -> None:
        message = {"event": "E", "userId": "u", "writeKey": "secret"}
        out = self.norm(message)
        self.assertEqual(out, {
            "event": "E", "userId": "u", "type": "track", "messageId": "generated-1",
            "context": {"ip": "203.0.113.7", "userAgent": "curl/8"},
            "receivedAt": RECEIVED_TEXT, "timestamp": RECEIVED_TEXT,
        })
        # The message as sent is left alone.
        self.assertEqual(message, {"event": "E", "userId": "u", "writeKey": "secret"})

    def test_own_message_id_kept(self) -> None:
        self.assertEqual(self.norm({"event": "E", "userId": "u", "messageId": "m"})["messageId"],
                         "m")

    def test_batch_fields_merged_under_the_message(self) -> None:
        defaults = {"context": {"app": {"name": "a"}, "locale": "en", "ip": "198.51.100.1"},
                    "integrations": {"All": False, "Mixpanel": True},
                    "sentAt": "2025-12-01T08:00:00.000Z"}
        out = self.norm({"event": "E", "userId": "u", "context": {"locale": "ko"},
                         "integrations": {"All": True}}, defaults=defaults)
        self.assertEqual(out["context"], {"app": {"name": "a"}, "locale": "ko",
                                          "ip": "198.51.100.1", "userAgent": "curl/8"})
        self.assertEqual(out["integrations"], {"All": True, "Mixpanel": True})
        self.assertEqual(out["sentAt"], "2025-12-01T08:00:00.000Z")
        own = self.norm({"event": "E", "userId": "u", "sentAt": "2025-12-01T07:00:00.000Z"},
                        defaults=defaults)
        self.assertEqual(own["sentAt"], "2025-12-01T07:00:00.000Z")

    def test_client_ip_and_user_agent_win(self) -> None:
        out = self.norm({"event": "E", "userId": "u",
                         "context": {"ip": "192.0.2.9", "userAgent": "Mozilla"}})
        self.assertEqual(out["context"], {"ip": "192.0.2.9", "userAgent": "Mozilla"})

    def test_anonymize_applies_to_a_client_ip(self) -> None:
        received = Received(RECEIVED_AT, "203.0.113.0", None, None, anonymize=True)
        out = self.norm({"event": "E", "userId": "u", "context": {"ip": "192.0.2.9"}},
                        received=received)
        self.assertEqual(out["context"], {"ip": "192.0.2.0"})

    def test_skewed_clock_corrected(self) -> None:
        # The client's clock is an hour fast: it says it sent at 09:00:00
        # an event it made at 08:59:50; the server received it at 08:00:00.25.
        out = self.norm({"event": "E", "userId": "u", "timestamp": "2025-12-01T08:59:50.000Z",
                         "sentAt": "2025-12-01T09:00:00.000Z"})
        self.assertEqual(out["originalTimestamp"], "2025-12-01T08:59:50.000Z")
        self.assertEqual(out["timestamp"], "2025-12-01T07:59:50.250Z")
        self.assertEqual(out["receivedAt"], RECEIVED_TEXT)

    def test_timestamp_without_sent_at_is_kept(self) -> None:
        out = self.norm({"event": "E", "userId": "u", "timestamp": "2020-01-01T00:00:00Z"})
        self.assertEqual(out["timestamp"], "2020-01-01T00:00:00Z")
        self.assertEqual(out["originalTimestamp"], "2020-01-01T00:00:00Z")

    def test_unparseable_timestamp(self) -> None:
        out = self.norm({"event": "E", "userId": "u", "timestamp": "soon",
                         "sentAt": "2025-12-01T09:00:00.000Z"})
        self.assertEqual(out["originalTimestamp"], "soon")
        self.assertEqual(out["timestamp"], RECEIVED_TEXT)

    def test_lines(self) -> None:
        out = self.norm({"event": "E", "userId": "u"})
        [(when, line)] = to_lines([out], RECEIVED, RECEIVED_TEXT)
        self.assertEqual(when, RECEIVED_AT)
        stored = orjson.loads(line)
        self.assertEqual(stored["_estat"], {"received_at": RECEIVED_TEXT, "ip": "203.0.113.7",
                                            "user_agent": "curl/8", "source": "web"})
        self.assertEqual(stored["messageId"], "generated-1")

    def test_huge_integer_line(self) -> None:
        out = self.norm({"event": "E", "userId": "u", "n": 2 ** 70})
        [(_, line)] = to_lines([out], RECEIVED, RECEIVED_TEXT)
        self.assertIsInstance(line, UnencodedEvent)


class PixelTests(SynchronousTestCase):
    def test_standard_and_url_safe(self) -> None:
        doc = {"writeKey": "k", "userId": "u?>", "event": "Opened ~~"}
        raw = orjson.dumps(doc)
        self.assertEqual(decode_pixel(base64.b64encode(raw)), doc)
        self.assertEqual(decode_pixel(base64.urlsafe_b64encode(raw).rstrip(b"=")), doc)

    def test_bad(self) -> None:
        for data in (b"", b"!!!", base64.b64encode(b"[1]"), base64.b64encode(b"{")):
            e = self.assertRaises(Rejected, decode_pixel, data)
            self.assertEqual(e.status, 400)


class SettingsTests(SynchronousTestCase):
    def test_names_this_server(self) -> None:
        doc = settings_document("k", "estat.example.com/v1", "https")
        self.assertEqual(doc["integrations"], {"Segment.io": {
            "apiKey": "k", "apiHost": "estat.example.com/v1", "protocol": "https",
            "unbundledIntegrations": []}})
        self.assertEqual(doc["metrics"], {"sampleRate": 0})
        self.assertEqual(doc["remotePlugins"], [])


class NormaliseProperties(SynchronousTestCase):
    """
    Properties of L{normalise} over generated messages.
    """

    def test_properties(self) -> None:
        import copy
        import datetime

        from hypothesis import given, settings
        from hypothesis import strategies as st

        json_values = st.recursive(
            st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                st.text(max_size=5), inner, max_size=3), max_leaves=8)
        objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
        moments = st.datetimes(min_value=datetime.datetime(2000, 1, 1),
                               max_value=datetime.datetime(2100, 1, 1),
                               timezones=st.just(datetime.timezone.utc))

        @settings(max_examples=200, deadline=None, database=None, derandomize=True)
        @given(extra=objects, context=objects, batch_context=objects, made=moments,
               sent=moments, with_times=st.booleans())
        def check(extra, context, batch_context, made, sent, with_times):
            message = {**extra, "userId": "u", "event": "E", "context": context}
            if with_times:
                message["timestamp"] = made.isoformat()
                message["sentAt"] = sent.isoformat()
            before = copy.deepcopy(message)
            defaults = {"context": batch_context}
            out = normalise("track", message, defaults, RECEIVED, RECEIVED_TEXT, _ids())
            # The message as sent is never changed.
            self.assertEqual(message, before)
            # Its own context keys win over the batch's; ip and userAgent
            # come from the request only where it set none.
            for key, value in context.items():
                if key not in ("ip", "userAgent") or value not in (None, ""):
                    self.assertEqual(out["context"][key], value)
            for key, value in batch_context.items():
                if key not in context and key not in ("ip", "userAgent"):
                    self.assertEqual(out["context"][key], value)
            self.assertEqual(out["type"], "track")
            self.assertEqual(out["receivedAt"], RECEIVED_TEXT)
            if with_times:
                self.assertEqual(out["originalTimestamp"], made.isoformat())
                expected = RECEIVED_AT - (sent.timestamp() - made.timestamp())
                corrected = parse_time(out["timestamp"])
                if corrected is not None:
                    self.assertLessEqual(abs(corrected - expected), 0.0011)
            orjson.dumps(out)  # always serialisable

        check()
