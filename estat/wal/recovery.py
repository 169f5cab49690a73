# -*- test-case-name: estat.test.test_wal_recovery -*-
"""
Start-up recovery of the write-ahead log: read every segment, truncate a
torn tail, set damaged stretches aside, and work out what must be uploaded
again, and under which keys.

The checkpoint's C{low_water} says every event with a lower sequence number
is stored or in the dead-letter queue.  Then:

 - a sealed batch whose first event is below it is done (batches have a
   fate in full or not at all, and an unfinished batch holds the low-water
   mark at or below its first event), and so is every event in it;
 - a sealed batch at or above it is rebuilt exactly (its stream's events in
   its sequence range, in order) under the key its seal record names: the
   same bytes under the same key, so a replay overwrites and never
   duplicates;
 - the other events at or above it were never sealed: they are batched
   afresh.

Everything here blocks on disk: it runs in a worker thread at start-up.
"""

from __future__ import annotations

import bisect
import os
import shutil

import attr

from .files import CORRUPT, list_segments, read_checkpoint, write_checkpoint
from .records import EventsRecord, SealRecord, scan

__all__ = ["Recovered", "SegmentInfo", "SealedBatch", "recover"]


@attr.s(slots=True)
class SegmentInfo:
    number: int = attr.ib()
    path: str = attr.ib()
    size: int = attr.ib(default=0)
    #: The highest sequence number any record in it mentions (-1: none).
    max_seq: int = attr.ib(default=-1)


@attr.s(slots=True, frozen=True)
class SealedBatch:
    seal: SealRecord = attr.ib()
    events: list = attr.ib(repr=False)


@attr.s(slots=True)
class Recovered:
    """
    @ivar sealed: C{{stream: [SealedBatch]}} to upload again, in order.
    @ivar unsealed: C{{stream: [(first_seq, events)]}}, runs of consecutive
        sequence numbers, in order, never sealed.
    @ivar set_aside: damaged stretches found (each copied to C{corrupt/}).
    @ivar truncated: bytes cut off a torn tail.
    @ivar problems: C{[(text, fields)]} for the log.
    """

    wal_id: str = attr.ib()
    low_water: int = attr.ib()
    next_seq: int = attr.ib()
    next_segment: int = attr.ib()
    segments: list = attr.ib(factory=list)
    sealed: dict = attr.ib(factory=dict)
    unsealed: dict = attr.ib(factory=dict)
    set_aside: int = attr.ib(default=0)
    truncated: int = attr.ib(default=0)
    problems: list = attr.ib(factory=list)

    @property
    def events(self) -> int:
        """
        Events to upload again.
        """
        n = sum(len(b.events) for batches in self.sealed.values() for b in batches)
        return n + sum(len(e) for runs in self.unsealed.values() for _, e in runs)


def _truncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(directory: str, path: str) -> str:
    target = os.path.join(directory, CORRUPT, os.path.basename(path))
    if not os.path.exists(target):
        shutil.copyfile(path, target + ".tmp")
        os.replace(target + ".tmp", target)
    return target


def recover(directory: str, new_id) -> Recovered:
    """
    Read the log in C{directory}.  C{new_id()} names a new log.
    """
    os.makedirs(os.path.join(directory, CORRUPT), exist_ok=True)
    problems = []
    try:
        checkpoint = read_checkpoint(directory)
    except ValueError as e:
        # Replaying everything is safe: sealed batches keep their keys.
        problems.append(("the checkpoint is unreadable ({error}); replaying the whole log",
                         {"error": str(e)}))
        checkpoint = {"id": new_id(), "low_water": 0}
        write_checkpoint(directory, checkpoint["id"], 0)
    if checkpoint is None:
        checkpoint = {"id": new_id(), "low_water": 0}
        write_checkpoint(directory, checkpoint["id"], 0)
    low_water = checkpoint["low_water"]
    found = list_segments(directory)
    segments = []
    events: dict = {}    # stream -> {seq: event}, seq >= low_water
    seals = []
    set_aside = truncated = 0
    max_seq = low_water - 1
    for index, (number, path) in enumerate(found):
        with open(path, "rb") as f:
            data = f.read()
        result = scan(data)
        damaged = list(result.damaged)
        if result.bad_tail is not None and not data[result.bad_tail:].strip(b"\0"):
            # The preallocated, never written rest of the segment.
            data = data[:result.bad_tail]
            if index == len(found) - 1:
                _truncate(path, result.bad_tail)
        elif result.bad_tail is not None:
            if index == len(found) - 1:
                # A write the crash cut short: never acknowledged.
                cut = len(data) - result.bad_tail
                _truncate(path, result.bad_tail)
                data = data[:result.bad_tail]
                truncated += cut
                problems.append(("truncated a torn tail of {bytes} bytes off {path}",
                                 {"bytes": cut, "path": path}))
            else:
                damaged.append((result.bad_tail, len(data) - result.bad_tail))
        if damaged:
            copy = _set_aside(directory, path)
            set_aside += len(damaged)
            problems.append(("{count} damaged stretches ({bytes} bytes) in {path} set aside "
                             "(copy in {copy}); the events in them cannot be replayed",
                             {"count": len(damaged), "bytes": sum(n for _, n in damaged),
                              "path": path, "copy": copy, "error": True}))
        info = SegmentInfo(number, path, len(data))
        for record in result.records:
            info.max_seq = max(info.max_seq, record.last)
            if isinstance(record, EventsRecord):
                if record.last >= low_water:
                    mine = events.setdefault(record.stream, {})
                    for i, event in enumerate(record.events):
                        if record.seq + i >= low_water:
                            mine[record.seq + i] = event
            elif isinstance(record, SealRecord):
                seals.append(record)
        max_seq = max(max_seq, info.max_seq)
        segments.append(info)
    sorted_seqs = {stream: sorted(mine) for stream, mine in events.items()}

    def take(stream: str, first: int, last: int) -> list:
        seqs = sorted_seqs.get(stream, ())
        lo = bisect.bisect_left(seqs, first)
        hi = bisect.bisect_right(seqs, last)
        mine = events.get(stream, {})
        return [s for s in seqs[lo:hi] if s in mine]

    sealed: dict = {}
    for seal in seals:
        if seal.first < low_water:
            # Done: so is every event in it, even those above the mark.
            for s in take(seal.stream, seal.first, seal.last):
                del events[seal.stream][s]
            continue
        seqs = take(seal.stream, seal.first, seal.last)
        if len(seqs) != seal.count:
            # Part of it was damaged: rebuilding it under its key could
            # overwrite a stored object with less; batch the rest afresh.
            problems.append(("batch {key} has {found} of its {count} events left; they are "
                             "batched again under a new key", {
                                 "key": seal.key, "found": len(seqs), "count": seal.count}))
            continue
        mine = events[seal.stream]
        batch = [mine.pop(s) for s in seqs]
        sealed.setdefault(seal.stream, []).append(SealedBatch(seal, batch))
    unsealed: dict = {}
    for stream, mine in events.items():
        runs = []
        for s in sorted(mine):
            if runs and runs[-1][0] + len(runs[-1][1]) == s:
                runs[-1][1].append(mine[s])
            else:
                runs.append((s, [mine[s]]))
        if runs:
            unsealed[stream] = runs
    return Recovered(
        wal_id=checkpoint["id"], low_water=low_water, next_seq=max(low_water, max_seq + 1),
        next_segment=(found[-1][0] + 1) if found else 0, segments=segments, sealed=sealed,
        unsealed=unsealed, set_aside=set_aside, truncated=truncated, problems=problems)
