# -*- test-case-name: estat.test.test_http_access -*-
"""
Who may post events: write keys (optional) and CORS for browsers.

Write keys are compared in constant time against every configured key, and
never logged.  With no keys configured the endpoint is open, as in the
original service.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import parse_qs

import attr

__all__ = ["CorsPolicy", "WriteKeys", "parse_list", "read_keys_file"]

KEY_HEADER = b"x-write-key"
KEY_QUERY = (b"write_key", b"key")


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


@attr.s(frozen=True)
class WriteKeys:
    """
    @ivar keys: the accepted keys; empty means no key is required.
    """

    keys: tuple = attr.ib(default=(), converter=lambda ks: tuple(
        k.encode("utf-8") if isinstance(k, str) else k for k in ks))

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def presented(self, request) -> bytes | None:
        """
        The key a request carries: C{X-Write-Key}, C{Authorization: Bearer},
        or (for C{navigator.sendBeacon}, which cannot set headers) the
        C{write_key} query parameter.
        """
        value = request.requestHeaders.getRawHeaders(KEY_HEADER)
        if value:
            return value[0].strip()
        auth = request.requestHeaders.getRawHeaders(b"authorization")
        if auth and auth[0][:7].lower() == b"bearer ":
            return auth[0][7:].strip()
        query = request.uri.split(b"?", 1)
        if len(query) == 2:
            args = parse_qs(query[1])
            for name in KEY_QUERY:
                if args.get(name):
                    return args[name][0]
        return None

    def allows(self, request) -> bool:
        if not self.keys:
            return True
        candidate = self.presented(request)
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

    def allowed_origin(self, request) -> bytes | None:
        values = request.requestHeaders.getRawHeaders(b"origin")
        if not values or not self.origins:
            return None
        origin = values[0]
        if self.any_origin:
            return b"*"
        try:
            text = origin.decode("ascii").rstrip("/")
        except UnicodeDecodeError:
            return None
        return origin if text in self.origins else None

    def apply(self, request) -> None:
        """
        Add the CORS response headers for an allowed origin; nothing for
        another.
        """
        origin = self.allowed_origin(request)
        request.setHeader(b"vary", b"Origin")
        if origin is None:
            return
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-expose-headers", b"Retry-After")

    def preflight(self, request) -> None:
        self.apply(request)
        if self.allowed_origin(request) is None:
            return
        request.setHeader(b"access-control-allow-methods", b"POST, OPTIONS")
        request.setHeader(
            b"access-control-allow-headers",
            b"Content-Type, Content-Encoding, X-Write-Key, Authorization")
        request.setHeader(b"access-control-max-age", b"%d" % self.max_age)
