"""
In-memory fakes of Estat's seams, for tests and for anyone embedding the
pipeline: an object store and a dead-letter queue that live in dicts and
lists, and a synchronous stand-in for the thread runner.

Each fake is checked against its interface with C{verifyObject} and runs
the same shared test mixin as the real implementations.
"""

from __future__ import annotations

import gzip
from typing import Callable

import attr
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from .encoder import EncodedObject
from .interfaces import IDeadLetterQueue, IObjectBrowser, IObjectStore, StoreError

__all__ = [
    "MemoryObjectStore",
    "MemoryDeadLetterQueue",
    "run_synchronously",
    "DeferredThreadRunner",
    "read_lines",
]


def run_synchronously(f: Callable, *args, **kwargs) -> Deferred:
    """
    A thread runner that runs C{f} at once, on the calling thread.
    """
    return maybeDeferred(f, *args, **kwargs)


@attr.s
class DeferredThreadRunner:
    """
    A thread runner that runs nothing until the test says so, to show that
    work is handed off rather than done inline.
    """

    calls: list = attr.ib(factory=list)

    def __call__(self, f: Callable, *args, **kwargs) -> Deferred:
        d = Deferred()
        self.calls.append((f, args, kwargs, d))
        return d

    def run_one(self) -> None:
        f, args, kwargs, d = self.calls.pop(0)
        maybeDeferred(f, *args, **kwargs).chainDeferred(d)

    def run_all(self) -> None:
        while self.calls:
            self.run_one()


def read_lines(body: bytes) -> list[bytes]:
    """
    The JSON lines of a gzip JSON Lines object.
    """
    return gzip.decompress(body).splitlines()


@implementer(IObjectStore, IObjectBrowser)
@attr.s
class MemoryObjectStore:
    """
    An object store in a dict.

    @ivar failures: errors to raise, one per C{put}, before succeeding
        again; a L{StoreError} instance, or C{"hang"} for a put that never
        answers (until cancelled).
    @ivar puts: every C{(key, body)} attempted, in order.
    """

    objects: dict = attr.ib(factory=dict)
    failures: list = attr.ib(factory=list)
    puts: list = attr.ib(factory=list)
    check_error: StoreError | None = attr.ib(default=None)
    description: str = "memory"

    def put(self, key: str, body: bytes, content_md5: str) -> Deferred:
        self.puts.append((key, body))
        if self.failures:
            failure = self.failures.pop(0)
            if failure == "hang":
                return Deferred()
            return fail(failure)
        self.objects[key] = body
        return succeed(None)

    def check(self) -> Deferred:
        if self.check_error is not None:
            return fail(self.check_error)
        return succeed(None)

    def keys(self, prefix: str) -> Deferred:
        return succeed(sorted(k for k in self.objects if k.startswith(prefix)))

    def get(self, key: str) -> Deferred:
        if key not in self.objects:
            return fail(StoreError("NoSuchKey", key, retryable=False))
        return succeed(self.objects[key])

    def delete(self, key: str) -> Deferred:
        self.objects.pop(key, None)
        return succeed(None)

    def events(self) -> list[bytes]:
        """
        Every stored line of every object, in key order.
        """
        return [line for key in sorted(self.objects) for line in read_lines(self.objects[key])]


@implementer(IDeadLetterQueue)
@attr.s
class MemoryDeadLetterQueue:
    """
    A dead-letter queue in a list.

    @ivar accept: whether C{put} keeps the object (C{False}: dropped).
    """

    kept: list = attr.ib(factory=list)
    accept: bool = attr.ib(default=True)

    def put(self, encoded: EncodedObject) -> Deferred:
        if self.accept:
            self.kept.append(encoded)
        return succeed(self.accept)


class ManualCommitter:
    """
    The write-ahead log's writer with no thread: L{submit} queues, and
    L{flush} commits everything queued as one group, for real, on the
    calling thread (the same C{commit} the thread runs), then reports it as
    the thread would.  Built like L{estat.wal.writer.GroupCommitter}.
    """

    def __init__(self, directory, first_segment, segment_size, call_from_thread, on_group,
                 sync=None, commit_delay=0.0) -> None:
        import os

        from .wal.writer import GroupCommitter

        self.writer = GroupCommitter(directory, first_segment, segment_size,
                                     call_from_thread, on_group,
                                     sync=sync or os.fdatasync, timer=lambda: 0.0)
        self.on_group = on_group
        self.queued: list = []
        self.stopped = False

    @property
    def segment(self) -> int:
        return self.writer.segment

    def start(self) -> None:
        self.writer._open(self.writer.segment)

    def submit(self, data, max_seq, callback=None) -> None:
        self.queued.append((data, max_seq, callback))

    def flush(self) -> None:
        if self.queued:
            queued, self.queued = self.queued, []
            self.on_group(self.writer.commit(queued))

    def stop(self, on_stopped) -> None:
        import os

        self.flush()
        if self.writer._fd is not None:
            os.close(self.writer._fd)
            self.writer._fd = None
        self.stopped = True
        on_stopped()
