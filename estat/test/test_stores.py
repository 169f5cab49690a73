# -*- test-case-name: estat.test.test_stores -*-
"""
Tests for the object stores: one contract, L{ObjectStoreTestsMixin}, run
against every L{IObjectStore} (the local directory store, the in-memory
fake, and the S3 store talking to a small in-memory S3), then what is
particular to the local directory store.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from urllib.parse import unquote

from botocore.credentials import Credentials
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from estat.encoder import content_md5
from estat.fsutil import TEMP_PREFIX
from estat.interfaces import IObjectStore, StoreError
from estat.store.local import LocalDirectoryStore
from estat.store.s3 import S3Store
from estat.test.harness import temp_dir
from estat.testing import DeferredThreadRunner, MemoryObjectStore, run_synchronously

KEY = "raw/dt=2023-11-14/hour=22/test-1-20231114T221320000Z-00.jsonl.gz"
OTHER_KEYS = (
    "raw/dt=2023-11-14/hour=23/test-1-20231114T230000000Z-00.jsonl.gz",
    "raw/dt=2023-11-15/hour=00/test-1-20231115T000000000Z-00.jsonl.gz",
    "raw_dlq/dt=2023-11-14/hour=22/test-1-20231114T221320000Z-00.jsonl.gz",
)
BUCKET = "estat-raw"
ENDPOINT = "http://s3.fake.test:9000"


def body(n: int = 0) -> bytes:
    return gzip.compress(b'{"n":%d}\n{"n":%d}\n' % (n, n + 1), mtime=0)


def files_under(root: str) -> dict[str, bytes]:
    """
    Every file under C{root}, by its slash-separated path relative to it.
    """
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return found


class FakeS3(Resource):
    """
    Just enough of S3 for L{S3Store}: signed path-style PUTs of objects
    (checked against their C{Content-MD5}, as S3 does), GET of an object,
    HEAD of the bucket.
    """

    isLeaf = True

    def __init__(self, bucket: str = BUCKET) -> None:
        super().__init__()
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.requests: list[tuple[bytes, bytes]] = []

    def _error(self, request, status: int, code: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/xml")
        return (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>%s</Code>"
                b"<Message>fake S3 says %s</Message></Error>") % (code.encode(), code.encode())

    def render(self, request) -> bytes:
        self.requests.append((request.method, request.uri))
        authorization = request.getHeader(b"authorization") or b""
        if not authorization.startswith(b"AWS4-HMAC-SHA256 Credential="):
            return self._error(request, 403, "AccessDenied")
        _, bucket, *rest = request.path.decode("ascii").split("/", 2)
        if bucket != self.bucket:
            return self._error(request, 404, "NoSuchBucket")
        key = unquote(rest[0]) if rest else ""
        if request.method == b"HEAD" and not key:
            return b""
        if request.method == b"PUT" and key:
            data = request.content.read()
            if request.getHeader(b"content-md5") != content_md5(data).encode():
                return self._error(request, 400, "BadDigest")
            self.objects[key] = data
            request.setHeader(b"etag", b'"%s"' % hashlib.md5(data).hexdigest().encode())
            return b""
        if request.method == b"GET" and key:
            if key not in self.objects:
                return self._error(request, 404, "NoSuchKey")
            return self.objects[key]
        return self._error(request, 405, "MethodNotAllowed")


class ObjectStoreTestsMixin:
    """
    The L{IObjectStore} contract.  A test case using it provides
    C{make_store()}, C{stored(key)} (the bytes kept under C{key}, or
    C{None}) and C{stored_keys()}.
    """

    def setUp(self) -> None:
        self.store = self.make_store()

    def test_interface(self) -> None:
        """
        The store provides L{IObjectStore}, C{description} included.
        """
        self.assertTrue(verifyObject(IObjectStore, self.store))
        self.assertIsInstance(self.store.description, str)

    def test_putThenRead(self) -> None:
        """
        C{put} fires with C{None} once the object is stored, byte for byte,
        under exactly its key.
        """
        data = body()
        self.assertIsNone(self.successResultOf(self.store.put(KEY, data, content_md5(data))))
        self.assertEqual(self.stored(KEY), data)
        self.assertEqual(self.stored_keys(), {KEY})

    def test_putSameKeyOverwrites(self) -> None:
        """
        Putting the same key twice leaves one object holding the second
        body: a retry never makes a duplicate.
        """
        first, second = body(1), body(2)
        self.successResultOf(self.store.put(KEY, first, content_md5(first)))
        self.successResultOf(self.store.put(KEY, second, content_md5(second)))
        self.assertEqual(self.stored(KEY), second)
        self.assertEqual(self.stored_keys(), {KEY})

    def test_partitionedKeys(self) -> None:
        """
        Keys with C{dt=...}/C{hour=...} partitions and several slashes are
        stored as themselves, each apart from the others.
        """
        keys = (KEY,) + OTHER_KEYS
        for n, key in enumerate(keys):
            data = body(n)
            self.successResultOf(self.store.put(key, data, content_md5(data)))
        self.assertEqual(self.stored_keys(), set(keys))
        for n, key in enumerate(keys):
            self.assertEqual(self.stored(key), body(n))

    def test_checkHealthy(self) -> None:
        """
        C{check} fires with C{None} on a healthy store.
        """
        self.assertIsNone(self.successResultOf(self.store.check()))


class LocalDirectoryStoreContractTests(ObjectStoreTestsMixin, SynchronousTestCase):
    def make_store(self) -> LocalDirectoryStore:
        self.root = os.path.join(temp_dir(self), "store")
        return LocalDirectoryStore(root=self.root, run_in_thread=run_synchronously)

    def stored(self, key: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, *key.split("/")), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def stored_keys(self) -> set[str]:
        return set(files_under(self.root))


class MemoryObjectStoreContractTests(ObjectStoreTestsMixin, SynchronousTestCase):
    def make_store(self) -> MemoryObjectStore:
        return MemoryObjectStore()

    def stored(self, key: str) -> bytes | None:
        return self.store.objects.get(key)

    def stored_keys(self) -> set[str]:
        return set(self.store.objects)


class S3StoreContractTests(ObjectStoreTestsMixin, SynchronousTestCase):
    def make_store(self) -> S3Store:
        self.s3 = FakeS3()
        self.clock = Clock()
        return S3Store(
            bucket=BUCKET,
            region="eu-west-1",
            endpoint=ENDPOINT,
            path_style=True,
            credentials=lambda: Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG"),
            http=StubTreq(self.s3),
            clock=self.clock,
            run_in_thread=run_synchronously,
        )

    def stored(self, key: str) -> bytes | None:
        return self.s3.objects.get(key)

    def stored_keys(self) -> set[str]:
        return set(self.s3.objects)

    def test_noTimerLeft(self) -> None:
        """
        A finished put or check leaves no timeout pending on the clock.
        """
        data = body()
        self.successResultOf(self.store.put(KEY, data, content_md5(data)))
        self.successResultOf(self.store.check())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_checkMissingBucket(self) -> None:
        """
        The fake S3 answers as S3 does for another bucket, so the contract
        tests above are not passing by accident.
        """
        self.store.bucket = "not-" + BUCKET
        self.assertEqual(self.failureResultOf(self.store.check(), StoreError).value.code,
                         "NoSuchBucket")


class LocalDirectoryStoreTests(SynchronousTestCase):
    """
    What the local directory store does beyond the contract.
    """

    def setUp(self) -> None:
        self.root = os.path.join(temp_dir(self), "store")
        self.store = LocalDirectoryStore(root=self.root, run_in_thread=run_synchronously)

    def put(self, key: str, data: bytes):
        return self.store.put(key, data, content_md5(data))

    def test_writesUnderRoot(self) -> None:
        """
        The object is the file C{root/<key>}, directories made as needed.
        """
        self.successResultOf(self.put(KEY, body()))
        with open(os.path.join(self.root, "raw", "dt=2023-11-14", "hour=22",
                               "test-1-20231114T221320000Z-00.jsonl.gz"), "rb") as f:
            self.assertEqual(f.read(), body())

    def test_noTemporaryFilesLeft(self) -> None:
        """
        After puts (an overwrite included) only the objects are left: no
        temporary file of the atomic write remains.
        """
        self.successResultOf(self.put(KEY, body(1)))
        self.successResultOf(self.put(KEY, body(2)))
        self.successResultOf(self.put(OTHER_KEYS[0], body(3)))
        names = set(files_under(self.root))
        self.assertEqual(names, {KEY, OTHER_KEYS[0]})
        self.assertFalse([n for n in names if os.path.basename(n).startswith(TEMP_PREFIX)])

    def test_failedRenameLeavesNoPartialFile(self) -> None:
        """
        When the write fails after the data went to the temporary file (the
        final rename is refused: a non-empty directory holds the name), the
        put fails with L{StoreError}, the temporary file is removed, and
        what was there is untouched.
        """
        blocker = os.path.join(self.root, "raw", "obj")
        os.makedirs(blocker)
        with open(os.path.join(blocker, "inside"), "wb") as f:
            f.write(b"kept")
        failure = self.failureResultOf(self.put("raw/obj", body()), StoreError)
        self.assertIsInstance(failure.value.__cause__, OSError)
        self.assertEqual(files_under(self.root), {"raw/obj/inside": b"kept"})
        self.assertEqual(os.listdir(os.path.join(self.root, "raw")), ["obj"])

    def test_parentIsAFile(self) -> None:
        """
        A key whose parent is an existing file fails with L{StoreError}
        (the C{OSError} mapped, named by its type, retryable), and nothing
        is written.
        """
        self.successResultOf(self.put("raw/a", body(1)))
        failure = self.failureResultOf(self.put("raw/a/b", body(2)), StoreError)
        self.assertIn(failure.value.code, ("FileExistsError", "NotADirectoryError"))
        self.assertIsInstance(failure.value.__cause__, OSError)
        self.assertEqual(failure.value.code, type(failure.value.__cause__).__name__)
        self.assertTrue(failure.value.retryable)
        self.assertEqual(files_under(self.root), {"raw/a": body(1)})

    def test_invalidKeys(self) -> None:
        """
        Keys that are empty, climb out of the root, or have empty or dot
        segments are refused with a non-retryable C{InvalidKey}, and
        nothing is written anywhere.
        """
        outside = os.path.dirname(self.root)
        before = sorted(os.listdir(outside))
        for key in ("", "../x", "a//b", "/abs", "a/../../x", "./x", "a/.", "a/", "raw/.."):
            failure = self.failureResultOf(self.put(key, body()), StoreError)
            self.assertEqual(failure.value.code, "InvalidKey", key)
            self.assertFalse(failure.value.retryable, key)
        self.assertEqual(sorted(os.listdir(outside)), before)
        self.assertEqual(files_under(outside), {})

    def test_putRunsInThread(self) -> None:
        """
        C{put} hands the disk work to the thread runner: nothing is written
        and the Deferred has no result until the runner runs it.
        """
        runner = DeferredThreadRunner()
        store = LocalDirectoryStore(root=self.root, run_in_thread=runner)
        d = store.put(KEY, body(), content_md5(body()))
        self.assertNoResult(d)
        self.assertFalse(os.path.exists(self.root))
        self.assertEqual(len(runner.calls), 1)
        runner.run_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(files_under(self.root), {KEY: body()})

    def test_checkRunsInThread(self) -> None:
        """
        C{check} also runs in the thread runner; it creates the root.
        """
        runner = DeferredThreadRunner()
        store = LocalDirectoryStore(root=self.root, run_in_thread=runner)
        d = store.check()
        self.assertNoResult(d)
        self.assertFalse(os.path.exists(self.root))
        runner.run_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(os.path.isdir(self.root))

    def test_checkRootUnderAFile(self) -> None:
        """
        C{check} fails, not retryable, when the root cannot be created.
        """
        parent = os.path.dirname(self.root)
        with open(os.path.join(parent, "file"), "wb"):
            pass
        store = LocalDirectoryStore(root=os.path.join(parent, "file", "store"),
                                    run_in_thread=run_synchronously)
        failure = self.failureResultOf(store.check(), StoreError)
        self.assertIn(failure.value.code, ("FileExistsError", "NotADirectoryError"))
        self.assertFalse(failure.value.retryable)

    def test_description(self) -> None:
        """
        The description names the absolute root.
        """
        self.assertIn(os.path.abspath(self.root), self.store.description)
