"""
Tests for the write-ahead log (estat.wal): the record format, recovery
(torn tail, damaged records, the checkpoint), the reactor-side log (group
commits, seals, the low-water mark, checkpoint then delete, a failing
disk, a full log), replay keys, and the writer thread.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from estat.encoder import Batch, encode_batch
from estat.event import UnencodedEvent
from estat.keys import KeyMaker
from estat.metrics import Metrics
from estat.test.harness import temp_dir
from estat.testing import DeferredThreadRunner, ManualCommitter, run_synchronously
from estat.wal import files
from estat.wal.files import WalInUse, acquire_lock, list_segments, read_checkpoint
from estat.wal.log import Ledger, WriteAheadLog, checkpoint_and_delete
from estat.wal.records import (
    EventsRecord, SealRecord, encode_events, encode_seal, scan,
)
from estat.wal.recovery import recover
from estat.wal.writer import GroupCommitter

START = 1_764_000_000.0


def events(n: int, tag: str = "e", at: float = START) -> list:
    return [(at + i / 1000, b'{"id":"%s-%d"}' % (tag.encode(), i)) for i in range(n)]


class RecordTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        evs = events(3) + [(START, UnencodedEvent({"n": 2 ** 70}, b'{"n":1180591620717411303424}'))]
        data = encode_events("raw", 7, evs) + encode_seal("raw", 7, 10, 4, START + 1, "k", "p")
        result = scan(data)
        self.assertEqual(result.damaged, [])
        self.assertIsNone(result.bad_tail)
        [rec, seal] = result.records
        self.assertEqual((rec.stream, rec.seq, rec.last), ("raw", 7, 10))
        self.assertEqual(rec.events[:3], evs[:3])
        self.assertEqual(rec.events[3], evs[3])
        self.assertEqual(seal, SealRecord("raw", 7, 10, 4, START + 1, "k", "p"))

    def test_torn_tail(self) -> None:
        """
        A record cut short at the end is a bad tail at its offset; the
        records before it are good.
        """
        one, two = encode_events("raw", 0, events(2)), encode_events("raw", 2, events(2))
        for cut in (1, 5, 13, len(two) - 1):
            result = scan(one + two[:cut])
            self.assertEqual(len(result.records), 1)
            self.assertEqual(result.bad_tail, len(one))
            self.assertEqual(result.good_end, len(one))

    def test_zeroes_at_the_end(self) -> None:
        one = encode_events("raw", 0, events(2))
        result = scan(one + bytes(4096))
        self.assertEqual((len(result.records), result.bad_tail), (1, len(one)))

    def test_bad_crc_in_the_middle(self) -> None:
        """
        A record whose bytes changed fails its CRC; the good records after
        it are still found, and the damage is reported.
        """
        recs = [encode_events("raw", i * 2, events(2, f"r{i}")) for i in range(3)]
        damaged = bytearray(recs[1])
        damaged[-3] ^= 0xFF
        result = scan(recs[0] + bytes(damaged) + recs[2])
        self.assertEqual([r.seq for r in result.records], [0, 4])
        self.assertEqual(result.damaged, [(len(recs[0]), len(recs[1]))])
        self.assertIsNone(result.bad_tail)


class LedgerTests(SynchronousTestCase):
    def test_take_splits_requests(self) -> None:
        ledger = Ledger()
        ledger.append("a", 3)
        ledger.append("b", 4)
        self.assertEqual(ledger.take(2), [("a", 0, 2)])
        self.assertEqual(ledger.take(3), [("a", 2, 1), ("b", 0, 2)])
        self.assertEqual(ledger.first(), ("b", 2))
        self.assertEqual(ledger.take(2), [("b", 2, 2)])
        self.assertEqual(len(ledger), 0)
        self.assertRaises(AssertionError, ledger.take, 1)


class FilesTests(SynchronousTestCase):
    def test_one_process_per_directory(self) -> None:
        directory = temp_dir(self)
        fd = acquire_lock(directory)
        self.addCleanup(os.close, fd)
        with self.assertRaises(WalInUse) as e:
            acquire_lock(directory)
        self.assertIn(f"pid {os.getpid()}", str(e.exception))
        self.assertIn(directory, str(e.exception))

    def test_checkpoint_before_delete(self) -> None:
        """
        The checkpoint is written (durably) first and the segments deleted
        after; if it cannot be written, nothing is deleted.
        """
        calls = []
        checkpoint_and_delete("d", "id", 9, ["s1"], write=lambda *a: calls.append(("write", a)),
                              delete=lambda *a: calls.append(("delete", a)))
        self.assertEqual(calls, [("write", ("d", "id", 9)), ("delete", ("d", ["s1"]))])

        def broken(*a):
            raise OSError(5, "EIO")

        calls = []
        self.assertRaises(OSError, checkpoint_and_delete, "d", "id", 9, ["s1"], write=broken,
                          delete=lambda *a: calls.append(a))
        self.assertEqual(calls, [])


def write_segment(directory: str, number: int, data: bytes) -> str:
    path = files.segment_path(directory, number)
    with open(path, "wb") as f:
        f.write(data)
    return path


class RecoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = temp_dir(self)

    def recover(self):
        return recover(self.directory, lambda: "fresh-id")

    def test_empty(self) -> None:
        r = self.recover()
        self.assertEqual((r.wal_id, r.low_water, r.next_seq, r.next_segment), ("fresh-id", 0, 0, 0))
        self.assertEqual(read_checkpoint(self.directory)["id"], "fresh-id")

    def test_torn_tail_truncated(self) -> None:
        one = encode_events("raw", 0, events(2))
        two = encode_events("raw", 2, events(3))
        path = write_segment(self.directory, 0, one + two[:-4])
        with capturedLogs():
            r = self.recover()
        self.assertEqual(os.path.getsize(path), len(one))
        self.assertEqual(r.truncated, len(two) - 4)
        self.assertEqual(r.set_aside, 0)
        self.assertEqual(r.unsealed, {"raw": [(0, events(2))]})
        self.assertEqual((r.next_seq, r.next_segment), (2, 1))

    def test_preallocated_space_is_not_damage(self) -> None:
        """
        The zeros after the last record of a preallocated segment are
        unused space: not set aside in an older segment, cut off the newest.
        """
        one = encode_events("raw", 0, events(2))
        write_segment(self.directory, 0, one + bytes(5000))
        last = write_segment(self.directory, 1, encode_events("raw", 2, events(1)) + bytes(300))
        with capturedLogs():
            r = self.recover()
        self.assertEqual((r.set_aside, r.truncated), (0, 0))
        self.assertEqual(os.path.getsize(last), len(encode_events("raw", 2, events(1))))
        self.assertEqual([(f, len(e)) for f, e in r.unsealed["raw"]], [(0, 3)])
        self.assertEqual([info.size for info in r.segments], [len(one), os.path.getsize(last)])

    def test_bad_crc_set_aside(self) -> None:
        """
        Damage in an older segment is set aside (a copy in corrupt/,
        counted); the good records around it are replayed; a damaged tail
        of a segment that is not the newest is damage, not a torn write.
        """
        recs = [encode_events("raw", i * 2, events(2, f"r{i}")) for i in range(3)]
        bad = bytearray(recs[1])
        bad[20] ^= 0x55
        write_segment(self.directory, 0, recs[0] + bytes(bad) + recs[2] + recs[2][:7])
        write_segment(self.directory, 1, encode_events("raw", 6, events(1, "last")))
        r = self.recover()
        self.assertEqual(r.set_aside, 2)
        self.assertEqual(os.listdir(os.path.join(self.directory, "corrupt")),
                         ["0000000000000000.wal"])
        # 0-1, then (2-3 damaged) 4-5 and 6: two runs.
        self.assertEqual([(first, len(e)) for first, e in r.unsealed["raw"]], [(0, 2), (4, 3)])
        self.assertEqual(r.truncated, 0)

    def test_checkpoint_and_seals(self) -> None:
        """
        Below the checkpoint's low-water mark nothing is replayed; a sealed
        batch that begins below it is done, even its events above it; a
        sealed batch above it is rebuilt under its key; the rest is
        unsealed.
        """
        a = encode_events("raw", 0, events(4, "a"))            # 0-3
        b = encode_events("seg", 4, events(2, "b"))            # 4-5
        c = encode_events("raw", 6, events(3, "c"))            # 6-8
        d = encode_events("raw", 9, events(2, "d"))            # 9-10
        seal_done = encode_seal("raw", 0, 7, 6, START, "raw/done", "dlq/done")
        seal_live = encode_seal("seg", 4, 5, 2, START, "seg/live", "dlq/live")
        write_segment(self.directory, 3, a + b + c + seal_done + seal_live + d)
        files.write_checkpoint(self.directory, "old-id", 4)
        r = self.recover()
        self.assertEqual(r.wal_id, "old-id")
        self.assertEqual(r.low_water, 4)
        [live] = r.sealed["seg"]
        self.assertEqual(live.seal.key, "seg/live")
        self.assertEqual(live.events, events(2, "b"))
        self.assertNotIn("raw", r.sealed)
        # c's last event (8) was not in the done batch (0-7), d never sealed.
        self.assertEqual(r.unsealed["raw"], [(8, events(3, "c")[2:] + events(2, "d"))])
        self.assertEqual((r.next_seq, r.next_segment), (11, 4))
        self.assertEqual(r.segments[0].max_seq, 10)

    def test_seal_with_missing_events_is_not_rebuilt(self) -> None:
        a = encode_events("raw", 0, events(2, "a"))
        bad = bytearray(encode_events("raw", 2, events(2, "b")))
        bad[-1] ^= 1
        seal = encode_seal("raw", 0, 3, 4, START, "raw/k", "dlq/k")
        write_segment(self.directory, 0, a + bytes(bad) + seal)
        r = self.recover()
        self.assertEqual(r.sealed, {})
        self.assertEqual(r.unsealed["raw"], [(0, events(2, "a"))])
        self.assertTrue(any("new key" in text for text, _ in r.problems))


class WalMixin:
    segment_size = 1 << 20
    max_bytes = 1 << 30

    def make_wal(self, directory=None, sync=None, run_in_thread=run_synchronously):
        self.clock = getattr(self, "clock", None) or Clock()
        if not self.clock.seconds():
            self.clock.advance(START)
        self.directory = directory or getattr(self, "directory", None) or temp_dir(self)
        self.metrics = Metrics(CollectorRegistry())
        committers = []

        def factory(*args, **kwargs):
            if sync is not None:
                kwargs["sync"] = sync
            c = ManualCommitter(*args, **kwargs)
            committers.append(c)
            return c

        wal = WriteAheadLog(directory=self.directory, metrics=self.metrics, clock=self.clock,
                            call_from_thread=lambda f, *a: f(*a), run_in_thread=run_in_thread,
                            segment_size=self.segment_size, max_bytes=self.max_bytes,
                            committer_factory=factory, new_id=lambda: "wal-id")
        wal.committers = committers
        return wal

    def start(self, wal) -> None:
        with capturedLogs():
            wal.startService()
        self.addCleanup(self._stop, wal)

    def _stop(self, wal) -> None:
        if wal.running:
            with capturedLogs():
                wal.stopService()

    def sample(self, name, labels=None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


class WriteAheadLogTests(WalMixin, SynchronousTestCase):
    def test_group_commit(self) -> None:
        """
        Appends wait for the group commit; one commit makes several
        requests durable, and each callback is called once, with C{None}.
        """
        wal = self.make_wal()
        self.start(wal)
        done = []
        self.assertIsNone(wal.log_events("raw", events(2), done.append))
        self.assertIsNone(wal.log_events("raw", events(3), done.append))
        self.assertEqual(done, [])
        wal.committers[0].flush()
        self.assertEqual(done, [None, None])
        self.assertEqual(self.sample("wal_commit_batch_size_count"), 1)
        self.assertEqual(self.sample("wal_commit_batch_size_sum"), 2)
        with open(files.segment_path(self.directory, 0), "rb") as f:
            data = f.read()
        # Preallocated: the file is a segment long, the records at its start.
        self.assertEqual(len(data), self.segment_size)
        self.assertEqual(self.sample("wal_bytes_current"), scan(data).good_end)
        self.assertEqual(len(scan(data).records), 2)

    def test_checkpoint_then_delete(self) -> None:
        """
        A segment goes only once every event in it has a fate and the
        checkpoint saying so is written; a batch in flight keeps it.
        """
        self.segment_size = 200
        wal = self.make_wal()
        self.start(wal)
        committer = wal.committers[0]
        for i in range(3):
            wal.log_events("raw", events(2, f"r{i}"), lambda e: None)
            committer.flush()
        self.assertGreater(len(list_segments(self.directory)), 1)
        first, last = wal.seal("raw", 6)
        self.assertEqual((first, last), (0, 5))
        self.clock.advance(1)
        self.assertEqual(read_checkpoint(self.directory)["low_water"], 0)
        segments = list_segments(self.directory)
        wal.batch_done("raw", first)
        self.clock.advance(1)
        self.assertEqual(read_checkpoint(self.directory)["low_water"], 6)
        # Only the active segment is left.
        self.assertEqual(list_segments(self.directory), segments[-1:])
        self.assertEqual(self.sample("wal_segments_current"), 1)

    def test_checkpoint_waits_for_the_oldest_batch(self) -> None:
        wal = self.make_wal()
        self.start(wal)
        for i in range(3):
            wal.log_events("raw", events(2, f"r{i}"), lambda e: None)
        wal.committers[0].flush()
        one = wal.seal("raw", 3)
        two = wal.seal("raw", 3)
        self.assertEqual((one, two), ((0, 2), (3, 5)))
        wal.batch_done("raw", two[0])
        self.assertEqual(wal.low_water(), 0)
        wal.batch_done("raw", one[0])
        self.assertEqual(wal.low_water(), 6)

    def test_streams_share_the_mark(self) -> None:
        wal = self.make_wal()
        self.start(wal)
        wal.log_events("raw", events(2), lambda e: None)
        wal.log_events("segment", events(2), lambda e: None)
        wal.committers[0].flush()
        wal.batch_done("raw", wal.seal("raw", 2)[0])
        self.assertEqual(wal.low_water(), 2)
        self.assertEqual(wal.seal("segment", 2), (2, 3))

    def test_durable_listeners_hear_each_group_once(self) -> None:
        """
        L{WriteAheadLog.append_events} gives the last sequence number of
        the events; each group commit then tells every L{on_durable}
        listener the highest sequence number it made durable (or the
        error that failed it), once per group, whatever it held.
        """
        wal = self.make_wal()
        self.start(wal)
        heard = []
        wal.on_durable(lambda seq, error: heard.append((seq, error)))
        self.assertEqual(wal.append_events("raw", events(2)), 1)
        self.assertEqual(wal.append_events("segment", events(3)), 4)
        wal.committers[0].flush()
        self.assertEqual(heard, [(4, None)])
        self.assertEqual(wal.append_events("raw", events(1)), 5)
        wal.committers[0].flush()
        self.assertEqual(heard, [(4, None), (5, None)])
        self.assertEqual(wal._pending_bytes, 0)
        wal.committers[0].writer.error = OSError(5, "Input/output error")
        wal.append_events("raw", events(1))
        with capturedLogs():
            wal.committers[0].flush()
        self.assertEqual(heard[-1], (6, wal.committers[0].writer.error))
        self.assertEqual(wal.append_events("raw", events(1)), "wal_failed")
        self.assertEqual(wal._pending_bytes, 0)

    def test_fsync_error_stops_accepting(self) -> None:
        def broken(fd):
            raise OSError(5, "Input/output error")

        wal = self.make_wal(sync=broken)
        self.start(wal)
        done = []
        self.assertIsNone(wal.log_events("raw", events(1), done.append))
        with capturedLogs() as logged:
            wal.committers[0].flush()
        [error] = done
        self.assertIsInstance(error, OSError)
        self.assertEqual(wal.refusal(), "wal_failed")
        self.assertEqual(wal.log_events("raw", events(1), done.append), "wal_failed")
        self.assertEqual(self.sample("wal_failed"), 1)
        self.assertTrue(any("failed" in str(e.get("log_format")) for e in logged))

    def test_full(self) -> None:
        self.max_bytes = 200
        wal = self.make_wal()
        self.start(wal)
        self.assertIsNone(wal.log_events("raw", events(3), lambda e: None))
        self.assertEqual(wal.log_events("raw", events(6), lambda e: None), "wal_full")
        self.assertEqual(self.sample("wal_full_refusals_total"), 1)
        # Nothing of the refused request was logged or numbered.
        self.assertIsNone(wal.log_events("raw", events(1), lambda e: None))
        wal.committers[0].flush()
        self.assertEqual(wal.seal("raw", 4), (0, 3))

    def test_starting(self) -> None:
        runner = DeferredThreadRunner()
        wal = self.make_wal(run_in_thread=runner)
        self.start(wal)
        self.assertEqual(wal.refusal(), "wal_starting")
        self.assertEqual(wal.log_events("raw", events(1), lambda e: None), "wal_starting")
        with capturedLogs():
            runner.run_all()
        self.assertIsNone(wal.refusal())


class ReplayKeyTests(WalMixin, SynchronousTestCase):
    def test_replay_same_key_same_bytes(self) -> None:
        """
        A batch sealed and logged before a crash is rebuilt at start-up with
        the same events under the same key: the same bytes under the same
        key, so the upload overwrites rather than duplicates.
        """
        wal = self.make_wal()
        self.start(wal)
        evs = events(5) + [(START, UnencodedEvent({"big": 2 ** 80}, b'{"big":1}'))]
        wal.log_events("raw", evs[:2], lambda e: None)
        wal.log_events("raw", evs[2:], lambda e: None)
        wal.committers[0].flush()
        first, last = wal.seal("raw", 4)
        keys = KeyMaker("raw", "raw_dlq", "host-1")
        key = keys.batch_key(evs[0][0], START + 5, unique=wal.unique("raw", first, last))
        wal.log_seal("raw", first, last, 4, START + 5, key, keys.poison_key(key))
        wal.committers[0].flush()
        original = Batch(key, keys.poison_key(key), evs[:4], evs[0][0], START + 5)
        # SIGKILL: nothing stopped; a new process on the same directory.
        os.close(wal._lock_fd)
        wal._lock_fd = None
        wal.running = False
        r = recover(self.directory, lambda: "other")
        [sealed] = r.sealed["raw"]
        self.assertEqual(sealed.seal.key, key)
        rebuilt = Batch(sealed.seal.key, sealed.seal.poison_key, sealed.events,
                        sealed.events[0][0], sealed.seal.sealed_at)
        self.assertEqual([(o.key, o.body) for o in encode_batch(rebuilt)],
                         [(o.key, o.body) for o in encode_batch(original)])
        self.assertEqual(r.unsealed["raw"][0][0], 4)
        self.assertEqual(len(r.unsealed["raw"][0][1]), 2)
        self.assertEqual(r.unsealed["raw"][0][1][1][1], evs[5][1])

    def test_unique_is_deterministic(self) -> None:
        wal = self.make_wal()
        self.start(wal)
        self.assertEqual(wal.unique("raw", 0, 9), wal.unique("raw", 0, 9))
        self.assertNotEqual(wal.unique("raw", 0, 9), wal.unique("raw", 0, 8))
        self.assertNotEqual(wal.unique("raw", 0, 9), wal.unique("seg", 0, 9))
        self.assertEqual(len(wal.unique("raw", 0, 9)), 16)

    def test_restart_replays_and_continues(self) -> None:
        """
        A new log on the directory of a killed one knows what to replay,
        continues its sequence numbers and opens a new segment.
        """
        wal = self.make_wal()
        self.start(wal)
        wal.log_events("raw", events(3), lambda e: None)
        wal.committers[0].flush()
        os.close(wal._lock_fd)
        wal._lock_fd = None
        wal.running = False
        again = self.make_wal()
        self.start(again)
        self.assertEqual(again.recovered.events, 3)
        self.assertIsNone(again.log_events("raw", events(1), lambda e: None))
        self.assertEqual(again.low_water(), 0)
        self.assertEqual(again.committers[0].segment, 1)
        # The replayed events hold the mark until their batch has a fate.
        again.committers[0].flush()
        self.clock.advance(1)
        self.assertEqual(read_checkpoint(self.directory)["low_water"], 0)
        again.batch_done("raw", again.seal("raw", 4)[0])
        self.clock.advance(1)
        self.assertEqual(read_checkpoint(self.directory)["low_water"], 4)
        self.assertEqual([n for n, _ in list_segments(self.directory)], [1])


class WriterThreadTests(SynchronousTestCase):
    def test_thread_commits_groups(self) -> None:
        """
        The real thread: records submitted are written and synced, reported
        back through call_from_thread once per group, and stop() ends it.
        """
        directory = temp_dir(self)
        groups = []
        reported = threading.Event()
        stopped = threading.Event()
        syncs = []

        def call(f, *args):
            f(*args)

        def on_group(group):
            groups.append(group)
            if sum(g.records for g in groups) == 3:
                reported.set()

        c = GroupCommitter(directory, 0, 1 << 20, call, on_group,
                           sync=lambda fd: (syncs.append(fd), os.fdatasync(fd)), zero_ahead=0)
        c.start()
        done = []
        for i in range(3):
            c.submit(encode_events("raw", i, events(1)), i, done.append)
        self.assertTrue(reported.wait(10))
        c.stop(stopped.set)
        self.assertTrue(stopped.wait(10))
        self.assertEqual(len(syncs), len(groups))
        result = scan(open(files.segment_path(directory, 0), "rb").read())
        self.assertEqual([r.seq for r in result.records], [0, 1, 2])
        self.assertIsInstance(result.records[0], EventsRecord)

    def test_roll(self) -> None:
        directory = temp_dir(self)
        c = GroupCommitter(directory, 5, 100, None, None, timer=lambda: 0.0)
        c._open(5)
        record = encode_events("raw", 0, events(2))
        g1 = c.commit([(record, 1, None)])
        g2 = c.commit([(record, 3, None)])
        self.assertEqual((g1.segment, g1.opened, g2.segment, g2.opened), (5, [], 6, [6]))
        self.assertEqual([n for n, _ in list_segments(directory)], [5, 6])
        os.close(c._fd)


class ZeroAheadTests(SynchronousTestCase):
    """
    The writer keeps the blocks ahead of its writes written (zeros, synced),
    so that a group's fdatasync does not have to commit an extent change.
    """

    def writer(self, sync=os.fdatasync, segment_size=1 << 20, zero_ahead=4096):
        directory = temp_dir(self)
        c = GroupCommitter(directory, 0, segment_size, None, None, sync=sync,
                           timer=lambda: 0.0, zero_ahead=zero_ahead)
        self.addCleanup(lambda: c._fd is not None and os.close(c._fd))
        return directory, c

    def test_opened_segment_is_zeroed_ahead(self) -> None:
        syncs = []
        directory, c = self.writer(sync=lambda fd: (syncs.append(fd), os.fdatasync(fd)))
        c._open(0)
        self.assertEqual((c._zeroed, len(syncs)), (4096, 1))
        with open(files.segment_path(directory, 0), "rb") as f:
            self.assertEqual(f.read(4096), bytes(4096))

    def test_zeroing_follows_the_writes_and_never_overwrites_them(self) -> None:
        """
        Once the writes come within C{zero_ahead} of the zeroed end, the
        next stretch is zeroed, starting after the last record.
        """
        directory, c = self.writer()
        c._open(0)
        records = [encode_events("raw", i, events(1, "x" * 900)) for i in range(6)]
        for i, record in enumerate(records):
            c.commit([(record, i, None)])
            c.zero_ahead_of_writes()
            self.assertGreaterEqual(c._zeroed, c._size + 1)
            self.assertLessEqual(c._zeroed, c._size + 2 * 4096)
        with open(files.segment_path(directory, 0), "rb") as f:
            result = scan(f.read())
        self.assertEqual([r.seq for r in result.records], list(range(6)))
        self.assertEqual(result.damaged, [])

    def test_zeroing_stops_at_the_segment_size(self) -> None:
        directory, c = self.writer(segment_size=6000)
        c._open(0)
        c.commit([(encode_events("raw", 0, events(1, "x" * 3000)), 0, None)])
        c.zero_ahead_of_writes()
        self.assertEqual(c._zeroed, 6000)
        self.assertEqual(os.path.getsize(files.segment_path(directory, 0)), 6000)

    def test_a_failed_zeroing_fails_the_log(self) -> None:
        """
        A write or sync error while zeroing is the log's error: after a
        failed fsync the page cache cannot be trusted, so the next group
        fails with it and nothing more is written.
        """
        calls = []

        def sync(fd):
            calls.append(fd)
            if len(calls) == 3:  # the zeroing at open, the group, the zeroing
                raise OSError(5, "Input/output error")

        directory, c = self.writer(sync=sync)
        c._open(0)
        first = c.commit([(encode_events("raw", 0, events(1, "x" * 4000)), 0, None)])
        self.assertIsNone(first.error)
        c.zero_ahead_of_writes()
        self.assertIsInstance(c.error, OSError)
        second = c.commit([(encode_events("raw", 1, events(1)), 1, None)])
        self.assertIs(second.error, c.error)

    def test_off(self) -> None:
        syncs = []
        directory, c = self.writer(sync=syncs.append, zero_ahead=0)
        c._open(0)
        c.zero_ahead_of_writes()
        self.assertEqual((syncs, c._zeroed), ([], 0))


class CommitDelayTests(SynchronousTestCase):
    def test_busy_writer_gathers_a_group(self) -> None:
        """
        After a group of several records, the writer waits its commit delay
        before the next group, so records submitted meanwhile share a sync;
        every record is still committed once, in order.
        """
        directory = temp_dir(self)
        groups = []
        done = threading.Event()
        total = 40

        def on_group(group):
            groups.append(group.records)
            if sum(groups) == total:
                done.set()

        c = GroupCommitter(directory, 0, 1 << 20, lambda f, *a: f(*a), on_group,
                           commit_delay=0.05)
        c._last_group = 2
        c.start()
        for i in range(total):
            c.submit(encode_events("raw", i, events(1)), i, lambda e: None)
        self.assertTrue(done.wait(10))
        stopped = threading.Event()
        c.stop(stopped.set)
        self.assertTrue(stopped.wait(10))
        self.assertLessEqual(len(groups), 3)
        with open(files.segment_path(directory, 0), "rb") as f:
            self.assertEqual([r.seq for r in scan(f.read()).records], list(range(total)))


class RollRaceTests(WalMixin, SynchronousTestCase):
    def test_segment_kept_until_its_last_group_is_reported(self) -> None:
        """
        The writer may roll to a new segment before the reactor hears of the
        last group it wrote to the old one; the old segment must not be
        deleted on the strength of what the reactor knew before.
        """
        self.segment_size = 200
        wal = self.make_wal()
        self.start(wal)
        committer = wal.committers[0]
        wal.log_events("raw", events(2, "a"), lambda e: None)
        committer.flush()
        wal.batch_done("raw", wal.seal("raw", 2)[0])
        wal.log_events("raw", events(2, "b"), lambda e: None)   # to segment 0, not reported yet
        held = []
        committer.on_group = held.append
        committer.flush()
        wal.log_events("raw", events(2, "c"), lambda e: None)   # rolls to segment 1
        committer.flush()
        self.assertEqual(committer.segment, 1)
        self.clock.advance(1)
        self.assertEqual([n for n, _ in list_segments(self.directory)], [0, 1])
        for group in held:
            wal._on_group(group)
        self.clock.advance(1)
        self.assertEqual([n for n, _ in list_segments(self.directory)], [0, 1])


class BadStartTests(WalMixin, SynchronousTestCase):
    def test_unreadable_checkpoint_replays_everything(self) -> None:
        self.directory = temp_dir(self)
        write_segment(self.directory, 0, encode_events("raw", 0, events(2))
                      + encode_seal("raw", 0, 1, 2, START, "raw/k", "dlq/k"))
        with open(os.path.join(self.directory, "checkpoint"), "wb") as f:
            f.write(b"\x00garbage")
        r = recover(self.directory, lambda: "new")
        self.assertEqual(r.low_water, 0)
        [sealed] = r.sealed["raw"]
        self.assertEqual(sealed.seal.key, "raw/k")
        self.assertTrue(any("checkpoint" in text for text, _ in r.problems))

    def test_log_that_cannot_be_opened_fails_without_crashing(self) -> None:
        """
        A log that cannot be read at all fails (503 wal_failed, logged,
        counted) instead of stopping the process or retrying in a loop.
        """
        self.directory = temp_dir(self)
        os.mkdir(os.path.join(self.directory, "checkpoint"))
        wal = self.make_wal()
        with capturedLogs() as logged:
            wal.startService()
        self.addCleanup(self._stop, wal)
        self.assertEqual(wal.refusal(), "wal_failed")
        self.assertEqual(self.sample("wal_failed"), 1)
        self.assertIsNone(self.successResultOf(wal.when_open()))
        self.assertTrue(any(e.get("log_level") is not None and "could not open" in
                            str(e.get("log_format")) for e in logged))
        self.flushLoggedErrors(IsADirectoryError)
