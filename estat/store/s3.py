# -*- test-case-name: estat.test.test_s3 -*-
"""
The S3 object store: one signed PUT per object with treq over a persistent
connection pool.

botocore only resolves credentials (its default chain: environment,
shared config and profile, the ECS/Fargate container provider, instance
metadata) and signs (C{S3SigV4Auth}).  Both can block -- a credential
refresh fetches over HTTP with retries and sleeps, and signing a plain-HTTP
request hashes the body -- so each attempt is signed in a worker thread;
the reactor never waits on botocore.

Each attempt is signed afresh, carries C{Content-MD5}, is bounded by
C{S3_TIMEOUT} (request and response body together), and always reads the
response body.  There are no hidden retries: the uploader decides.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

import attr
import treq
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError as ConnectTimeoutError,
)
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived, _HTTP11ClientFactory
from zope.interface import implementer

from ..interfaces import IObjectBrowser, IObjectStore, StoreError

__all__ = ["S3Store", "s3_error_code", "botocore_credentials"]

CONTENT_TYPE = "application/x-ndjson"
CONTENT_ENCODING = "gzip"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


def content_headers(key: str) -> dict:
    """
    The object's C{Content-Type} (and C{Content-Encoding}), from the key's
    suffix alone: the store knows nothing else of formats.
    """
    if key.endswith(".parquet"):
        return {"Content-Type": PARQUET_CONTENT_TYPE}
    return {"Content-Type": CONTENT_TYPE, "Content-Encoding": CONTENT_ENCODING}

#: Error codes worth an immediate retry; others go to the dead-letter
#: queue at once (which still retries them later, with backoff).
_RETRYABLE_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired", "BadDigest",
    "OperationAborted", "Throttling", "ThrottlingException",
}

_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")


def s3_error_code(status: int, body: bytes) -> tuple[str, str]:
    """
    S3's error code and message from an error response, or a name made
    from the status when the body has none (a HEAD, a proxy's page).
    """
    m = _CODE.search(body or b"")
    code = m.group(1).decode("utf-8", "replace") if m else f"HTTP{status}"
    m = _MESSAGE.search(body or b"")
    message = m.group(1).decode("utf-8", "replace") if m else ""
    return code, message


def _retryable(status: int, code: str) -> bool:
    return status >= 500 or status == 429 or code in _RETRYABLE_CODES


def botocore_credentials(environ: Mapping[str, str] | None = None) -> Callable[[], object]:
    """
    A function returning frozen credentials from botocore's default chain.
    It may block for seconds (metadata endpoints): call it in a thread.
    """
    import botocore.session

    session = botocore.session.get_session()
    if environ is not None:
        # botocore's environment provider reads os.environ unless told.
        session.get_component("credential_provider").get_provider("env").environ = environ
    state = {}

    def get():
        creds = state.get("creds")
        if creds is None:
            creds = session.get_credentials()
            if creds is None:
                raise StoreError("NoCredentials",
                                 "no AWS credentials found by botocore's default chain")
            state["creds"] = creds
        # RefreshableCredentials refreshes here when they are about to expire.
        return creds.get_frozen_credentials()

    return get


@attr.s(frozen=True, slots=True)
class SignedRequest:
    url: str = attr.ib()
    headers: dict = attr.ib()


@implementer(IObjectStore, IObjectBrowser)
@attr.s(eq=False)
class S3Store:
    """
    @ivar bucket: C{RAW_BUCKET}.
    @ivar endpoint: scheme://host[:port] of the service, without the bucket.
    @ivar path_style: whether the bucket is in the path (S3-compatible
        stores, tests) or in the host name (AWS's virtual-hosted style).
    @ivar credentials: returns botocore credentials; blocking, run in a
        thread.
    @ivar http: a treq C{HTTPClient}.
    """

    log = Logger()

    bucket: str = attr.ib()
    region: str = attr.ib()
    endpoint: str = attr.ib()
    path_style: bool = attr.ib()
    credentials: Callable[[], object] = attr.ib()
    http: treq.client.HTTPClient = attr.ib()
    clock = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    timeout: float = attr.ib(default=3.0)
    #: The treq client's own agent, without its gzip decoding: a GET gives
    #: back the stored bytes, not their decompression.
    agent: object = attr.ib(default=None)

    @classmethod
    def from_config(cls, config, reactor, run_in_thread, environ=None,
                    credentials=None) -> "S3Store":
        from twisted.web.client import Agent

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool._factory = _QuietClientFactory
        pool.maxPersistentPerHost = max(2, config.max_pending_batches + 2)
        # S3 closes idle connections after about 20 s; never reuse one
        # that old.  And no automatic retry: the uploader decides.
        pool.cachedConnectionTimeout = 15
        pool.retryAutomatically = False
        agent = Agent(reactor, pool=pool)
        http = treq.client.HTTPClient(agent)
        if config.s3_endpoint_url:
            endpoint = config.s3_endpoint_url.rstrip("/")
            path_style = config.s3_addressing_style != "virtual"
        else:
            endpoint = f"https://s3.{config.aws_region}.amazonaws.com"
            path_style = config.s3_addressing_style == "path"
        store = cls(
            bucket=config.raw_bucket,
            region=config.aws_region,
            endpoint=endpoint,
            path_style=path_style,
            credentials=credentials or botocore_credentials(environ),
            http=http,
            clock=reactor,
            run_in_thread=run_in_thread,
            timeout=config.s3_timeout,
            agent=agent,
        )
        store.pool = pool
        return store

    @property
    def description(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def url(self, key: str = "") -> str:
        path = quote(key, safe="/~")
        if self.path_style:
            return f"{self.endpoint}/{self.bucket}/{path}"
        scheme, host = self.endpoint.split("://", 1)
        return f"{scheme}://{self.bucket}.{host}/{path}"

    def sign(self, method: str, url: str, body: bytes = b"",
             headers: Mapping[str, str] | None = None) -> SignedRequest:
        """
        Sign one request (in a worker thread: it may refresh credentials
        and hash the body).  The returned headers are exactly the ones to
        send, C{Host} included.
        """
        creds = self.credentials()
        all_headers = {"Host": urlsplit(url).netloc}
        all_headers.update(headers or {})
        request = AWSRequest(method=method, url=url, data=body, headers=all_headers)
        S3SigV4Auth(creds, "s3", self.region).add_auth(request)
        return SignedRequest(url=url, headers=dict(request.headers.items()))

    def put(self, key: str, body: bytes, content_md5: str) -> Deferred:
        d = Deferred.fromCoroutine(self._put(key, body, content_md5))
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._classify, "PUT", key)
        return d

    async def _put(self, key: str, body: bytes, content_md5: str) -> None:
        signed = await self.run_in_thread(
            self.sign, "PUT", self.url(key), body,
            {"Content-MD5": content_md5, **content_headers(key)})
        # Never follow a redirect: S3's 301 means a wrong region, and a
        # followed request would carry a signature for another host.
        response = await _cancellable(self.http.request(
            "PUT", signed.url, data=body, headers=_headers(signed.headers),
            allow_redirects=False))
        content = await _cancellable(response.content())
        if response.code != 200:
            code, message = s3_error_code(response.code, content)
            raise StoreError(code, message, retryable=_retryable(response.code, code))

    def check(self) -> Deferred:
        """
        HeadBucket: is the bucket there and are the credentials good?
        (Needs C{s3:ListBucket} on the bucket; without it S3 answers 403.)
        """
        d = Deferred.fromCoroutine(self._check())
        d.addTimeout(max(self.timeout, 5.0), self.clock)
        d.addErrback(self._classify, "HEAD", "")
        return d

    async def _check(self) -> None:
        signed = await self.run_in_thread(self.sign, "HEAD", self.url(""))
        response = await _cancellable(
            self.http.request("HEAD", signed.url, headers=_headers(signed.headers),
                              allow_redirects=False))
        await _cancellable(response.content())
        if response.code == 404:
            raise StoreError("NoSuchBucket", f"bucket {self.bucket!r} does not exist",
                             retryable=False)
        if response.code == 403:
            raise StoreError("AccessDenied",
                             "403 Forbidden: credentials invalid, or s3:ListBucket not "
                             "granted for the start-up check", retryable=False)
        if response.code == 301:
            raise StoreError("PermanentRedirect",
                             f"bucket is not in region {self.region}", retryable=False)
        if response.code != 200:
            raise StoreError(f"HTTP{response.code}", "unexpected answer to HeadBucket")

    # --- reading back (estat-badrows resubmit; the server never lists) ------

    def _bounded(self, coroutine, method: str, key: str) -> Deferred:
        d = Deferred.fromCoroutine(coroutine)
        d.addTimeout(max(self.timeout, 10.0), self.clock)
        d.addErrback(self._classify, method, key)
        return d

    async def _request(self, method: str, url: str) -> tuple:
        signed = await self.run_in_thread(self.sign, method, url)
        response = await _cancellable(self.http.request(
            method, signed.url, headers=_headers(signed.headers), allow_redirects=False))
        content = await _cancellable(response.content())
        return response.code, content

    def _raise(self, code: int, content: bytes) -> None:
        error, message = s3_error_code(code, content)
        raise StoreError(error, message, retryable=_retryable(code, error))

    def keys(self, prefix: str) -> Deferred:
        """
        ListObjectsV2, every page, under C{prefix}.
        """
        return Deferred.fromCoroutine(self._keys(prefix))

    async def _keys(self, prefix: str) -> list:
        from xml.etree import ElementTree

        found, token = [], None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            url = self.url("") + "?" + urlencode(sorted(query.items()), quote_via=quote)
            code, content = await self._bounded(self._request("GET", url), "LIST", prefix)
            if code != 200:
                self._raise(code, content)
            root = ElementTree.fromstring(content)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            found.extend(e.findtext(f"{ns}Key") for e in root.iter(f"{ns}Contents"))
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return sorted(found)

    def get(self, key: str) -> Deferred:
        return self._bounded(self._get(key), "GET", key)

    async def _get(self, key: str) -> bytes:
        if self.agent is None:
            code, content = await self._request("GET", self.url(key))
        else:
            from twisted.web.client import readBody
            from twisted.web.http_headers import Headers

            signed = await self.run_in_thread(self.sign, "GET", self.url(key))
            response = await _cancellable(self.agent.request(
                b"GET", signed.url.encode("ascii"), Headers(_headers(signed.headers))))
            code, content = response.code, await _cancellable(readBody(response))
        if code == 404:
            raise StoreError("NoSuchKey", key, retryable=False)
        if code != 200:
            self._raise(code, content)
        return content

    def delete(self, key: str) -> Deferred:
        return self._bounded(self._delete(key), "DELETE", key)

    async def _delete(self, key: str) -> None:
        code, content = await self._request("DELETE", self.url(key))
        if code not in (200, 204, 404):
            self._raise(code, content)

    def _classify(self, failure, method: str, key: str):
        """
        Every failure becomes a L{StoreError} with a code for the metrics.
        """
        if failure.check(StoreError):
            return failure
        if failure.check(TimeoutError):
            raise StoreError("Timeout", f"{method} took longer than {self.timeout}s")
        if failure.check(CancelledError):
            raise StoreError("Cancelled", f"{method} cancelled")
        if failure.check(ConnectionRefusedError):
            raise StoreError("ConnectionRefused", failure.getErrorMessage())
        if failure.check(DNSLookupError):
            raise StoreError("DNSLookupError", failure.getErrorMessage())
        if failure.check(ConnectTimeoutError, ConnectError):
            raise StoreError("ConnectError", failure.getErrorMessage())
        if failure.check(ResponseNeverReceived, ResponseFailed):
            # The request may or may not have been stored: the retry writes
            # the same key, so either way nothing is duplicated.
            raise StoreError("ConnectionLost", "connection closed before a full response")
        raise StoreError(type(failure.value).__name__, failure.getErrorMessage())


async def _cancellable(d: Deferred):
    """
    Await C{d}; when it was cancelled (by the per-attempt timeout or by the
    uploader's hurry), fail with C{CancelledError} as a cancelled Deferred
    should -- the HTTP client reports it wrapped in C{ResponseNeverReceived}
    or C{ResponseFailed}, which would hide a timeout as a lost connection.
    """
    try:
        return await d
    except (ResponseNeverReceived, ResponseFailed) as e:
        if any(r.check(CancelledError) for r in e.reasons):
            raise CancelledError() from None
        raise


class _QuietClientFactory(_HTTP11ClientFactory):
    # No "Starting factory" log lines for every new S3 connection.
    noisy = False


def _headers(headers: Mapping[str, str]) -> dict:
    return {k.encode("latin-1"): [v.encode("latin-1") if isinstance(v, str) else v]
            for k, v in headers.items()}
