# -*- test-case-name: estat.test.test_metrics -*-
"""
Every Prometheus metric Estat exports, on a registry the caller owns.

The first eight names are the original service's contract and must never
change.  This module never registers anything on prometheus-client's global
default registry.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "SEED_METRIC_NAMES", "HotCounter",
           "HotLabeledCounter", "HotHistogram"]

#: The original Go service's metric names, as exported: operators' contract.
SEED_METRIC_NAMES = (
    "http_requests_total",
    "http_requests_accepted_total",
    "http_requests_rejected_queue_full_total",
    "s3_events_stored_total",
    "s3_put_errors_total",
    "dlq_events_enqueued_total",
    "dlq_events_dropped_total",
    "dlq_files_current",
)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
_UPLOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HotCounter:
    """
    A counter for the request path, exported like a prometheus-client
    C{Counter}: a plain integer, no lock.  prometheus-client takes a lock
    per C{inc} (0.9 us here; five of them were a tenth of a small
    request's CPU).  Only the reactor thread may change it; a scrape reads
    it on the reactor thread too.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self.value = 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self):
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self):
        return [CounterMetricFamily(self._name, self._documentation, value=self.value)]


class _HotChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class HotLabeledCounter:
    """
    A labelled L{HotCounter}: C{labels(*values)} gives a child whose
    C{inc} is a plain addition.  The same rule: the reactor thread only.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple,
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict = {}
        registry.register(self)

    def labels(self, *values) -> _HotChild:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            child = self._children[key] = _HotChild()
        return child

    def describe(self):
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self):
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        return [family]


class HotHistogram:
    """
    A histogram for the request path, exported like a prometheus-client
    C{Histogram}; the same rule as L{HotCounter}: the reactor thread only.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple,
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self):
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self):
        cumulative = []
        total = 0
        for bound, count in zip(self._bounds + (float("inf"),), self._counts):
            total += count
            cumulative.append((_bound_text(bound), total))
        return [HistogramMetricFamily(self._name, self._documentation,
                                      buckets=cumulative, sum_value=self._sum)]


def _bound_text(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(bound)


class Metrics:
    """
    The metrics of one Estat process.

    Counter names are given without C{_total}: prometheus-client adds it,
    so C{Counter("http_requests")} is exported as C{http_requests_total}.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        r = registry

        # --- the seed's eight names ---
        self.http_requests = HotCounter(
            "http_requests", "HTTP requests received", registry=r)
        self.http_requests_accepted = HotCounter(
            "http_requests_accepted",
            "Requests whose events were all put on the event queue", registry=r)
        self.http_requests_rejected_queue_full = Counter(
            "http_requests_rejected_queue_full",
            "Requests refused with 503 because the event queue was full",
            registry=r)
        self.s3_events_stored = Counter(
            "s3_events_stored",
            "Events stored in the object store (S3 or the local directory store)",
            registry=r)
        self.s3_put_errors = Counter(
            "s3_put_errors", "Failed upload attempts", registry=r)
        self.dlq_events_enqueued = Counter(
            "dlq_events_enqueued",
            "Events written to the local dead-letter queue", registry=r)
        self.dlq_events_dropped = Counter(
            "dlq_events_dropped",
            "Accepted events lost for good (dead-letter queue full, expired, "
            "unwritable or corrupt); see events_dropped_total for reasons",
            registry=r)
        self.dlq_files_current = Gauge(
            "dlq_files_current", "Files in the local dead-letter queue",
            registry=r)

        # --- what an operator needs beside them ---
        self.http_requests_rejected = Counter(
            "http_requests_rejected",
            "Requests answered with an error, by reason",
            ["reason"], registry=r)
        self.http_request_duration = HotHistogram(
            "http_request_duration_seconds",
            "Time to answer POST /collect", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.http_connections_open = Gauge(
            "http_connections_open", "Open HTTP connections", registry=r)
        self.http_connections_refused = Counter(
            "http_connections_refused",
            "Connections closed at once because MAX_CONNECTIONS were open",
            registry=r)
        self.events_accepted = HotCounter(
            "events_accepted", "Events put on the event queue", registry=r)
        self.events_rejected = Counter(
            "events_rejected", "Events refused, by reason", ["reason"],
            registry=r)
        self.events_dropped = Counter(
            "events_dropped",
            "Accepted events that will never be stored, by reason",
            ["reason"], registry=r)
        self.event_queue_depth = Gauge(
            "event_queue_depth", "Events waiting in the in-memory queue",
            registry=r)
        self.event_queue_capacity = Gauge(
            "event_queue_capacity", "Capacity of the in-memory event queue",
            registry=r)
        self.event_queue_waiting_requests = Gauge(
            "event_queue_waiting_requests",
            "Requests waiting for room on the full event queue (QUEUE_MAX_WAIT)",
            registry=r)
        self.event_queue_waiting_events = Gauge(
            "event_queue_waiting_events",
            "Events of the requests waiting for room on the event queue",
            registry=r)
        self.event_queue_waits = Counter(
            "event_queue_waits",
            "Requests that found the event queue full and waited, by outcome "
            "(admitted, timed_out, shutdown; the last two were answered 503)",
            ["outcome"], registry=r)
        self.event_queue_wait_duration = Histogram(
            "event_queue_wait_duration_seconds",
            "How long an admitted request waited for room on the event queue",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.batches_pending = Gauge(
            "batches_pending",
            "Sealed batches being encoded, uploaded or dead-lettered",
            registry=r)
        self.batches_sealed = Counter(
            "batches_sealed", "Batches sealed, by trigger", ["trigger"],
            registry=r)
        self.batches_stored = Counter(
            "batches_stored", "Batches stored in the object store", registry=r)
        self.s3_put_duration = Histogram(
            "s3_put_duration_seconds",
            "Duration of one successful upload attempt",
            buckets=_UPLOAD_BUCKETS, registry=r)
        self.s3_put_errors_by_code = Counter(
            "s3_put_errors_by_code",
            "Failed upload attempts by S3 error code or failure kind",
            ["code"], registry=r)
        self.s3_put_retries = Counter(
            "s3_put_retries", "Upload attempts that were retries", registry=r)
        self.encoder_poison_events = Counter(
            "encoder_poison_events",
            "Events that could not be encoded and were stored raw under DLQ_PREFIX",
            registry=r)
        self.column_mismatches = Counter(
            "estat_column_mismatches",
            "Values that did not fit their declared Parquet column (kept in _extra, "
            "the column null), counted when a batch is encoded",
            ["stream", "column"], registry=r)
        self.partition_overflow_events = Counter(
            "estat_partition_overflow_events",
            "Events sent to the __other__ partition because MAX_PARTITIONS partitions "
            "already held unsealed events",
            ["stream"], registry=r)
        self.dlq_bytes_current = Gauge(
            "dlq_bytes_current", "Bytes in the local dead-letter queue",
            registry=r)
        self.dlq_events_recovered = Counter(
            "dlq_events_recovered",
            "Events uploaded from the dead-letter queue", registry=r)
        self.dlq_files_quarantined = Counter(
            "dlq_files_quarantined",
            "Unreadable dead-letter files moved aside", registry=r)
        self.loop_errors = Counter(
            "loop_errors", "Unexpected errors caught in a background loop",
            ["loop"], registry=r)
        self.events_deduplicated = Counter(
            "events_deduplicated",
            "Events acknowledged but not stored again: their messageId was admitted "
            "within DEDUP_WINDOW (a client's retry), by stream", ["stream"], registry=r)
        self.dedup_ids = Gauge(
            "dedup_ids", "Message ids the dedup window holds", registry=r)
        self.dedup_ids_evicted_early = Counter(
            "dedup_ids_evicted_early",
            "Message ids forgotten before DEDUP_WINDOW was over, because "
            "DEDUP_MAX_IDS were held", registry=r)
        self.schema_events = HotLabeledCounter(
            "estat_schema_events",
            "Events checked against the tracking plan (SCHEMAS), by stream, schema and "
            "result (valid, invalid)", ("stream", "schema", "result"), registry=r)
        self.schema_errors = Counter(
            "estat_schema_errors",
            "Schema errors found in events (at most 100 per event), by stream, schema "
            "and JSON Schema keyword", ["stream", "schema", "keyword"], registry=r)
        self.schema_plan_reloads = Counter(
            "estat_schema_plan_reloads",
            "Tracking plan reloads on SIGHUP, by result (loaded, failed: the running "
            "plan is kept)", ["result"], registry=r)
        self.shutdown_events_unsaved = Counter(
            "shutdown_events_unsaved",
            "Events still in memory when the shutdown deadline passed",
            registry=r)

        # --- acknowledgement modes (ACK_MODE=disk: the write-ahead log) ---
        self.wal_bytes_current = Gauge(
            "wal_bytes_current", "Bytes in the write-ahead log's segments", registry=r)
        self.wal_segments_current = Gauge(
            "wal_segments_current", "Segment files of the write-ahead log", registry=r)
        # Observed on the reactor thread once per group commit.
        self.wal_commit_duration = HotHistogram(
            "wal_commit_duration_seconds",
            "Time of one group commit (write + fdatasync)",
            (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
             0.1, 0.25, 1.0), r)
        self.wal_commit_batch_size = HotHistogram(
            "wal_commit_batch_size", "Records (requests and seals) made durable by one group commit",
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), r)
        self.wal_events_replayed = Counter(
            "wal_events_replayed",
            "Events read back from the write-ahead log at start-up and uploaded again",
            registry=r)
        self.wal_records_set_aside = Counter(
            "wal_records_set_aside",
            "Damaged stretches of the write-ahead log set aside at start-up (copied to "
            "WAL_DIR/corrupt); their events cannot be replayed", registry=r)
        self.wal_full_refusals = Counter(
            "wal_full_refusals",
            "Requests refused with 503 because the write-ahead log was at WAL_MAX_SIZE_BYTES",
            registry=r)
        self.wal_failed = Gauge(
            "wal_failed",
            "1 once a write or fsync of the write-ahead log failed: no more events are "
            "accepted until a restart", registry=r)
        self.ack_requests_waiting = Gauge(
            "ack_requests_waiting",
            "Requests waiting for their acknowledgement (ACK_MODE=disk: the fsync; "
            "stored: the upload)", registry=r)
        #: Callables giving each admission's waiting requests (read at scrape
        #: time, so that the hot path pays nothing for this gauge).
        self.ack_waiting_sources: list = []
        self.ack_requests_waiting.set_function(
            lambda: sum(source() for source in self.ack_waiting_sources))

    def exposition(self) -> bytes:
        """
        The registry in Prometheus' text format.
        """
        return generate_latest(self.registry)
