"""
The seams of the pipeline, where one implementation can replace another:
the object store (S3, a local directory, memory) and the dead-letter queue
(a local directory, memory).  Each has an in-memory fake in
L{estat.testing} and one shared test mixin run against every
implementation.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IEncoder", "IObjectStore", "IObjectBrowser", "IDeadLetterQueue", "StoreError"]


class StoreError(Exception):
    """
    An object could not be stored.

    @ivar code: a short name for logs and the errors-by-code metric: S3's
        error code (C{SlowDown}, C{AccessDenied}, ...) or a failure kind
        (C{Timeout}, C{ConnectionRefused}, C{OSError}, ...).
    @ivar retryable: whether trying again may succeed.
    """

    def __init__(self, code: str, message: str = "", retryable: bool = True) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retryable = retryable


class IObjectStore(Interface):
    """
    Where encoded batches go.  Putting the same key twice overwrites: a
    retry after an ambiguous failure never makes a second object.
    """

    description = Attribute("A short text for logs, e.g. 's3://bucket' or a path.")

    def put(key, body, content_md5):
        """
        Store C{body} (gzip JSON Lines bytes) under C{key}.

        @param content_md5: base64 MD5 of C{body}; a store that can check
            integrity in transit does.
        @return: a Deferred that fires with C{None} once the object is
            durably stored, or fails with L{StoreError}.  It must never
            block the reactor thread.
        """

    def check():
        """
        Check at start-up that the store can be written to, as far as that
        can be known without writing.

        @return: a Deferred firing with C{None}, or failing with
            L{StoreError} naming the problem.
        """


class IObjectBrowser(Interface):
    """
    Reading back and removing stored objects: what C{estat-badrows
    resubmit} needs of a store (the server itself only puts).
    """

    def keys(prefix):
        """
        @return: a Deferred firing with the sorted list of every key that
            starts with C{prefix}.
        """

    def get(key):
        """
        @return: a Deferred firing with the object's bytes, or failing with
            L{StoreError} (code C{NoSuchKey} when there is none).
        """

    def delete(key):
        """
        Remove the object under C{key}; removing a missing key succeeds.

        @return: a Deferred firing with C{None}.
        """


class IDeadLetterQueue(Interface):
    """
    Where encoded objects go when the store would not take them, to be
    retried later under the same key.
    """

    def put(encoded):
        """
        Keep an L{estat.encoder.EncodedObject} for a later retry.

        @return: a Deferred firing with C{True} once it is durably kept, or
            C{False} when it had to be dropped (over the size limit, disk
            full, ...), in which case the events are already counted as
            dropped.  It never fails.
        """


class IEncoder(Interface):
    """
    One output format: a sealed batch becomes the objects to store.
    """

    stream = Attribute("The stream whose batches it encodes (collect, segment).")
    suffix = Attribute("The key suffix of its objects, e.g. '.jsonl.gz' or '.parquet'.")

    def encode(batch):
        """
        Encode an L{estat.encoder.Batch}.  CPU work: runs in a worker
        thread, never on the reactor thread.  Must be deterministic: the
        same batch gives the same bytes (a retried PUT, a DLQ re-upload
        and a WAL replay write one identical object).

        @return: a list of L{estat.encoder.EncodedObject}s: the batch's
            object(s), and one of raw originals under C{DLQ_PREFIX} for
            events that could not be encoded.  One bad event never fails
            its batch.
        """
