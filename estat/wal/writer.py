# -*- test-case-name: estat.test.test_wal_writer -*-
"""
The one writer of the write-ahead log: a thread that appends records to the
active segment and makes them durable with group commit.

The reactor thread only calls L{GroupCommitter.submit}, which appends an
already-encoded record to an in-memory list and wakes the thread.  The
thread takes everything submitted so far as one group, writes it with one
C{os.write} and one C{os.fdatasync}, and reports the group back to the
reactor with one C{callFromThread}.  What arrives while a sync runs is the
next group, so the cost of a sync is shared by every request that waited
for it and throughput grows with load.

Under load (the last group held more than one record) the thread waits
C{commit_delay} (1 ms) after waking before it takes the group, so that
more requests share each sync: an C{fdatasync} costs the kernel 90-190 us
of CPU on this project's disk, which at thousands of requests a second is
most of what the log costs.  A lone request is committed at once.

The thread keeps the blocks just ahead of the write position written
(zeros, L{ZERO_AHEAD} at a time, synced) before any group reaches them.  A
segment is preallocated, but its blocks stay "unwritten" extents until
something is written there, and on ext4 the first write to such a block
makes the next C{fdatasync} commit the journal (the extent changed): 71-174
instead of 40-44 us of kernel CPU, and 220-380 instead of 130-150 us
of wall time, for a 36 KB group on this project's disk.  Zeroing a
megabyte at a time pays that journal commit once per megabyte instead of
once per group; recovery already reads zeros as the unused rest of a
segment.

After a write or sync error nothing more is written: after a failed fsync
the page cache cannot be trusted (the kernel may have dropped the dirty
pages), so every later group fails at once with the same error.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import attr

from .files import create_segment

__all__ = ["GroupCommitter", "Group", "ZERO_AHEAD"]

#: How far ahead of the write position blocks are kept written, in bytes.
ZERO_AHEAD = 1 << 20
_ZEROS = bytes(ZERO_AHEAD)


@attr.s(slots=True)
class Group:
    """
    One group commit, as reported to the reactor.

    @ivar callbacks: the callbacks given with records, in submission order.
    @ivar records: how many records the group held.
    @ivar max_seq: the highest C{max_seq} of its records.  Events records
        are submitted in sequence order, so every events record whose
        numbers are at most this is durable once the group is (or failed
        with it).
    @ivar segment: the number of the segment the group went to.
    @ivar opened: numbers of segments created for this group (a roll).
    @ivar size: bytes of its records (written, unless it failed).
    @ivar duration: seconds of write + sync.
    @ivar error: the C{OSError} that failed it, or C{None}.
    """

    callbacks: list = attr.ib()
    records: int = attr.ib(default=0)
    max_seq: int = attr.ib(default=-1)
    segment: int = attr.ib(default=-1)
    opened: list = attr.ib(factory=list)
    size: int = attr.ib(default=0)
    duration: float = attr.ib(default=0.0)
    error: BaseException | None = attr.ib(default=None)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class GroupCommitter:
    """
    @param call_from_thread: C{reactor.callFromThread}.
    @param on_group: called on the reactor thread with each L{Group}.
    @param first_segment: the number of the segment to create first.
    @param segment_size: roll to a new segment before a group that would
        take the active one past this many bytes.
    @param sync: C{os.fdatasync}; injected for tests of a failing disk.
    """

    def __init__(self, directory: str, first_segment: int, segment_size: int,
                 call_from_thread: Callable, on_group: Callable[[Group], None],
                 sync: Callable[[int], None] = os.fdatasync,
                 timer: Callable[[], float] = time.perf_counter,
                 preallocate: bool = True, commit_delay: float = 0.001,
                 max_group: int = 512, zero_ahead: int = ZERO_AHEAD) -> None:
        self.zero_ahead = min(zero_ahead, ZERO_AHEAD)
        #: The end of the written (zeroed or logged) part of the segment.
        self._zeroed = 0
        self.commit_delay = commit_delay
        self.max_group = max_group
        self._last_group = 0
        self.directory = directory
        self.preallocate = preallocate
        self.segment = first_segment
        self.segment_size = segment_size
        self._call = call_from_thread
        self._on_group = on_group
        self._sync = sync
        self._timer = timer
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # What is submitted and not yet taken as a group (under the lock).
        self._records: list = []
        self._callbacks: list = []
        self._max_seq = -1
        self._stopping = False
        self._on_stopped: Callable | None = None
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._size = 0
        self.error: BaseException | None = None

    # --- the reactor side ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="estat-wal-writer", daemon=True)
        self._thread.start()

    def submit(self, data: bytes, max_seq: int, callback: Callable | None = None) -> None:
        """
        Queue one encoded record; C{callback(error)}, when given, is called
        on the reactor thread once it is durable (C{error} is C{None}) or
        failed.  Either way the group reports it in L{Group.max_seq}.
        """
        lock = self._lock
        lock.acquire()  # (not "with self._cond": a Python-level call per request)
        try:
            records = self._records
            records.append(data)
            if callback is not None:
                self._callbacks.append(callback)
            if max_seq > self._max_seq:
                self._max_seq = max_seq
            if len(records) == 1:
                self._cond.notify()
        finally:
            lock.release()

    def stop(self, on_stopped: Callable[[], None]) -> None:
        """
        Write what is queued, then end the thread; C{on_stopped} is called
        on the reactor thread after.
        """
        with self._cond:
            self._stopping = True
            self._on_stopped = on_stopped
            self._cond.notify()
        if self._thread is None:
            on_stopped()

    # --- the writer thread ---

    def _run(self) -> None:
        try:
            self._open(self.segment)
        except OSError as e:
            self.error = e
        while True:
            with self._cond:
                while not self._records and not self._stopping:
                    self._cond.wait()
                if self.commit_delay and self._last_group > 1:
                    # Busy: let a few more requests join this sync.
                    deadline = time.monotonic() + self.commit_delay
                    while len(self._records) < self.max_group and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                records, callbacks, max_seq = self._records, self._callbacks, self._max_seq
                self._records, self._callbacks, self._max_seq = [], [], -1
                stopping = self._stopping
                self._last_group = len(records)
            if records:
                self._call(self._on_group, self._commit(records, callbacks, max_seq))
                self.zero_ahead_of_writes()
            elif stopping:
                break
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._call(self._on_stopped)

    def _open(self, number: int) -> None:
        fd = create_segment(self.directory, number, self.segment_size if self.preallocate else 0)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size, self.segment = fd, 0, number
        self._zeroed = 0
        self.zero_ahead_of_writes()

    def zero_ahead_of_writes(self) -> None:
        """
        Write and sync zeros over the next L{zero_ahead} bytes of the
        segment when the writes come within that of the written part (on
        the writer thread, between groups; see the module's docstring).
        A failure is the log's failure, as for a group.
        """
        chunk = self.zero_ahead
        if (not chunk or self.error is not None or self._fd is None
                or self._size + chunk <= self._zeroed):
            return
        start = max(self._zeroed, self._size)
        end = min(start + chunk, self.segment_size)
        if end <= start:
            return
        try:
            _write_all(self._fd, memoryview(_ZEROS)[:end - start], start)
            self._sync(self._fd)
        except OSError as e:
            self.error = e
            return
        self._zeroed = end

    def commit(self, queued: list) -> Group:
        """
        Write and sync one group of C{[(data, max_seq, callback)]} (on the
        writer thread).
        """
        return self._commit([data for data, _, _ in queued],
                            [callback for _, _, callback in queued if callback is not None],
                            max(max_seq for _, max_seq, _ in queued))

    def _commit(self, records: list, callbacks: list, max_seq: int) -> Group:
        data = b"".join(records) if len(records) > 1 else records[0]
        group = Group(callbacks, len(records), max_seq, size=len(data))
        if self.error is not None:
            group.error = self.error
            return group
        started = self._timer()
        try:
            if self._size and self._size + len(data) > self.segment_size:
                self._open(self.segment + 1)
                group.opened.append(self.segment)
            _write_all(self._fd, data, self._size)
            self._size += len(data)
            self._sync(self._fd)
        except OSError as e:
            self.error = group.error = e
        group.segment = self.segment
        group.duration = self._timer() - started
        return group
