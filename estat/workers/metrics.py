# -*- test-case-name: estat.test.test_workers_metrics -*-
"""
One C{/metrics} for C{WORKERS=N}, whichever worker answers the scrape.

Each worker writes a snapshot of its registry (every family's samples, as
JSON) to C{<slot>-<pid>.json} in a private directory the supervisor makes
(C{ESTAT_METRICS_DIR}), once a second and once more after its shutdown
(L{MetricsShare}).  When a worker ends, the supervisor renames its file to
C{dead-<slot>-<pid>.json} (L{retire_snapshot}), and it stays: what a killed
worker counted is never forgotten, so a counter never goes down.

A scrape (L{MetricsScrape}) takes every file as last written, the
answering worker's own included, for the counts, and the answering
worker's registry as it is now for its gauges, and merges them
(L{merge_snapshots}).  Counting from the files only keeps every counter
monotonic from one scrape to the next whichever worker answers each (a
worker's live counts are ahead of its file by up to a second):

  - counters, histograms and summaries: summed over every worker, live and
    dead (a C{_created} sample: the earliest);
  - gauges: one sample per live worker with a C{worker} label (its slot),
    except the gauges of shared state (L{SHARED_GAUGES}: the dead-letter
    directory every worker shares and counts), given once, as the
    answering worker counts them.

Nothing on the request path changes: the cost is one registry collection
a second per worker, and the merge per scrape.  A worker killed with
C{SIGKILL} loses at most the last second of its counts.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import attr
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..fsutil import process_running

__all__ = ["make_directory", "SHARED_GAUGES", "snapshot", "merge_snapshots", "render", "MetricsShare",
           "MetricsScrape", "retire_snapshot", "read_snapshots"]

#: Gauges of state the workers share: given once, not per worker.
SHARED_GAUGES = frozenset({"dlq_files_current", "dlq_bytes_current"})

_SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_TEMP = ".tmp-"
_DEAD = "dead-"


def snapshot(registry) -> list:
    """
    C{registry}'s families as plain data: C{[name, type, help, [[sample,
    labels, value], ...]]} each.  Call it on the reactor thread (the hot
    counters are read without a lock).
    """
    return [[m.name, m.type, m.documentation, [[s.name, s.labels, s.value] for s in m.samples]]
            for m in registry.collect()]


def _file_name(slot: int, pid: int) -> str:
    return f"{slot}-{pid}.json"


def _parse_name(name: str) -> tuple[bool, int, int] | None:
    """
    C{(live, slot, pid)} of a snapshot file's name, or C{None}.
    """
    if not name.endswith(".json") or name.startswith(_TEMP):
        return None
    live = not name.startswith(_DEAD)
    stem = name[:-5] if live else name[len(_DEAD):-5]
    slot_text, _, pid_text = stem.partition("-")
    try:
        return live, int(slot_text), int(pid_text)
    except ValueError:
        return None


def make_directory(parent: str | None = None, pid: int | None = None) -> str:
    """
    The supervisor's private directory of snapshots,
    C{estat-metrics-<pid>-<random>} in the temporary directory; those of
    supervisors that are gone (killed before they could remove theirs) are
    removed first.
    """
    import shutil
    import tempfile

    parent = parent or tempfile.gettempdir()
    pid = os.getpid() if pid is None else pid
    for name in os.listdir(parent):
        if not name.startswith("estat-metrics-"):
            continue
        owner = name[len("estat-metrics-"):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != pid and not process_running(int(owner)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"estat-metrics-{pid}-", dir=parent)


def write_snapshot(directory: str, slot: int, pid: int, data: bytes) -> None:
    """
    Replace this worker's snapshot file with C{data} atomically (blocking:
    a thread, or after shutdown).
    """
    temp = os.path.join(directory, f"{_TEMP}{pid}")
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, os.path.join(directory, _file_name(slot, pid)))


def retire_snapshot(directory: str, slot: int, pid: int) -> None:
    """
    The supervisor, when worker C{slot} (process C{pid}) has ended: its
    counts stay, its gauges go.
    """
    try:
        os.replace(os.path.join(directory, _file_name(slot, pid)),
                   os.path.join(directory, _DEAD + _file_name(slot, pid)))
    except FileNotFoundError:
        pass


def read_snapshots(directory: str, skip_pid: int | None = None,
                   own_pid: int | None = None) -> list:
    """
    C{[(live, slot, families), ...]} of every snapshot in C{directory} but
    C{skip_pid}'s (blocking); C{own_pid}'s is given as not live (its gauges
    come from the registry itself).  A file renamed between the listing and
    the read is read under its new name.
    """
    out = []
    for name in sorted(os.listdir(directory)):
        parsed = _parse_name(name)
        if parsed is None:
            continue
        live, slot, pid = parsed
        if pid == skip_pid:
            continue
        names = [name, _DEAD + name] if live else [name]
        for candidate in names:
            try:
                with open(os.path.join(directory, candidate), "rb") as f:
                    families = json.loads(f.read())
            except FileNotFoundError:
                continue
            except ValueError:
                break
            out.append((live and candidate == name and pid != own_pid, slot, families))
            break
    return out


def merge_snapshots(own_slot: int, own: list, others: list, own_counts: bool = True) -> list:
    """
    One set of families from this worker's C{own} snapshot and the
    C{others} (as L{read_snapshots} gives them).  Without C{own_counts},
    C{own} gives gauges only (its counts are in C{others}, from its file).
    """
    families: dict = {}
    order: list = []

    def family(name, kind, documentation):
        entry = families.get(name)
        if entry is None:
            entry = families[name] = [kind, documentation, {}]
            order.append(name)
        return entry

    for index, (live, slot, snapshot_families) in enumerate([(True, own_slot, own)]
                                                             + list(others)):
        is_own = index == 0
        for name, kind, documentation, samples in snapshot_families:
            kind_, _, values = family(name, kind, documentation)
            if kind_ in _SUMMED:
                if is_own and not own_counts:
                    continue
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    if value is None:
                        continue
                    if sample.endswith("_created"):
                        values[key] = min(values.get(key, value), value)
                    else:
                        values[key] = values.get(key, 0.0) + value
            elif name in SHARED_GAUGES:
                if is_own:
                    for sample, labels, value in samples:
                        values[(sample, tuple(sorted(labels.items())))] = value
            elif live:
                for sample, labels, value in samples:
                    labelled = dict(labels, worker=str(slot))
                    values[(sample, tuple(sorted(labelled.items())))] = value
    out = []
    for name in order:
        kind, documentation, values = families[name]
        out.append([name, kind, documentation,
                    [[sample, dict(labels), value] for (sample, labels), value in values.items()]])
    return out


def render(families: list) -> bytes:
    """
    Merged families in Prometheus' text format.
    """
    metrics = []
    for name, kind, documentation, samples in families:
        metric = Metric(name, documentation, kind)
        for sample, labels, value in samples:
            metric.add_sample(sample, labels, value)
        metrics.append(metric)

    class _Collected:
        def collect(self):
            return metrics

    return generate_latest(_Collected())


@attr.s
class MetricsShare(Service):
    """
    A worker's side: its snapshot file, every C{interval} seconds and once
    after shutdown.
    """

    log = Logger()

    directory: str = attr.ib()
    slot: int = attr.ib()
    registry = attr.ib()
    clock = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    interval: float = attr.ib(default=1.0)
    pid: int = attr.ib(factory=os.getpid)

    _loop: LoopingCall | None = attr.ib(default=None, init=False)
    _writing: Deferred | None = attr.ib(default=None, init=False)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.write)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def _write(self, families: list) -> None:
        write_snapshot(self.directory, self.slot, self.pid,
                       json.dumps(families).encode("utf-8"))

    def write(self) -> Deferred:
        """
        Write a snapshot now, unless one is being written: the registry is
        read here, on the reactor thread (its hot counters have no lock),
        and encoded and written in a thread.
        """
        if self._writing is not None:
            return succeed(None)
        families = snapshot(self.registry)
        d = self._writing = self.run_in_thread(self._write, families)

        def done(result):
            self._writing = None
            if hasattr(result, "value"):
                self.log.failure("could not write the metrics snapshot", result)
            return None

        d.addBoth(done)
        return d

    def write_final(self) -> None:
        """
        The last snapshot, after every service has stopped (blocking: the
        reactor's work is done).
        """
        try:
            self._write(snapshot(self.registry))
        except OSError as e:
            self.log.error("could not write the last metrics snapshot: {error}", error=str(e))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


@attr.s
class MetricsScrape:
    """
    The answering worker's side: C{exposition()} fires with the merged
    text (the files are read and merged in a thread).
    """

    directory: str = attr.ib()
    slot: int = attr.ib()
    registry = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    pid: int = attr.ib(factory=os.getpid)

    def exposition(self) -> Deferred:
        own = snapshot(self.registry)
        return self.run_in_thread(self._merged, own)

    def _merged(self, own: list) -> bytes:
        files = read_snapshots(self.directory, own_pid=self.pid)
        return render(merge_snapshots(self.slot, own, files, own_counts=False))
