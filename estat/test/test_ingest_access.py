# -*- test-case-name: estat.test.test_ingest_access -*-
"""
Tests for L{estat.ingest.access}: write keys and the CORS policy; and the
client address a request is stored with (L{estat.event.ClientAddressResolver}
with C{IP_ANONYMIZE}).
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from estat.event import ClientAddressResolver
from estat.ingest.core import IngestRequest
from estat.ingest.access import (CorsPolicy, WriteKeys, parse_list, query_values,
                               read_keys_file, split_key)


def request(headers: dict | None = None, uri: bytes = b"/collect",
            method: bytes = b"POST") -> IngestRequest:
    path, _, query = uri.partition(b"?")
    return IngestRequest(method=method, path=path, query=query,
                         headers={k.lower(): v for k, v in (headers or {}).items()},
                         body=b"", peer="127.0.0.1", received_at=0.0)


def header(headers: tuple, name: bytes) -> list | None:
    values = [v for n, v in headers if n == name]
    return values or None


class WriteKeysTests(SynchronousTestCase):
    keys = WriteKeys(["k-one", "k-two"])

    def test_no_keys_is_open(self):
        """
        With no keys configured every request is allowed, with or without
        a key.
        """
        open_keys = WriteKeys()
        self.assertFalse(open_keys.required)
        self.assertTrue(open_keys.allows(request()))
        self.assertTrue(open_keys.allows(request({b"X-Write-Key": b"anything"})))
        self.assertFalse(WriteKeys(()).required)

    def test_required(self):
        self.assertTrue(self.keys.required)

    def test_header(self):
        self.assertTrue(self.keys.allows(request({b"X-Write-Key": b"k-one"})))
        self.assertEqual(self.keys.presented(request({b"x-write-key": b" k-one "})), b"k-one")

    def test_bearer(self):
        self.assertTrue(self.keys.allows(request({b"Authorization": b"Bearer k-two"})))
        self.assertTrue(self.keys.allows(request({b"Authorization": b"bearer k-two"})))

    def test_other_authorization_scheme(self):
        """
        Only the C{Bearer} scheme carries a write key.
        """
        r = request({b"Authorization": b"Basic k-one"})
        self.assertIsNone(self.keys.presented(r))
        self.assertFalse(self.keys.allows(r))

    def test_query(self):
        """
        C{navigator.sendBeacon} cannot set headers: C{?write_key=} works,
        percent-decoded.
        """
        self.assertTrue(self.keys.allows(request(uri=b"/collect?write_key=k-one")))
        self.assertTrue(self.keys.allows(request(uri=b"/collect?v=1&write_key=k-two&x=y")))
        keys = WriteKeys(["a+b/c="])
        self.assertTrue(keys.allows(request(uri=b"/collect?write_key=a%2Bb%2Fc%3D")))

    def test_wrong_key(self):
        self.assertFalse(self.keys.allows(request({b"X-Write-Key": b"k-three"})))
        self.assertFalse(self.keys.allows(request({b"X-Write-Key": b"k-one-and-more"})))
        self.assertFalse(self.keys.allows(request({b"X-Write-Key": b"k-on"})))
        self.assertFalse(self.keys.allows(request({b"Authorization": b"Bearer nope"})))
        self.assertFalse(self.keys.allows(request(uri=b"/collect?write_key=nope")))

    def test_missing_key(self):
        self.assertIsNone(self.keys.presented(request()))
        self.assertFalse(self.keys.allows(request()))
        self.assertFalse(self.keys.allows(request(uri=b"/collect?write_key=")))
        self.assertFalse(self.keys.allows(request({b"X-Write-Key": b""})))
        self.assertFalse(self.keys.allows(request({b"Authorization": b"Bearer "})))

    def test_header_takes_precedence(self):
        """
        The header is read first: a wrong header key is not rescued by a
        right one in the query.
        """
        r = request({b"X-Write-Key": b"wrong"}, uri=b"/collect?write_key=k-one")
        self.assertFalse(self.keys.allows(r))

    def test_multiple_keys(self):
        """
        Any configured key is accepted (key rotation).
        """
        keys = WriteKeys(("old", "new", "other"))
        for key in (b"old", b"new", b"other"):
            self.assertTrue(keys.allows(request({b"X-Write-Key": key})), key)
        self.assertFalse(keys.allows(request({b"X-Write-Key": b"older"})))

    def test_non_ascii_key(self):
        """
        Keys are compared as bytes, so a non-ASCII key neither crashes the
        comparison nor matches anything else.
        """
        keys = WriteKeys(["cl\u00e9"])
        self.assertTrue(keys.allows(request({b"X-Write-Key": "cl\u00e9".encode("utf-8")})))
        self.assertFalse(keys.allows(request({b"X-Write-Key": b"cl\xe9"})))


class QueryValuesTests(SynchronousTestCase):
    def test_values(self) -> None:
        self.assertEqual(query_values(b"a=1&b=x+y&a=%2F&c&&d="),
                         {b"a": [b"1", b"/"], b"b": [b"x y"], b"c": [b""], b"d": [b""]})
        self.assertEqual(query_values(b""), {})

    def test_non_ascii_is_bytes_not_an_error(self) -> None:
        # urllib.parse.parse_qs(bytes) raises UnicodeEncodeError here: a 500.
        self.assertEqual(query_values(b"write_key=%F4%8F%BD%9E%C3%A9"),
                         {b"write_key": [b"\xf4\x8f\xbd\x9e\xc3\xa9"]})
        keys = WriteKeys(["k"])
        request = IngestRequest(method=b"POST", path=b"/collect",
                                query=b"write_key=%F4%8F%BD%9E", headers={}, body=b"",
                                peer="192.0.2.1", received_at=0.0)
        self.assertFalse(keys.allows(request))


class SourceNameTests(SynchronousTestCase):
    """
    C{WRITE_KEYS=key1=web,key2=backend}: a key may name its source.
    """

    def test_split(self) -> None:
        self.assertEqual(split_key("k1=web"), (b"k1", "web"))
        self.assertEqual(split_key("plain"), (b"plain", None))
        # base64 padding is part of the key
        self.assertEqual(split_key("YWJjZA=="), (b"YWJjZA==", None))
        self.assertEqual(split_key("YWJjZA===app"), (b"YWJjZA==", "app"))
        self.assertEqual(split_key(b"k=back-end_2.x"), (b"k", "back-end_2.x"))

    def test_named_and_plain_keys_together(self) -> None:
        keys = WriteKeys(["k1=web", "k2"])
        self.assertEqual(keys.keys, (b"k1", b"k2"))
        self.assertEqual(keys.sources, ("web", None))
        self.assertTrue(keys.matches(b"k1"))
        self.assertFalse(keys.matches(b"k1=web"))
        self.assertEqual(keys.source(b"k1"), (True, "web"))
        self.assertEqual(keys.source(b"k2"), (True, None))
        self.assertEqual(keys.source(b"k3"), (False, None))
        self.assertEqual(keys.source(None), (False, None))

    def test_equality_and_defaults(self) -> None:
        self.assertEqual(WriteKeys(["a=x"]), WriteKeys([b"a=x"]))
        self.assertFalse(WriteKeys().required)


class ReadKeysFileTests(SynchronousTestCase):
    def test_comments_and_blanks(self):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("# production keys\n\nkey-one\n   \n  key-two  \n# key-retired\nkey-three")
        self.assertEqual(read_keys_file(path), ("key-one", "key-two", "key-three"))

    def test_empty_file(self):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("# nothing yet\n\n")
        self.assertEqual(read_keys_file(path), ())

    def test_keys_from_file_are_accepted(self):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("from-file\n")
        keys = WriteKeys(parse_list("from-env") + read_keys_file(path))
        self.assertTrue(keys.allows(request({b"X-Write-Key": b"from-file"})))
        self.assertTrue(keys.allows(request({b"X-Write-Key": b"from-env"})))

    def test_missing_file(self):
        self.assertRaises(OSError, read_keys_file, self.mktemp())

    def test_parse_list(self):
        self.assertEqual(parse_list(" a, b ,c\n d "), ("a", "b", "c", "d"))
        self.assertEqual(parse_list(""), ())


class CorsPolicyTests(SynchronousTestCase):
    origin = b"https://app.example.com"
    policy = CorsPolicy(("https://app.example.com", "https://other.example.com"))

    def test_allowed_origin_echoed(self):
        r = request({b"Origin": self.origin})
        h = self.policy.headers(r)
        self.assertEqual(header(h, b"access-control-allow-origin"), [self.origin])
        self.assertEqual(header(h, b"vary"), [b"Origin"])
        self.assertEqual(header(h, b"access-control-expose-headers"), [b"Retry-After"])

    def test_each_allowed_origin(self):
        r = request({b"Origin": b"https://other.example.com"})
        h = self.policy.headers(r)
        self.assertEqual(header(h, b"access-control-allow-origin"),
                         [b"https://other.example.com"])

    def test_any_origin(self):
        policy = CorsPolicy(("*",))
        r = request({b"Origin": b"http://anything.test:8080"})
        h = policy.headers(r)
        self.assertEqual(header(h, b"access-control-allow-origin"), [b"*"])

    def test_disallowed_origin(self):
        """
        A disallowed origin gets no CORS header, but C{Vary: Origin} so a
        cache never hands it another origin's answer.
        """
        for origin in (b"https://evil.example.com", b"https://app.example.com.evil.test",
                       b"http://app.example.com", b"null", b"https://app.example.com:8443"):
            r = request({b"Origin": origin})
            h = self.policy.headers(r)
            self.assertIsNone(header(h, b"access-control-allow-origin"), origin)
            self.assertIsNone(header(h, b"access-control-expose-headers"), origin)
            self.assertEqual(header(h, b"vary"), [b"Origin"], origin)

    def test_no_origin_header(self):
        r = request()
        h = self.policy.headers(r)
        self.assertIsNone(header(h, b"access-control-allow-origin"))
        self.assertEqual(header(h, b"vary"), [b"Origin"])

    def test_no_origins_configured(self):
        r = request({b"Origin": self.origin})
        h = CorsPolicy().headers(r)
        self.assertIsNone(header(h, b"access-control-allow-origin"))

    def test_non_ascii_origin(self):
        r = request({b"Origin": b"https://\xe9.example.com"})
        h = self.policy.headers(r)
        self.assertIsNone(header(h, b"access-control-allow-origin"))

    def test_preflight(self):
        r = request({b"Origin": self.origin,
                     b"Access-Control-Request-Method": b"POST",
                     b"Access-Control-Request-Headers": b"content-type,x-write-key"},
                    method=b"OPTIONS")
        h = self.policy.preflight_headers(r)
        self.assertEqual(header(h, b"access-control-allow-origin"), [self.origin])
        [methods] = header(h, b"access-control-allow-methods")
        self.assertIn(b"POST", {m.strip() for m in methods.split(b",")})
        [allowed] = header(h, b"access-control-allow-headers")
        allowed = {h.strip().lower() for h in allowed.split(b",")}
        self.assertTrue({b"content-type", b"content-encoding", b"x-write-key",
                         b"authorization"} <= allowed, allowed)
        self.assertEqual(header(h, b"access-control-max-age"), [b"86400"])
        self.assertEqual(header(h, b"vary"), [b"Origin"])

    def test_preflight_max_age(self):
        r = request({b"Origin": self.origin}, method=b"OPTIONS")
        h = CorsPolicy(("https://app.example.com",), max_age=600).preflight_headers(r)
        self.assertEqual(header(h, b"access-control-max-age"), [b"600"])

    def test_preflight_any_origin(self):
        r = request({b"Origin": b"http://localhost:3000"}, method=b"OPTIONS")
        h = CorsPolicy(("*",)).preflight_headers(r)
        self.assertEqual(header(h, b"access-control-allow-origin"), [b"*"])
        self.assertIsNotNone(header(h, b"access-control-allow-methods"))
        self.assertIsNotNone(header(h, b"access-control-max-age"))

    def test_preflight_disallowed_origin(self):
        r = request({b"Origin": b"https://evil.example.com"}, method=b"OPTIONS")
        h = self.policy.preflight_headers(r)
        for name in (b"access-control-allow-origin", b"access-control-allow-methods",
                     b"access-control-allow-headers", b"access-control-max-age"):
            self.assertIsNone(header(h, name), name)
        self.assertEqual(header(h, b"vary"), [b"Origin"])


class AnonymizedClientAddressTests(SynchronousTestCase):
    """
    C{IP_ANONYMIZE}: the stored client address loses its last IPv4 octet or
    its last 80 IPv6 bits, whichever way it was found.
    """

    def resolver(self, *trusted: str) -> ClientAddressResolver:
        return ClientAddressResolver(tuple(ipaddress.ip_network(n) for n in trusted),
                                     anonymize=True)

    def test_ipv4_peer(self):
        self.assertEqual(self.resolver().resolve("198.51.100.123", None), "198.51.100.0")

    def test_ipv6_peer(self):
        self.assertEqual(
            self.resolver().resolve("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", None),
            "2001:db8:aaaa::")

    def test_ipv4_mapped_peer(self):
        self.assertEqual(self.resolver().resolve("::ffff:198.51.100.123", None),
                         "198.51.100.0")

    def test_forwarded_through_trusted_proxy(self):
        """
        The address chosen from C{X-Forwarded-For} is the one anonymised,
        never the proxy's.
        """
        r = self.resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("10.1.2.3", ["6.6.6.6, 198.51.100.123, 10.0.0.9"]),
                         "198.51.100.0")
        self.assertEqual(r.resolve("10.1.2.3", ["2001:db8:1:2:3:4:5:6"]), "2001:db8:1::")
        self.assertEqual(r.resolve("10.1.2.3", ["::ffff:198.51.100.7"]), "198.51.100.0")

    def test_forwarded_from_untrusted_peer_ignored(self):
        r = self.resolver("10.0.0.0/8")
        self.assertEqual(r.resolve("203.0.113.50", ["198.51.100.123"]), "203.0.113.0")

    def test_not_anonymized_by_default(self):
        r = ClientAddressResolver()
        self.assertEqual(r.resolve("198.51.100.123", None), "198.51.100.123")
        self.assertEqual(r.resolve("2001:db8::1", None), "2001:db8::1")
