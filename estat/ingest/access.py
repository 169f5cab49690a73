# -*- test-case-name: estat.test.test_ingest_access -*-
"""
Who may post events: write keys (optional) and CORS for browsers.

Write keys are compared in constant time against every configured key, and
never logged.  With no keys configured the endpoint is open, as in the
original service.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import unquote_to_bytes

import attr

__all__ = ["CorsPolicy", "WriteKeys", "parse_list", "query_values", "read_keys_file", "split_key"]

KEY_HEADER = b"x-write-key"
KEY_QUERY = (b"write_key", b"key")
_VARY = ((b"vary", b"Origin"),)


def query_values(query: bytes) -> dict:
    """
    C{{name: [value, ...]}} of a raw query string, as bytes.
    (C{urllib.parse.parse_qs} raises on a percent-encoded non-ASCII byte
    given bytes.)
    """
    values: dict = {}
    if not query:
        return values
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        name = unquote_to_bytes(name.replace(b"+", b" "))
        values.setdefault(name, []).append(unquote_to_bytes(value.replace(b"+", b" ")))
    return values


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[,\s]+", text.strip()) if p)


def read_keys_file(path: str) -> tuple[str, ...]:
    """
    One key per line; blank lines and C{#} comments are ignored.
    """
    keys = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(keys)


_SOURCE_NAME = re.compile(rb"^(.+)=([A-Za-z0-9._-]+)$")


def split_key(spec) -> tuple[bytes, str | None]:
    """
    A configured key and its source name: C{key=name} names the source of
    what is sent with C{key} (C{WRITE_KEYS=k1=web,k2=backend}); a plain
    key has none.  The name is what follows the last C{=}, so a base64
    key's trailing C{=} padding stays part of the key.
    """
    if isinstance(spec, str):
        spec = spec.encode("utf-8")
    m = _SOURCE_NAME.match(spec)
    if m is None:
        return spec, None
    return m.group(1), m.group(2).decode("ascii")


@attr.s(frozen=True, init=False)
class WriteKeys:
    """
    @ivar keys: the accepted keys; empty means no key is required.
    @ivar sources: each key's source name, or C{None}.
    """

    keys: tuple = attr.ib()
    sources: tuple = attr.ib()

    def __init__(self, keys=()) -> None:
        pairs = [split_key(k) for k in keys]
        object.__setattr__(self, "keys", tuple(k for k, _ in pairs))
        object.__setattr__(self, "sources", tuple(n for _, n in pairs))

    def source(self, candidate: bytes | None) -> tuple[bool, str | None]:
        """
        Whether C{candidate} is one of the keys and, if so, its source
        name; in constant time, like L{matches}.
        """
        if not candidate:
            return False, None
        found = -1
        for index, key in enumerate(self.keys):
            if hmac.compare_digest(candidate, key):
                found = index
        if found < 0:
            return False, None
        return True, self.sources[found]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def presented(self, request) -> bytes | None:
        """
        The key an L{estat.ingest.core.IngestRequest} carries: C{X-Write-Key},
        C{Authorization: Bearer}, or (for C{navigator.sendBeacon}, which
        cannot set headers) the C{write_key} query parameter.
        """
        headers = request.headers
        value = headers.get(KEY_HEADER)
        if value:
            return value.split(b",", 1)[0].strip()
        auth = headers.get(b"authorization")
        if auth and auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        if request.query:
            args = query_values(request.query)
            for name in KEY_QUERY:
                if args.get(name):
                    return args[name][0]
        return None

    def allows(self, request) -> bool:
        if not self.keys:
            return True
        return self.matches(self.presented(request))

    def matches(self, candidate: bytes | None) -> bool:
        """
        Whether C{candidate} is one of the keys, in constant time.
        """
        if not candidate:
            return False
        ok = False
        for key in self.keys:
            # No early exit: the time does not depend on which key matched.
            ok |= hmac.compare_digest(candidate, key)
        return ok


@attr.s(frozen=True)
class CorsPolicy:
    """
    @ivar origins: allowed origins (C{https://app.example.com}), or C{("*",)}.
    @ivar max_age: how long a browser may cache a preflight answer, seconds.
    """

    origins: tuple = attr.ib(default=())
    max_age: int = attr.ib(default=86400)

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def __attrs_post_init__(self) -> None:
        # The answers are the same for every request from one origin.
        object.__setattr__(self, "_cache", {})

    def allowed_origin(self, request) -> bytes | None:
        if not self.origins:
            return None
        origin = request.headers.get(b"origin")
        if not origin:
            return None
        if self.any_origin:
            return b"*"
        try:
            text = origin.decode("ascii").rstrip("/")
        except UnicodeDecodeError:
            return None
        return origin if text in self.origins else None

    def headers(self, request) -> tuple:
        """
        The CORS response fields for an L{estat.ingest.core.IngestRequest}:
        C{Vary: Origin} always, the allow fields for an allowed origin.
        """
        if not self.origins:
            return _VARY
        origin = self.allowed_origin(request)
        if origin is None:
            return _VARY
        cached = self._cache.get(origin)
        if cached is None:
            cached = _VARY + ((b"access-control-allow-origin", origin),
                              (b"access-control-expose-headers", b"Retry-After"))
            if len(self._cache) < 64:
                self._cache[origin] = cached
        return cached

    def preflight_headers(self, request) -> tuple:
        headers = self.headers(request)
        if self.allowed_origin(request) is None:
            return headers
        return headers + (
            (b"access-control-allow-methods", b"POST, OPTIONS"),
            (b"access-control-allow-headers",
             b"Content-Type, Content-Encoding, X-Write-Key, Authorization"),
            (b"access-control-max-age", b"%d" % self.max_age),
        )
