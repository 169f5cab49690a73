# -*- test-case-name: estat.test.test_stores -*-
"""
The local directory store: the embedded default when no bucket is set.

It writes each object under C{root/<key>}, exactly the key S3 would get,
atomically (temporary file, fsync, rename), in a worker thread.
"""

from __future__ import annotations

import os
from typing import Callable

import attr
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..fsutil import TEMP_PREFIX, atomic_write
from ..interfaces import IObjectBrowser, IObjectStore, StoreError

__all__ = ["LocalDirectoryStore"]


@implementer(IObjectStore, IObjectBrowser)
@attr.s(slots=True)
class LocalDirectoryStore:
    """
    @ivar root: the directory objects are written under.
    @ivar run_in_thread: C{f, *args -> Deferred}, running C{f} off the
        reactor thread.
    """

    root: str = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()

    @property
    def description(self) -> str:
        return f"directory {os.path.abspath(self.root)}"

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise StoreError("InvalidKey", repr(key), retryable=False)
        return os.path.join(self.root, *parts)

    def _write(self, key: str, body: bytes) -> None:
        try:
            atomic_write(self._path(key), body)
        except OSError as e:
            raise StoreError(type(e).__name__, str(e)) from e

    def put(self, key: str, body: bytes, content_md5: str) -> Deferred:
        return self.run_in_thread(self._write, key, body)

    def _check(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(type(e).__name__, str(e), retryable=False) from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError("AccessDenied", f"{self.root} is not writable", retryable=False)

    def check(self) -> Deferred:
        return self.run_in_thread(self._check)

    def _keys(self, prefix: str) -> list:
        found = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    continue  # a write in progress, not an object yet
                path = os.path.join(directory, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def keys(self, prefix: str) -> Deferred:
        return self.run_in_thread(self._keys, prefix)

    def _read(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError("NoSuchKey", key, retryable=False) from None
        except OSError as e:
            raise StoreError(type(e).__name__, str(e)) from e

    def get(self, key: str) -> Deferred:
        return self.run_in_thread(self._read, key)

    def _remove(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(type(e).__name__, str(e)) from e

    def delete(self, key: str) -> Deferred:
        return self.run_in_thread(self._remove, key)
