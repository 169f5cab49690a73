# -*- test-case-name: estat.test.test_workers_metrics -*-
"""
Tests for L{estat.workers.metrics}: one C{/metrics} over every worker's
registry.
"""

from __future__ import annotations

import json
import os

from prometheus_client import CollectorRegistry
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from estat.metrics import Metrics
from estat.test.harness import parse_metrics
from estat.workers.metrics import (
    MetricsScrape,
    MetricsShare,
    merge_snapshots,
    read_snapshots,
    render,
    retire_snapshot,
    snapshot,
    write_snapshot,
)


def run_synchronously(f, *args):
    return succeed(f(*args))


def worker_metrics(requests: int, depth: int, dlq_files: int) -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.http_requests.inc(requests)
    metrics.event_queue_depth.set(depth)
    metrics.dlq_files_current.set(dlq_files)
    metrics.events_rejected.labels("too_large").inc(requests // 2)
    return metrics


class MergeTests(SynchronousTestCase):

    def merged(self, own: Metrics, others: list) -> dict:
        text = render(merge_snapshots(0, snapshot(own.registry), others)).decode()
        return parse_metrics(text)

    def test_counters_are_summed_over_live_and_dead_workers(self) -> None:
        own = worker_metrics(10, 1, 3)
        live = snapshot(worker_metrics(5, 2, 3).registry)
        dead = snapshot(worker_metrics(7, 9, 3).registry)
        samples = self.merged(own, [(True, 1, live), (False, 1, dead)])
        self.assertEqual(samples["http_requests_total"], 22)
        self.assertEqual(samples['events_rejected_total{reason="too_large"}'], 5 + 2 + 3)

    def test_gauges_per_live_worker(self) -> None:
        own = worker_metrics(10, 1, 3)
        live = snapshot(worker_metrics(5, 2, 3).registry)
        dead = snapshot(worker_metrics(7, 9, 3).registry)
        samples = self.merged(own, [(True, 1, live), (False, 1, dead)])
        self.assertEqual(samples['event_queue_depth{worker="0"}'], 1)
        self.assertEqual(samples['event_queue_depth{worker="1"}'], 2)
        self.assertEqual([k for k in samples if k.startswith("event_queue_depth")],
                         ['event_queue_depth{worker="0"}', 'event_queue_depth{worker="1"}'])

    def test_shared_gauges_once(self) -> None:
        own = worker_metrics(1, 1, 4)
        other = snapshot(worker_metrics(1, 1, 6).registry)
        samples = self.merged(own, [(True, 1, other)])
        self.assertEqual([(k, v) for k, v in samples.items() if k.startswith("dlq_files_current")],
                         [("dlq_files_current", 4)])

    def test_histograms_are_summed(self) -> None:
        a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
        a.http_request_duration.observe(0.0004)
        b.http_request_duration.observe(0.0004)
        b.http_request_duration.observe(3.0)
        samples = self.merged(a, [(True, 1, snapshot(b.registry))])
        self.assertEqual(samples["http_request_duration_seconds_count"], 3)
        self.assertEqual(samples['http_request_duration_seconds_bucket{le="0.0005"}'], 2)
        self.assertEqual(samples['http_request_duration_seconds_bucket{le="+Inf"}'], 3)

    def test_created_is_the_earliest(self) -> None:
        families = [["x", "counter", "X", [["x_total", {}, 1.0], ["x_created", {}, 50.0]]]]
        others = [(True, 1, [["x", "counter", "X", [["x_total", {}, 2.0],
                                                     ["x_created", {}, 20.0]]]])]
        [[_, _, _, samples]] = merge_snapshots(0, families, others)
        self.assertEqual(sorted(map(tuple, [(s, v) for s, _, v in samples])),
                         [("x_created", 20.0), ("x_total", 3.0)])

    def test_the_text_is_valid_prometheus(self) -> None:
        own = worker_metrics(3, 1, 0)
        text = render(merge_snapshots(0, snapshot(own.registry), [])).decode()
        self.assertIn("# TYPE http_requests_total counter", text)
        self.assertIn('# TYPE event_queue_depth gauge', text)
        self.assertEqual(text.count("# TYPE http_requests_total"), 1)


class FilesTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_read_skips_own_and_sees_retired(self) -> None:
        write_snapshot(self.directory, 0, 100, b"[]")
        write_snapshot(self.directory, 1, 101, json.dumps([["a", "gauge", "", []]]).encode())
        write_snapshot(self.directory, 1, 99, b"[]")
        retire_snapshot(self.directory, 1, 99)
        found = read_snapshots(self.directory, skip_pid=100)
        self.assertEqual(sorted((live, slot) for live, slot, _ in found), [(False, 1), (True, 1)])

    def test_a_file_retired_after_the_listing_is_read_as_dead(self) -> None:
        write_snapshot(self.directory, 1, 101, b"[]")
        real_listdir = os.listdir

        def listdir(path):
            names = real_listdir(path)
            retire_snapshot(self.directory, 1, 101)
            return names

        self.patch(os, "listdir", listdir)
        self.assertEqual(read_snapshots(self.directory, skip_pid=1), [(False, 1, [])])

    def test_temporary_and_broken_files_are_ignored(self) -> None:
        with open(os.path.join(self.directory, ".tmp-5"), "w") as f:
            f.write("[")
        with open(os.path.join(self.directory, "0-7.json"), "w") as f:
            f.write("[")
        with open(os.path.join(self.directory, "README"), "w") as f:
            f.write("x")
        self.assertEqual(read_snapshots(self.directory, skip_pid=1), [])

    def test_make_directory_removes_those_of_dead_supervisors(self) -> None:
        from estat.workers.metrics import make_directory

        dead = os.path.join(self.directory, "estat-metrics-999999999-abc")
        live = os.path.join(self.directory, f"estat-metrics-{os.getppid()}-abc")
        other = os.path.join(self.directory, "unrelated")
        for path in (dead, live, other):
            os.makedirs(path)
        made = make_directory(self.directory, pid=os.getpid())
        self.assertTrue(os.path.basename(made).startswith(f"estat-metrics-{os.getpid()}-"))
        self.assertEqual(sorted(os.listdir(self.directory)),
                         sorted([os.path.basename(made), os.path.basename(live), "unrelated"]))

    def test_retiring_a_missing_file_is_fine(self) -> None:
        retire_snapshot(self.directory, 0, 12345)


class ShareAndScrapeTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.clock = Clock()

    def test_writes_every_second_and_at_the_end(self) -> None:
        metrics = Metrics(CollectorRegistry())
        share = MetricsShare(directory=self.directory, slot=1, registry=metrics.registry,
                             clock=self.clock, run_in_thread=run_synchronously, pid=4242)
        share.startService()
        path = os.path.join(self.directory, "1-4242.json")
        self.assertTrue(os.path.exists(path))
        metrics.http_requests.inc(3)
        self.clock.advance(0.5)
        self.assertEqual(self.requests_in(path), 0)
        self.clock.advance(0.5)
        self.assertEqual(self.requests_in(path), 3)
        share.stopService()
        metrics.http_requests.inc(2)
        self.clock.advance(5)
        self.assertEqual(self.requests_in(path), 3)
        share.write_final()
        self.assertEqual(self.requests_in(path), 5)

    def test_a_failed_write_is_logged_and_the_next_one_tried(self) -> None:
        """
        The directory gone (removed under a running worker): each write
        logs why, nothing raises, and the loop goes on.
        """
        from twisted.internet.defer import maybeDeferred
        from twisted.logger import capturedLogs

        metrics = Metrics(CollectorRegistry())
        missing = os.path.join(self.directory, "gone")
        share = MetricsShare(directory=missing, slot=0, registry=metrics.registry,
                             clock=self.clock, pid=4243,
                             run_in_thread=lambda f, *a: maybeDeferred(f, *a))
        with capturedLogs() as events:
            share.startService()
            self.clock.advance(1)
            share.write_final()
        failures = [e for e in events if "metrics snapshot" in e.get("log_format", "")]
        self.assertEqual(len(failures), 3, [e.get("log_format") for e in events])
        self.flushLoggedErrors(FileNotFoundError)
        os.makedirs(missing)
        self.clock.advance(1)
        self.assertTrue(os.path.exists(os.path.join(missing, "0-4243.json")))
        share.stopService()

    def requests_in(self, path: str) -> float:
        with open(path) as f:
            families = json.load(f)
        [samples] = [s for name, _, _, s in families if name == "http_requests"]
        return sum(v for n, _, v in samples if n == "http_requests_total")

    def test_scrape_counts_from_the_files_and_gauges_from_the_registry(self) -> None:
        """
        Counts come from every file, this worker's included (so that they
        never go down between scrapes answered by different workers); this
        worker's gauges are read live.
        """
        mine, theirs = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
        theirs.http_requests.inc(4)
        write_snapshot(self.directory, 1, 501, json.dumps(snapshot(theirs.registry)).encode())
        mine.http_requests.inc(1)
        mine.event_queue_depth.set(1)
        write_snapshot(self.directory, 0, 500, json.dumps(snapshot(mine.registry)).encode())
        mine.http_requests.inc(1)
        mine.event_queue_depth.set(7)
        scrape = MetricsScrape(directory=self.directory, slot=0, registry=mine.registry,
                               run_in_thread=run_synchronously, pid=500)
        samples = parse_metrics(self.successResultOf(scrape.exposition()).decode())
        self.assertEqual(samples["http_requests_total"], 5)
        self.assertEqual(samples['event_queue_depth{worker="0"}'], 7)
        self.assertEqual(len([k for k in samples if k.startswith("event_queue_depth")]), 2)
