# -*- test-case-name: estat.test.test_uploader -*-
"""
The uploader: a sealed batch is encoded in a worker thread, then put in the
object store with C{S3_APP_RETRIES} application-level retries and jittered
backoff; what the store still refuses goes to the dead-letter queue under
the same key.

It never fails the Deferred it returns: every event of a batch ends up
stored, dead-lettered, or counted as dropped with a reason.
"""

from __future__ import annotations

import random
from typing import Callable

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .encode.jsonl import JsonlEncoder
from .encoder import Batch, EncodedObject
from .interfaces import IDeadLetterQueue, IEncoder, IObjectStore, StoreError
from .metrics import Metrics

__all__ = ["Uploader", "backoff_delay"]


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """
    "Full jitter" exponential backoff: a random delay in
    [base * 2**attempt / 2, base * 2**attempt), capped at C{cap}.
    """
    ceiling = min(cap, base * (2 ** attempt))
    return ceiling * (0.5 + rand() / 2)


def _error_code(error: BaseException) -> tuple[str, str, bool]:
    if isinstance(error, StoreError):
        return error.code, error.message, error.retryable
    if isinstance(error, CancelledError):
        return "Cancelled", "attempt cancelled", True
    return type(error).__name__, str(error), True


@attr.s
class Uploader:
    """
    @ivar store: the L{IObjectStore}.
    @ivar dead_letters: the L{IDeadLetterQueue}.
    @ivar run_in_thread: C{f, *args -> Deferred}, off the reactor thread.
    @ivar retries: C{S3_APP_RETRIES}.
    """

    log = Logger()

    store: IObjectStore = attr.ib()
    dead_letters: IDeadLetterQueue = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    retries: int = attr.ib(default=2)
    gzip_level: int = attr.ib(default=6)
    backoff_base: float = attr.ib(default=0.2)
    backoff_cap: float = attr.ib(default=5.0)
    rand: Callable[[], float] = attr.ib(default=random.random)
    #: Called after every successful put (the DLQ ends its backoff).
    on_stored: Callable[[], None] = attr.ib(default=lambda: None)
    #: The default encoder (L{upload}'s C{encoder} names a stream's own).
    encoder: IEncoder = attr.ib(default=None)

    _hurrying: bool = attr.ib(default=False, init=False)
    _sleeps: dict = attr.ib(factory=dict, init=False)
    _attempts: set = attr.ib(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = JsonlEncoder(self.gzip_level)

    def sink_for(self, encoder: IEncoder) -> Callable[[Batch], Deferred]:
        """
        C{upload} for a stream whose batches C{encoder} encodes.
        """
        return lambda batch: self.upload(batch, encoder)

    def upload(self, batch: Batch, encoder: IEncoder | None = None) -> Deferred:
        """
        Encode (with C{encoder}, by default L{encoder}), store or
        dead-letter C{batch}.  The Deferred fires once every
        event has a fate, with C{True} if every one is stored or durably in
        the dead-letter queue, C{False} if some were dropped (and counted);
        it never fails.
        """
        return Deferred.fromCoroutine(self._upload(batch, encoder or self.encoder))

    async def _upload(self, batch: Batch, encoder: IEncoder) -> bool:
        key, count = batch.key, batch.count
        try:
            objects = await self.run_in_thread(encoder.encode, batch)
        except Exception:
            self.log.failure("could not encode batch {key} ({count} events dropped)",
                             key=key, count=count)
            self._dropped("encode_failed", count)
            return False
        # The raw events are not needed once encoded: drop this frame's
        # reference, so that only the encoded objects wait for the store
        # (the batcher keeps only the count, see Batcher._dispatch).
        del batch
        kept = True
        for obj in objects:
            for column, count in obj.misfits:
                self.metrics.column_mismatches.labels(encoder.stream, column).inc(count)
            if obj.poison:
                self.metrics.encoder_poison_events.inc(obj.count)
                self.log.warn(
                    "{count} events of batch {key} could not be encoded; "
                    "their raw originals go to {poison_key}",
                    count=obj.count, key=key, poison_key=obj.key)
            try:
                if not await self.deliver(obj):
                    kept = False
            except Exception:
                self.log.failure("unexpected error delivering {key}", key=obj.key)
                self._dropped("unexpected_error", obj.count)
                kept = False
        return kept

    def _dropped(self, reason: str, count: int) -> None:
        self.metrics.dlq_events_dropped.inc(count)
        self.metrics.events_dropped.labels(reason).inc(count)

    async def deliver(self, obj: EncodedObject) -> bool:
        """
        Put C{obj}, retrying; on failure hand it to the dead-letter queue.

        @return: whether it was stored or durably dead-lettered (C{False}:
            dropped, and counted).
        """
        if await self.put_with_retries(obj, self.retries):
            return True
        return bool(await self.dead_letters.put(obj))

    async def put_with_retries(self, obj: EncodedObject, retries: int) -> bool:
        """
        Put C{obj} with up to C{retries} retries after the first attempt.
        Counts every attempt in the metrics.

        @return: whether it was stored.
        """
        attempt = 0
        while True:
            if self._hurrying:
                # The shutdown deadline is near: no new attempt that could
                # outlive it; the dead-letter queue takes the object.
                return False
            if attempt:
                self.metrics.s3_put_retries.inc()
            started = self.clock.seconds()
            d = self.store.put(obj.key, obj.body, obj.content_md5)
            self._attempts.add(d)
            try:
                await d
            except Exception as e:
                code, message, retryable = _error_code(e)
                self.metrics.s3_put_errors.inc()
                self.metrics.s3_put_errors_by_code.labels(code).inc()
                self.log.warn(
                    "upload of {key} failed (attempt {attempt} of {attempts}): "
                    "{code} {message}",
                    key=obj.key, attempt=attempt + 1, attempts=retries + 1,
                    code=code, message=message)
                if not retryable or attempt >= retries or self._hurrying:
                    return False
                if not await self._sleep(backoff_delay(
                        attempt, self.backoff_base, self.backoff_cap, self.rand)):
                    return False
                attempt += 1
                continue
            finally:
                self._attempts.discard(d)
            self.metrics.s3_put_duration.observe(self.clock.seconds() - started)
            if not obj.poison:
                self.metrics.s3_events_stored.inc(obj.count)
                self.metrics.batches_stored.inc()
            self.log.info("stored {key} ({count} events)", key=obj.key, count=obj.count)
            self.on_stored()
            return True

    def _sleep(self, delay: float) -> Deferred:
        """
        Wait C{delay} seconds; fires C{True}, or C{False} when L{hurry} cut
        the wait short.
        """
        d = Deferred()

        def wake() -> None:
            del self._sleeps[d]
            d.callback(True)

        self._sleeps[d] = self.clock.callLater(delay, wake)
        return d

    def hurry(self) -> None:
        """
        The shutdown deadline has come: stop retrying, cancel attempts in
        flight, and send whatever is not stored to the dead-letter queue
        now.  (A cancelled attempt that did reach the store is harmless: the
        retry from the dead-letter queue overwrites the same key.)
        """
        self._hurrying = True
        for d, call in list(self._sleeps.items()):
            del self._sleeps[d]
            call.cancel()
            d.callback(False)
        for d in list(self._attempts):
            d.cancel()
