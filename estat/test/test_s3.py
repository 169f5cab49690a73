# -*- test-case-name: estat.test.test_s3 -*-
"""
Tests for L{estat.store.s3}: the signed PUT and HEAD requests S3Store
sends, how it reads S3's answers, its timeout, and its construction from
the configuration.  HTTP goes through L{StubTreq} to a recording resource
(or a scripted fake client); nothing opens a socket.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import re

import attr
from botocore.credentials import Credentials
from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from estat.config import Config
from estat.interfaces import StoreError
from estat.store.s3 import S3Store, botocore_credentials, s3_error_code
from estat.testing import DeferredThreadRunner, run_synchronously

BUCKET = "estat-raw"
REGION = "eu-west-1"
ENDPOINT = "http://s3.fake.test:9000"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY = "raw/dt=2023-11-14/hour=22/test-1-20231114T221320000Z-00.jsonl.gz"
QUOTED_KEY = "raw/dt%3D2023-11-14/hour%3D22/test-1-20231114T221320000Z-00.jsonl.gz"
BODY = gzip.compress(b'{"n":1}\n{"n":2}\n', mtime=0)
# Deliberately not BODY's MD5: the store must send the one it is given.
GIVEN_MD5 = base64.b64encode(b"0123456789abcdef").decode("ascii")

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message>"
             b"<RequestId>4442587FB7D0A2F9</RequestId></Error>")
ACCESS_DENIED = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>"
                 b"<Message>Access Denied</Message></Error>")

_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<access>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/s3/"
    r"aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})$")


@attr.s
class ReceivedRequest:
    method: str = attr.ib()
    uri: str = attr.ib()  # as sent on the wire: path, percent-encoded
    headers: dict = attr.ib()  # lower-case name -> value
    body: bytes = attr.ib()


class RecordingS3(Resource):
    """
    Records every request and answers from a script of C{(code, body)} or
    C{(code, body, headers)} (200 with an empty body once the script runs
    out).  With C{hang} set, it never answers.
    """

    isLeaf = True

    def __init__(self, responses=(), hang: bool = False) -> None:
        super().__init__()
        self.responses = list(responses)
        self.hang = hang
        self.requests: list[ReceivedRequest] = []
        self.pending = []

    def render(self, request):
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = ",".join(v.decode("latin-1") for v in values)
        self.requests.append(ReceivedRequest(
            method=request.method.decode("ascii"), uri=request.uri.decode("ascii"),
            headers=headers, body=request.content.read()))
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        code, body, *headers = self.responses.pop(0) if self.responses else (200, b"")
        request.setResponseCode(code)
        for name, value in (headers[0] if headers else {}).items():
            request.setHeader(name, value)
        return body


@attr.s
class CountingCredentials:
    """
    A credentials function counting its calls; it may hand out a new key
    each time, as a refresh would.
    """

    credentials: list = attr.ib()
    calls: int = attr.ib(default=0)

    def __call__(self):
        creds = self.credentials[min(self.calls, len(self.credentials) - 1)]
        self.calls += 1
        if isinstance(creds, Exception):
            raise creds
        return creds


@attr.s
class FakeResponse:
    code: int = attr.ib()
    body: bytes = attr.ib(default=b"")
    consumed: bool = attr.ib(default=False)

    def content(self):
        self.consumed = True
        return succeed(self.body)


@attr.s
class FakeHTTP:
    """
    A treq-like client answering from a script of L{FakeResponse}s or
    exceptions.
    """

    results: list = attr.ib()
    requests: list = attr.ib(factory=list)

    def request(self, method, url, data=None, headers=None, **kwargs):
        self.requests.append((method, url))
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            return fail(result)
        return succeed(result)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def expected_signature(request: ReceivedRequest, secret: str) -> str:
    """
    The SigV4 signature of C{request} exactly as it arrived, computed from
    the specification, for comparison with the one it carries.
    """
    m = _AUTHORIZATION.match(request.headers["authorization"])
    signed = m.group("signed").split(";")
    canonical_headers = "".join(
        f"{name}:{' '.join(request.headers[name].split())}\n" for name in signed)
    path, _, query = request.uri.partition("?")
    canonical_request = "\n".join([
        request.method, path, query, canonical_headers, ";".join(signed),
        request.headers["x-amz-content-sha256"]])
    scope = f"{m.group('date')}/{m.group('region')}/s3/aws4_request"
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256", request.headers["x-amz-date"], scope,
        hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    key = _hmac(("AWS4" + secret).encode("utf-8"), m.group("date"))
    for part in (m.group("region"), "s3", "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


class S3StoreTestsMixin:
    def make_store(self, resource=None, credentials=None, run_in_thread=run_synchronously,
                   http=None, path_style=True, endpoint=ENDPOINT, timeout=3.0) -> S3Store:
        self.clock = Clock()
        self.s3 = resource if resource is not None else RecordingS3()
        self.credentials = credentials or CountingCredentials(
            [Credentials(ACCESS_KEY, SECRET_KEY)])
        self.store = S3Store(
            bucket=BUCKET,
            region=REGION,
            endpoint=endpoint,
            path_style=path_style,
            credentials=self.credentials,
            http=http if http is not None else StubTreq(self.s3),
            clock=self.clock,
            run_in_thread=run_in_thread,
            timeout=timeout,
        )
        return self.store

    def put_error(self, code: int, body: bytes = b"") -> StoreError:
        self.make_store(RecordingS3([(code, body)]))
        return self.failureResultOf(self.store.put(KEY, BODY, GIVEN_MD5), StoreError).value


class PutRequestTests(S3StoreTestsMixin, SynchronousTestCase):
    """
    What one PUT carries.
    """

    def put(self) -> ReceivedRequest:
        self.assertIsNone(self.successResultOf(self.store.put(KEY, BODY, GIVEN_MD5)))
        self.assertEqual(len(self.s3.requests), 1)
        return self.s3.requests[0]

    def test_headers(self) -> None:
        """
        The PUT carries the body, a SigV4 Authorization for the access key
        and the region's s3 scope, X-Amz-Date, the body's SHA-256, the
        given Content-MD5, the JSON Lines content type, gzip encoding, and
        the URL's host.
        """
        self.make_store()
        request = self.put()
        self.assertEqual(request.method, "PUT")
        self.assertEqual(request.body, BODY)
        m = _AUTHORIZATION.match(request.headers["authorization"])
        self.assertIsNotNone(m, request.headers["authorization"])
        self.assertEqual((m.group("access"), m.group("region")), (ACCESS_KEY, REGION))
        self.assertRegex(request.headers["x-amz-date"], r"^\d{8}T\d{6}Z$")
        self.assertEqual(request.headers["x-amz-date"][:8], m.group("date"))
        self.assertEqual(request.headers["x-amz-content-sha256"], hashlib.sha256(BODY).hexdigest())
        self.assertEqual(request.headers["content-md5"], GIVEN_MD5)
        self.assertEqual(request.headers["content-type"], "application/x-ndjson")
        self.assertEqual(request.headers["content-encoding"], "gzip")
        self.assertEqual(request.headers["host"], "s3.fake.test:9000")
        self.assertEqual(request.headers["content-length"], str(len(BODY)))

    def test_signedHeaders(self) -> None:
        """
        The signature covers the host, the body's checksums, its type and
        the date; without a session token there is no token header.
        """
        self.make_store()
        request = self.put()
        m = _AUTHORIZATION.match(request.headers["authorization"])
        signed = set(m.group("signed").split(";"))
        self.assertTrue({"host", "content-md5", "content-type", "x-amz-date",
                         "x-amz-content-sha256"} <= signed, signed)
        self.assertNotIn("x-amz-security-token", signed)
        self.assertNotIn("x-amz-security-token", request.headers)

    def test_sessionToken(self) -> None:
        """
        Temporary credentials (an ECS task role) send their session token,
        and the signature covers it.
        """
        self.make_store(credentials=CountingCredentials(
            [Credentials(ACCESS_KEY, SECRET_KEY, "FwoGZXIvYXdzEXAMPLETOKEN")]))
        request = self.put()
        self.assertEqual(request.headers["x-amz-security-token"], "FwoGZXIvYXdzEXAMPLETOKEN")
        signed = _AUTHORIZATION.match(request.headers["authorization"]).group("signed").split(";")
        self.assertIn("x-amz-security-token", signed)

    def test_signatureMatchesRequestAsSent(self) -> None:
        """
        The signature is right for the request as it arrived (method,
        encoded path, headers, payload hash): what was signed is what was
        sent.
        """
        self.make_store(credentials=CountingCredentials(
            [Credentials(ACCESS_KEY, SECRET_KEY, "FwoGZXIvYXdzEXAMPLETOKEN")]))
        request = self.put()
        signature = _AUTHORIZATION.match(request.headers["authorization"]).group("signature")
        self.assertEqual(signature, expected_signature(request, SECRET_KEY))
        self.assertNotEqual(signature, expected_signature(request, SECRET_KEY + "x"))

    def test_eachAttemptSignedAfresh(self) -> None:
        """
        Every put asks for credentials and signs again, so a refreshed key
        is used at once.
        """
        self.make_store(credentials=CountingCredentials([
            Credentials(ACCESS_KEY, SECRET_KEY), Credentials("AKIDROTATED", SECRET_KEY)]))
        self.successResultOf(self.store.put(KEY, BODY, GIVEN_MD5))
        self.successResultOf(self.store.put(KEY, BODY, GIVEN_MD5))
        self.assertEqual(self.credentials.calls, 2)
        keys = [_AUTHORIZATION.match(r.headers["authorization"]).group("access")
                for r in self.s3.requests]
        self.assertEqual(keys, [ACCESS_KEY, "AKIDROTATED"])

    def test_signingRunsInThread(self) -> None:
        """
        Credentials and signing run in the thread runner: until it runs,
        no credentials are asked for and no request is sent.
        """
        runner = DeferredThreadRunner()
        self.make_store(run_in_thread=runner)
        d = self.store.put(KEY, BODY, GIVEN_MD5)
        self.assertNoResult(d)
        self.assertEqual(self.s3.requests, [])
        self.assertEqual(self.credentials.calls, 0)
        self.assertEqual([call[0] for call in runner.calls], [self.store.sign])
        runner.run_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.credentials.calls, 1)
        self.assertEqual(len(self.s3.requests), 1)

    def test_pathStyleURL(self) -> None:
        """
        Path style puts the bucket in the path and percent-encodes the key
        (C{=} as C{%3D}), keeping its slashes.
        """
        self.make_store()
        self.assertEqual(self.store.url(KEY), f"{ENDPOINT}/{BUCKET}/{QUOTED_KEY}")
        request = self.put()
        self.assertEqual(request.uri, f"/{BUCKET}/{QUOTED_KEY}")

    def test_virtualHostedURL(self) -> None:
        """
        Without an endpoint URL the store talks to AWS, bucket in the host
        name: C{https://<bucket>.s3.<region>.amazonaws.com/<key>}.
        """
        config = Config.defaults(raw_bucket=BUCKET, aws_region="ap-northeast-2", s3_timeout=7.0)
        credentials = CountingCredentials([Credentials(ACCESS_KEY, SECRET_KEY)])
        store = S3Store.from_config(config, reactor=MemoryReactorClock(),
                                    run_in_thread=run_synchronously, credentials=credentials)
        self.assertEqual(store.url(KEY),
                         f"https://{BUCKET}.s3.ap-northeast-2.amazonaws.com/{QUOTED_KEY}")
        self.assertEqual((store.bucket, store.region, store.timeout),
                         (BUCKET, "ap-northeast-2", 7.0))
        s3 = RecordingS3()
        store.http = StubTreq(s3)
        self.successResultOf(store.put(KEY, BODY, GIVEN_MD5))
        [request] = s3.requests
        self.assertEqual(request.uri, f"/{QUOTED_KEY}")
        self.assertEqual(request.headers["host"], f"{BUCKET}.s3.ap-northeast-2.amazonaws.com")
        m = _AUTHORIZATION.match(request.headers["authorization"])
        self.assertEqual(m.group("region"), "ap-northeast-2")
        self.assertEqual(m.group("signature"), expected_signature(request, SECRET_KEY))

    def test_endpointFromConfig(self) -> None:
        """
        With C{S3_ENDPOINT_URL} (MinIO, moto) the default addressing is
        path style against that endpoint; C{virtual} puts the bucket in
        its host name.
        """
        credentials = CountingCredentials([Credentials(ACCESS_KEY, SECRET_KEY)])
        store = S3Store.from_config(
            Config.defaults(raw_bucket=BUCKET, s3_endpoint_url="http://127.0.0.1:9000/"),
            reactor=MemoryReactorClock(), run_in_thread=run_synchronously,
            credentials=credentials)
        self.assertEqual(store.url(KEY), f"http://127.0.0.1:9000/{BUCKET}/{QUOTED_KEY}")
        store = S3Store.from_config(
            Config.defaults(raw_bucket=BUCKET, s3_endpoint_url="http://minio.test:9000",
                            s3_addressing_style="virtual"),
            reactor=MemoryReactorClock(), run_in_thread=run_synchronously,
            credentials=credentials)
        self.assertEqual(store.url(KEY), f"http://{BUCKET}.minio.test:9000/{QUOTED_KEY}")


class PutErrorTests(S3StoreTestsMixin, SynchronousTestCase):
    """
    How S3's answers become L{StoreError}s.
    """

    def test_slowDown(self) -> None:
        error = self.put_error(503, SLOW_DOWN)
        self.assertEqual((error.code, error.retryable), ("SlowDown", True))
        self.assertEqual(error.message, "Please reduce your request rate.")

    def test_accessDenied(self) -> None:
        error = self.put_error(403, ACCESS_DENIED)
        self.assertEqual((error.code, error.retryable), ("AccessDenied", False))

    def test_serverErrorWithoutBody(self) -> None:
        error = self.put_error(500)
        self.assertEqual((error.code, error.retryable), ("HTTP500", True))

    def test_tooManyRequestsWithoutBody(self) -> None:
        error = self.put_error(429)
        self.assertEqual((error.code, error.retryable), ("HTTP429", True))

    def test_retryableCodeOn4xx(self) -> None:
        """
        Some 4xx codes are worth a retry (a corrupted upload, a clock skew).
        """
        error = self.put_error(400, b"<Error><Code>BadDigest</Code></Error>")
        self.assertEqual((error.code, error.retryable), ("BadDigest", True))
        error = self.put_error(403, b"<Error><Code>RequestTimeTooSkewed</Code></Error>")
        self.assertEqual((error.code, error.retryable), ("RequestTimeTooSkewed", True))

    def test_noSuchBucket(self) -> None:
        error = self.put_error(404, b"<Error><Code>NoSuchBucket</Code></Error>")
        self.assertEqual((error.code, error.retryable), ("NoSuchBucket", False))

    def test_wrongRegion(self) -> None:
        """
        A PUT to a bucket in another region gets S3's 301
        C{PermanentRedirect} document: that code, not retryable, and the
        redirect is not followed.
        """
        body = (b"<Error><Code>PermanentRedirect</Code><Message>The bucket you are "
                b"attempting to access must be addressed using the specified endpoint."
                b"</Message><Endpoint>estat-raw.s3.us-east-1.amazonaws.com</Endpoint></Error>")
        error = self.put_error(301, body)
        self.assertEqual((error.code, error.retryable), ("PermanentRedirect", False))
        self.assertEqual(len(self.s3.requests), 1)

    def test_anyOtherSuccessCodeIsAnError(self) -> None:
        """
        Only 200 means stored.
        """
        error = self.put_error(204)
        self.assertEqual(error.code, "HTTP204")

    def test_noCredentials(self) -> None:
        """
        When no credentials can be found, the put fails with
        C{NoCredentials} and nothing is sent.
        """
        self.make_store(credentials=CountingCredentials(
            [StoreError("NoCredentials", "none found")]))
        error = self.failureResultOf(self.store.put(KEY, BODY, GIVEN_MD5), StoreError).value
        self.assertEqual(error.code, "NoCredentials")
        self.assertEqual(self.s3.requests, [])

    def test_timeout(self) -> None:
        """
        An S3 that never answers fails the put with C{Timeout} (retryable)
        after C{timeout} seconds, and no timer is left behind.
        """
        self.make_store(RecordingS3(hang=True), timeout=3.0)
        d = self.store.put(KEY, BODY, GIVEN_MD5)
        self.assertEqual(len(self.s3.requests), 1)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, StoreError).value
        self.assertEqual((error.code, error.retryable), ("Timeout", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutCoversSigning(self) -> None:
        """
        The timeout also bounds a slow credential refresh.
        """
        runner = DeferredThreadRunner()
        self.make_store(run_in_thread=runner, timeout=3.0)
        d = self.store.put(KEY, BODY, GIVEN_MD5)
        self.clock.advance(3.0)
        self.assertEqual(self.failureResultOf(d, StoreError).value.code, "Timeout")

    def test_cancelled(self) -> None:
        """
        A cancelled put (the shutdown deadline) fails with C{Cancelled}.
        """
        self.make_store(RecordingS3(hang=True))
        d = self.store.put(KEY, BODY, GIVEN_MD5)
        d.cancel()
        self.assertEqual(self.failureResultOf(d, StoreError).value.code, "Cancelled")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionFailures(self) -> None:
        """
        Connection failures get codes of their own, all retryable.
        """
        cases = [
            (ConnectionRefusedError(), "ConnectionRefused"),
            (DNSLookupError("s3.fake.test"), "DNSLookupError"),
            (ResponseNeverReceived([Failure(Exception("lost"))]), "ConnectionLost"),
            (ValueError("odd"), "ValueError"),
        ]
        for exception, code in cases:
            self.make_store(http=FakeHTTP([exception]))
            error = self.failureResultOf(self.store.put(KEY, BODY, GIVEN_MD5), StoreError).value
            self.assertEqual((error.code, error.retryable), (code, True), exception)

    def test_bodyAlwaysRead(self) -> None:
        """
        The response body is read whatever the status, so the connection
        can go back to the pool.
        """
        responses = [FakeResponse(200), FakeResponse(503, SLOW_DOWN), FakeResponse(403),
                     FakeResponse(200), FakeResponse(404), FakeResponse(500, b"oops")]
        self.make_store(http=FakeHTTP(list(responses)))
        self.successResultOf(self.store.put(KEY, BODY, GIVEN_MD5))
        self.failureResultOf(self.store.put(KEY, BODY, GIVEN_MD5), StoreError)
        self.failureResultOf(self.store.put(KEY, BODY, GIVEN_MD5), StoreError)
        self.successResultOf(self.store.check())
        self.failureResultOf(self.store.check(), StoreError)
        self.failureResultOf(self.store.check(), StoreError)
        self.assertEqual([r.consumed for r in responses], [True] * len(responses))


class CheckTests(S3StoreTestsMixin, SynchronousTestCase):
    """
    The start-up HeadBucket.
    """

    def check_error(self, code: int) -> StoreError:
        self.make_store(RecordingS3([(code, b"")]))
        return self.failureResultOf(self.store.check(), StoreError).value

    def test_ok(self) -> None:
        """
        A 200 to a signed HEAD of the bucket passes.
        """
        self.make_store()
        self.assertIsNone(self.successResultOf(self.store.check()))
        [request] = self.s3.requests
        self.assertEqual((request.method, request.uri), ("HEAD", f"/{BUCKET}/"))
        self.assertEqual(_AUTHORIZATION.match(request.headers["authorization"]).group("access"),
                         ACCESS_KEY)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noSuchBucket(self) -> None:
        error = self.check_error(404)
        self.assertEqual((error.code, error.retryable), ("NoSuchBucket", False))
        self.assertIn(BUCKET, error.message)

    def test_accessDenied(self) -> None:
        error = self.check_error(403)
        self.assertEqual((error.code, error.retryable), ("AccessDenied", False))

    def test_wrongRegion(self) -> None:
        """
        S3 answers a HEAD of a bucket in another region with a 301 and no
        C{Location}: a C{PermanentRedirect}, not retryable.
        """
        self.make_store(RecordingS3([(301, b"", {b"x-amz-bucket-region": b"us-east-1"})]))
        error = self.failureResultOf(self.store.check(), StoreError).value
        self.assertEqual((error.code, error.retryable), ("PermanentRedirect", False))

    def test_redirectNotFollowed(self) -> None:
        """
        A redirect is reported, never followed: the signed request is only
        valid for the host it was signed for.
        """
        self.make_store(RecordingS3([
            (301, b"", {b"location": b"http://elsewhere.test/estat-raw/"}), (200, b"")]))
        error = self.failureResultOf(self.store.check(), StoreError).value
        self.assertEqual(error.code, "PermanentRedirect")
        self.assertEqual(len(self.s3.requests), 1)

    def test_otherStatus(self) -> None:
        self.assertEqual(self.check_error(500).code, "HTTP500")

    def test_timeoutAtLeastFiveSeconds(self) -> None:
        """
        The check waits at least 5 s, even with a shorter upload timeout.
        """
        self.make_store(RecordingS3(hang=True), timeout=1.0)
        d = self.store.check()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.failureResultOf(d, StoreError).value.code, "Timeout")


class S3ErrorCodeTests(SynchronousTestCase):
    """
    L{s3_error_code} reads S3's error document.
    """

    def test_codeAndMessage(self) -> None:
        self.assertEqual(s3_error_code(503, SLOW_DOWN),
                         ("SlowDown", "Please reduce your request rate."))

    def test_codeWithoutMessage(self) -> None:
        self.assertEqual(s3_error_code(400, b"<Error><Code>InvalidArgument</Code></Error>"),
                         ("InvalidArgument", ""))

    def test_noBody(self) -> None:
        self.assertEqual(s3_error_code(500, b""), ("HTTP500", ""))
        self.assertEqual(s3_error_code(404, None), ("HTTP404", ""))

    def test_notS3(self) -> None:
        """
        A proxy's HTML page gives a code made from the status.
        """
        page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.assertEqual(s3_error_code(502, page), ("HTTP502", ""))

    def test_boundedCode(self) -> None:
        """
        An absurdly long "code" is not taken as one.
        """
        body = b"<Error><Code>" + b"X" * 5000 + b"</Code></Error>"
        self.assertEqual(s3_error_code(400, body)[0], "HTTP400")


class BotocoreCredentialsTests(SynchronousTestCase):
    def test_fromGivenEnvironment(self) -> None:
        """
        Credentials come from the environment mapping given, not from the
        process environment (which this test neither reads nor changes).
        """
        environ = {
            "AWS_ACCESS_KEY_ID": "AKIDFROMENVIRON",
            "AWS_SECRET_ACCESS_KEY": "secret-from-environ",
            "AWS_SESSION_TOKEN": "token-from-environ",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/estat-test/credentials",
            "AWS_CONFIG_FILE": "/nonexistent/estat-test/config",
        }
        creds = botocore_credentials(environ)()
        self.assertEqual((creds.access_key, creds.secret_key, creds.token),
                         ("AKIDFROMENVIRON", "secret-from-environ", "token-from-environ"))
