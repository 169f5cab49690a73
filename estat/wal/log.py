# -*- test-case-name: estat.test.test_wal_log -*-
"""
The write-ahead log, as the reactor sees it: sequence numbers, the writer
thread behind it, which batches of which stream hold which events, the
low-water mark, and the checkpoint that lets old segments go.

On the reactor thread this module only encodes a record, appends it to the
writer's list and does bookkeeping; every write, sync, checkpoint, deletion
and the start-up recovery happen in threads.

Sequence numbers are one series for the whole log (every stream).  A
stream's events reach its queue in sequence order and its batcher seals
them in that order, so the C{n} events of a sealed batch are the next C{n}
logged events of its stream: a L{Ledger} maps a batch to its sequence
range without a number travelling with each event.

The low-water mark is the lowest sequence number that may not yet be stored
or dead-lettered: the first event not yet sealed, or the first event of the
oldest batch without a fate, in any stream.  A checkpoint records it
durably (write, fsync, rename, fsync the directory); only then are the
segments wholly below it deleted.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..metrics import Metrics
from .files import acquire_lock, delete_segments, segment_path, write_checkpoint
from .recovery import Recovered, SegmentInfo, recover
from .records import encode_events, encode_seal
from .writer import Group, GroupCommitter

__all__ = ["Ledger", "WriteAheadLog"]


class Ledger:
    """
    Counts handed out in order: C{append(tag, n)} for each request, and
    C{take(n)} for each sealed batch returns C{[(tag, offset, k)]}, the
    requests (or parts of them) the batch holds.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries = collections.deque()

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, tag, count: int) -> None:
        self.entries.append([tag, 0, count])

    def first(self):
        entry = self.entries[0]
        return entry[0], entry[1]

    def take(self, count: int) -> list:
        taken = []
        entries = self.entries
        while count > 0 and entries:
            entry = entries[0]
            tag, offset, left = entry
            if left <= count:
                entries.popleft()
                taken.append((tag, offset, left))
                count -= left
            else:
                taken.append((tag, offset, count))
                entry[1] += count
                entry[2] -= count
                count = 0
        if count:
            raise AssertionError(f"a batch holds {count} events more than were logged")
        return taken


@attr.s(slots=True)
class _Stream:
    #: (first seq, offset, count) of logged events not yet in a sealed batch.
    ledger: Ledger = attr.ib(factory=Ledger)
    #: first seq -> whether the batch has a fate, in seal order.
    inflight: dict = attr.ib(factory=dict)


def checkpoint_and_delete(directory: str, wal_id: str, low_water: int, paths: list,
                          write=write_checkpoint, delete=delete_segments) -> None:
    """
    In a thread: make the checkpoint durable, and only then delete the
    segments it releases.  If the checkpoint cannot be written, nothing is
    deleted.
    """
    write(directory, wal_id, low_water)
    if paths:
        delete(directory, paths)


@attr.s(eq=False)
class WriteAheadLog(Service):
    """
    @ivar directory: C{WAL_DIR}.
    @ivar call_from_thread: C{reactor.callFromThread}.
    @ivar run_in_thread: C{f, *args -> Deferred} in a worker thread.
    @ivar segment_size: roll segments at this size.
    @ivar max_bytes: C{WAL_MAX_SIZE_BYTES}: refuse what would pass it.
    """

    log = Logger()

    directory: str = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    call_from_thread: Callable = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    segment_size: int = attr.ib(default=16 << 20)
    max_bytes: int = attr.ib(default=1 << 30)
    checkpoint_interval: float = attr.ib(default=1.0)
    sync: Callable[[int], None] = attr.ib(default=os.fdatasync)
    new_id: Callable[[], str] = attr.ib(default=lambda: os.urandom(8).hex())
    committer_factory: Callable[..., GroupCommitter] = attr.ib(default=GroupCommitter)
    #: See L{GroupCommitter}: how long a busy writer gathers a group.
    commit_delay: float = attr.ib(default=0.001)

    wal_id: str | None = attr.ib(default=None, init=False)
    failed: str | None = attr.ib(default=None, init=False)
    recovered: Recovered | None = attr.ib(default=None, init=False)
    _lock_fd: int | None = attr.ib(default=None, init=False)
    _committer: GroupCommitter | None = attr.ib(default=None, init=False)
    _next_seq: int = attr.ib(default=0, init=False)
    _streams: dict = attr.ib(factory=dict, init=False)
    _segments: dict = attr.ib(factory=dict, init=False)  # number -> SegmentInfo
    #: The newest segment a reported group went to.  Not the writer's own
    #: attribute: the writer may have rolled past a segment whose last
    #: group the reactor has not heard of yet.
    _active: int = attr.ib(default=0, init=False)
    _bytes: int = attr.ib(default=0, init=False)
    _pending_bytes: int = attr.ib(default=0, init=False)
    _durable_low_water: int = attr.ib(default=-1, init=False)
    _checkpointing: Deferred | None = attr.ib(default=None, init=False)
    _loop: LoopingCall | None = attr.ib(default=None, init=False)
    _opened: Deferred | None = attr.ib(default=None, init=False)
    _opened_waiters: list = attr.ib(factory=list, init=False)
    #: Called with C{(max_seq, error)} for each group: see L{on_durable}.
    _durable_listeners: list = attr.ib(factory=list, init=False)

    # --- start and stop ---

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._lock_fd is None:
            # At once, on purpose: a second process on one WAL_DIR must fail
            # start-up with a clear error (WalInUse), not run beside the first.
            self._lock_fd = acquire_lock(self.directory)

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()
        self._opened = self.run_in_thread(recover, self.directory, self.new_id)
        self._opened.addCallbacks(self._recovered, self._recover_failed)

    def _recovered(self, recovered: Recovered) -> Recovered:
        self.recovered = recovered
        self.wal_id = recovered.wal_id
        self._next_seq = recovered.next_seq
        self._durable_low_water = recovered.low_water
        for info in recovered.segments:
            self._segments[info.number] = info
            self._bytes += info.size
        for text, fields in recovered.problems:
            if fields.get("error"):
                self.log.error(text, **fields)
            else:
                self.log.warn(text, **fields)
        if recovered.set_aside:
            self.metrics.wal_records_set_aside.inc(recovered.set_aside)
        # Replayed events hold the low-water mark until they have a fate.
        for stream, batches in recovered.sealed.items():
            state = self._stream(stream)
            for b in batches:
                state.inflight[b.seal.first] = False
        for stream, runs in recovered.unsealed.items():
            state = self._stream(stream)
            for first, events in runs:
                state.ledger.append(first, len(events))
        number = recovered.next_segment
        self._active = number
        self._segments[number] = SegmentInfo(number, segment_path(self.directory, number))
        self._committer = self.committer_factory(
            self.directory, number, self.segment_size, self.call_from_thread, self._on_group,
            sync=self.sync, commit_delay=self.commit_delay)
        self._committer.start()
        self._update_gauges()
        self._loop = LoopingCall(self.checkpoint)
        self._loop.clock = self.clock
        self._loop.start(self.checkpoint_interval, now=False)
        self.log.info("write-ahead log {directory} open: {segments} segments from before, "
                      "{events} events to replay, next sequence number {seq}",
                      directory=self.directory, segments=len(recovered.segments),
                      events=recovered.events, seq=self._next_seq)
        waiters, self._opened_waiters = self._opened_waiters, []
        for d in waiters:
            d.callback(recovered)
        return recovered

    def _recover_failed(self, failure) -> None:
        self._fail(f"could not open the write-ahead log: {failure.getErrorMessage()}")
        self.log.failure("could not open the write-ahead log {directory}", failure,
                         directory=self.directory)
        waiters, self._opened_waiters = self._opened_waiters, []
        for d in waiters:
            d.callback(None)

    def when_open(self) -> Deferred:
        """
        Fire with the L{Recovered} log once it is open (C{None} if it could
        not be opened).
        """
        if self._opened is not None and self._opened.called:
            return succeed(self.recovered)
        d = Deferred()
        self._opened_waiters.append(d)
        return d

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._checkpointing is not None:
            await _wait(self._checkpointing)
        if self.failed is None and self._committer is not None:
            await _wait(self.checkpoint())
        if self._committer is not None:
            stopped = Deferred()
            self._committer.stop(lambda: stopped.callback(None))
            await stopped
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.log.info("write-ahead log closed: low-water mark {low_water}, {segments} segments "
                      "kept", low_water=self._durable_low_water, segments=len(self._segments))

    # --- admission ---

    @property
    def is_open(self) -> bool:
        return self._committer is not None

    def refusal(self) -> str | None:
        """
        Why nothing can be logged now, or C{None}: C{"wal_starting"} or
        C{"wal_failed"}.
        """
        if self.failed is not None:
            return "wal_failed"
        if self._committer is None:
            return "wal_starting"
        return None

    def log_events(self, stream: str, events: list, callback: Callable) -> str | None:
        """
        Log C{events} of C{stream}; C{callback(error)} is called once they
        are durable (C{error} is C{None}) or could not be made so.

        @return: C{None}, or why they were not logged (L{refusal}, or
            C{"wal_full"}: they would take the log past C{max_bytes}); the
            callback is then never called.
        """
        last = self.append_events(stream, events, callback)
        return last if last.__class__ is str else None

    def append_events(self, stream: str, events: list, callback: Callable | None = None):
        """
        L{log_events}, for a caller that learns of durability from
        L{on_durable} (one call per group for all its requests) instead of
        a callback per request.

        @return: the sequence number of the last of C{events} (an C{int}),
            or why they were not logged (a C{str}, as L{log_events}).
        """
        if self.failed is not None or self._committer is None:
            return self.refusal()
        seq = self._next_seq
        data = encode_events(stream, seq, events)
        size = len(data)
        if self._bytes + self._pending_bytes + size > self.max_bytes:
            self.metrics.wal_full_refusals.inc()
            return "wal_full"
        count = len(events)
        last = seq + count - 1
        self._next_seq = last + 1
        state = self._streams.get(stream) or self._stream(stream)
        state.ledger.entries.append([seq, 0, count])
        self._pending_bytes += size
        self._committer.submit(data, last, callback)
        return last

    def on_durable(self, listener: Callable[[int, BaseException | None], None]) -> None:
        """
        Call C{listener(max_seq, error)} on the reactor thread after each
        group commit: every events record whose sequence numbers are at
        most C{max_seq} and that was not reported before is now durable
        (C{error} is C{None}), or failed with C{error}.
        """
        self._durable_listeners.append(listener)

    def seal(self, stream: str, count: int) -> tuple[int, int]:
        """
        The sequence range of the next C{count} events of C{stream}, now in
        a sealed batch.
        """
        taken = self._stream(stream).ledger.take(count)
        tag, offset, _ = taken[0]
        first = tag + offset
        tag, offset, k = taken[-1]
        last = tag + offset + k - 1
        self._stream(stream).inflight[first] = False
        return first, last

    def unique(self, stream: str, first: int, last: int) -> str:
        """
        The 16 hex digits of a batch's key: from the log's id and the batch's
        sequence range, so the same batch always gets the same key.
        """
        text = f"{self.wal_id}/{stream}/{first}-{last}".encode("utf-8")
        return hashlib.blake2b(text, digest_size=8).hexdigest()

    def log_seal(self, stream: str, first: int, last: int, count: int, sealed_at: float,
                 key: str, poison_key: str) -> Deferred:
        """
        Log that a batch is sealed; the Deferred fires (with C{None}, or the
        error) once that is durable.  A batch is uploaded only after, so
        that a replay can never give stored events a second key.
        """
        d = Deferred()
        if self.failed is not None or self._committer is None:
            d.callback(self.failed or "not open")
            return d
        data = encode_seal(stream, first, last, count, sealed_at, key, poison_key)
        self._pending_bytes += len(data)
        self._committer.submit(data, last, d.callback)
        return d

    def release_unclaimed(self, claimed) -> int:
        """
        After start-up replay: the log's events of streams no admission
        took (a stream switched off since the crash) would hold the
        low-water mark, and so the log, forever.  Count them as dropped,
        say so, and let them go.  Returns how many there were.
        """
        recovered = self.recovered
        if recovered is None:
            return 0
        lost = 0
        for stream in set(recovered.sealed) | set(recovered.unsealed):
            if stream in claimed:
                continue
            count = sum(len(b.events) for b in recovered.sealed.get(stream, ()))
            count += sum(len(e) for _, e in recovered.unsealed.get(stream, ()))
            self._streams.pop(stream, None)
            lost += count
            self.metrics.dlq_events_dropped.inc(count)
            self.metrics.events_dropped.labels("wal_stream_unknown").inc(count)
            self.log.error("the write-ahead log holds {count} events of stream {stream}, which "
                           "this process does not serve; they are dropped (a copy of the log "
                           "stays in {directory} until its checkpoint passes them)",
                           count=count, stream=stream, directory=self.directory)
        return lost

    def batch_done(self, stream: str, first: int) -> None:
        """
        The batch beginning at C{first} has a fate (stored, dead-lettered,
        or dropped and counted).
        """
        inflight = self._stream(stream).inflight
        if first in inflight:
            inflight[first] = True
        while inflight:
            oldest = next(iter(inflight))
            if not inflight[oldest]:
                break
            del inflight[oldest]

    def _stream(self, name: str) -> _Stream:
        state = self._streams.get(name)
        if state is None:
            state = self._streams[name] = _Stream()
        return state

    # --- commits ---

    def _on_group(self, group: Group) -> None:
        for number in group.opened:
            self._segments.setdefault(number, SegmentInfo(number,
                                                          segment_path(self.directory, number)))
        self._pending_bytes -= group.size
        error = group.error
        if error is None:
            self._active = max(self._active, group.segment)
            info = self._segments.get(group.segment)
            if info is None:
                info = self._segments[group.segment] = SegmentInfo(
                    group.segment, segment_path(self.directory, group.segment))
            info.size += group.size
            if group.max_seq > info.max_seq:
                info.max_seq = group.max_seq
            self._bytes += group.size
            self.metrics.wal_commit_duration.observe(group.duration)
            self.metrics.wal_commit_batch_size.observe(group.records)
            self._update_gauges()
        else:
            self._fail(f"{type(error).__name__}: {error}")
        for callback in group.callbacks:
            callback(error)
        for listener in self._durable_listeners:
            listener(group.max_seq, error)

    def _fail(self, why: str) -> None:
        if self.failed is not None:
            return
        self.failed = why
        self.metrics.wal_failed.set(1)
        self.log.critical("the write-ahead log {directory} failed ({why}); no more events are "
                          "accepted (503) until the process is restarted: after a failed "
                          "write or fsync the disk cannot be trusted",
                          directory=self.directory, why=why)

    def _update_gauges(self) -> None:
        self.metrics.wal_bytes_current.set(self._bytes)
        self.metrics.wal_segments_current.set(len(self._segments))

    # --- checkpoints ---

    def low_water(self) -> int:
        mark = self._next_seq
        for state in self._streams.values():
            if state.ledger:
                tag, offset = state.ledger.first()
                mark = min(mark, tag + offset)
            for first, done in state.inflight.items():
                if not done:
                    mark = min(mark, first)
                    break
        return mark

    def checkpoint(self) -> Deferred:
        """
        If the low-water mark moved, record it durably, then delete the
        segments wholly below it.  Never fails; one at a time.
        """
        if self._checkpointing is not None or self._committer is None or self.failed:
            return succeed(None)
        mark = self.low_water()
        active = self._active
        doomed = [info for number, info in sorted(self._segments.items())
                  if number < active and info.max_seq < mark]
        if mark == self._durable_low_water and not doomed:
            return succeed(None)
        d = self.run_in_thread(checkpoint_and_delete, self.directory, self.wal_id, mark,
                               [info.path for info in doomed])
        d.addCallbacks(self._checkpointed, self._checkpoint_failed, callbackArgs=(mark, doomed))
        d.addBoth(self._checkpoint_over)
        if not d.called:
            self._checkpointing = d
        return d

    def _checkpointed(self, _, mark: int, doomed: list) -> None:
        self._durable_low_water = mark
        for info in doomed:
            self._segments.pop(info.number, None)
            self._bytes -= info.size
        self._update_gauges()

    def _checkpoint_failed(self, failure) -> None:
        self.metrics.loop_errors.labels("wal_checkpoint").inc()
        self.log.failure("could not write the write-ahead log's checkpoint", failure)

    def _checkpoint_over(self, _) -> None:
        self._checkpointing = None


def _wait(d: Deferred) -> Deferred:
    if d.called:
        return succeed(None)
    waiter = Deferred()
    d.addBoth(lambda r: (waiter.callback(None), r)[1])
    return waiter
