# -*- test-case-name: estat.test.test_metrics -*-
"""
Tests for L{estat.metrics}.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from estat.metrics import CONTENT_TYPE_LATEST, SEED_METRIC_NAMES, Metrics


def seed_metric(name: str) -> tuple:
    """
    The L{Metrics} attribute behind a seed name and the name's type: a
    counter's attribute is its name without C{_total} (prometheus-client
    adds it); C{dlq_files_current}, the one name without it, is a gauge.
    """
    if name.endswith("_total"):
        return name[:-len("_total")], "counter"
    return name, "gauge"


def samples(metrics: Metrics) -> dict:
    """
    The exposition parsed back: sample name -> (family type, value), for
    samples without labels.
    """
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode("utf-8")):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = (family.type, sample.value)
    return out


def exposed_lines(metrics: Metrics) -> list:
    return [line for line in metrics.exposition().decode("utf-8").splitlines()
            if line and not line.startswith("#")]


class SeedMetricsTests(SynchronousTestCase):
    def test_seedMetricNames(self) -> None:
        """
        L{SEED_METRIC_NAMES} is the seed's section 5, to the letter and in
        its order: the operators' contract, written out here once.
        """
        self.assertEqual(SEED_METRIC_NAMES, (
            "http_requests_total",
            "http_requests_accepted_total",
            "http_requests_rejected_queue_full_total",
            "s3_events_stored_total",
            "s3_put_errors_total",
            "dlq_events_enqueued_total",
            "dlq_events_dropped_total",
            "dlq_files_current",
        ))
        self.assertEqual([seed_metric(name)[1] for name in SEED_METRIC_NAMES],
                         ["counter"] * 7 + ["gauge"])

    def test_seedNamesExported(self) -> None:
        """
        Each of the eight names is a sample of the exposition, exactly as the
        seed spells it, with the seed's type and a zero start.
        """
        exported = samples(Metrics(CollectorRegistry()))
        for name in SEED_METRIC_NAMES:
            _attribute, kind = seed_metric(name)
            self.assertIn(name, exported)
            self.assertEqual(exported[name], (kind, 0.0), name)

    def test_seedNamesAreLiteralLines(self) -> None:
        metrics = Metrics(CollectorRegistry())
        text = metrics.exposition().decode("utf-8")
        lines = exposed_lines(metrics)
        for name in SEED_METRIC_NAMES:
            self.assertIn(name + " 0.0", lines)
            self.assertIn("# TYPE " + name + " ", text)

    def test_attributesFeedTheSeedNames(self) -> None:
        """
        Each seed metric moves when, and only when, its attribute does.
        """
        for name in SEED_METRIC_NAMES:
            attribute, kind = seed_metric(name)
            registry = CollectorRegistry()
            metrics = Metrics(registry)
            if kind == "counter":
                getattr(metrics, attribute).inc(3)
            else:
                getattr(metrics, attribute).set(3)
            self.assertEqual(registry.get_sample_value(name), 3.0, name)
            for other in SEED_METRIC_NAMES:
                if other != name:
                    self.assertEqual(registry.get_sample_value(other), 0.0,
                                     f"{attribute} moved {other}")

    def test_noPrefix(self) -> None:
        """
        No namespace or prefix is put in front of the seed's names.
        """
        lines = exposed_lines(Metrics(CollectorRegistry()))
        for name in SEED_METRIC_NAMES:
            matching = [line for line in lines if line.split(" ")[0].endswith(name)]
            self.assertEqual([line.split(" ")[0] for line in matching], [name])

    def test_exposition(self) -> None:
        metrics = Metrics(CollectorRegistry())
        metrics.http_requests.inc()
        body = metrics.exposition()
        self.assertIsInstance(body, bytes)
        self.assertIn(b"\nhttp_requests_total 1.0\n", body)
        self.assertTrue(CONTENT_TYPE_LATEST.startswith("text/plain"))

    def test_labelledCounters(self) -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.http_requests_rejected.labels("too_large").inc()
        metrics.events_dropped.labels(reason="dlq_full").inc(5)
        self.assertEqual(
            registry.get_sample_value("http_requests_rejected_total", {"reason": "too_large"}),
            1.0)
        self.assertEqual(
            registry.get_sample_value("events_dropped_total", {"reason": "dlq_full"}), 5.0)


class RegistryTests(SynchronousTestCase):
    def test_twoRegistriesDoNotClash(self) -> None:
        first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
        first = Metrics(first_registry)
        second = Metrics(second_registry)
        first.http_requests.inc(2)
        second.http_requests.inc(5)
        first.dlq_files_current.set(7)
        self.assertEqual(first_registry.get_sample_value("http_requests_total"), 2.0)
        self.assertEqual(second_registry.get_sample_value("http_requests_total"), 5.0)
        self.assertEqual(first_registry.get_sample_value("dlq_files_current"), 7.0)
        self.assertEqual(second_registry.get_sample_value("dlq_files_current"), 0.0)

    def test_metricsUseTheGivenRegistry(self) -> None:
        """
        The metrics are registered on the registry given, so a second set on
        the same registry is refused as a duplicate.
        """
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        self.assertIs(metrics.registry, registry)
        self.assertRaises(ValueError, Metrics, registry)

    def test_defaultIsAPrivateRegistry(self) -> None:
        first, second = Metrics(), Metrics()
        self.assertIsNot(first.registry, REGISTRY)
        self.assertIsNot(first.registry, second.registry)
        first.s3_put_errors.inc()
        self.assertEqual(first.registry.get_sample_value("s3_put_errors_total"), 1.0)
        self.assertEqual(second.registry.get_sample_value("s3_put_errors_total"), 0.0)

    def test_nothingOnTheGlobalRegistry(self) -> None:
        def global_names() -> set:
            return {sample.name for family in REGISTRY.collect()
                    for sample in family.samples}

        before = global_names()
        metrics = Metrics(CollectorRegistry())
        Metrics()
        metrics.http_requests.inc()
        metrics.dlq_files_current.set(4)
        self.assertEqual(global_names(), before)
        for name in SEED_METRIC_NAMES:
            self.assertIsNone(REGISTRY.get_sample_value(name), name)


class HotMetricsTests(SynchronousTestCase):
    """
    The lock-free request-path metrics export exactly what
    prometheus-client's own would.
    """

    def test_counter_and_histogram_match_prometheus_client(self):
        from prometheus_client import Counter, Histogram

        from estat.metrics import HotCounter, HotHistogram

        hot, reference = CollectorRegistry(), CollectorRegistry()
        counter = HotCounter("things", "Things", hot)
        histogram = HotHistogram("took_seconds", "Took", (0.001, 0.01, 1.0), hot)
        ref_counter = Counter("things", "Things", registry=reference)
        ref_histogram = Histogram("took_seconds", "Took", buckets=(0.001, 0.01, 1.0),
                                  registry=reference)
        for value in (0.0005, 0.001, 0.002, 0.5, 1.0, 3.0):
            histogram.observe(value)
            ref_histogram.observe(value)
        counter.inc()
        counter.inc(4)
        ref_counter.inc(5)
        for name, labels in [("things_total", {}), ("took_seconds_count", {}),
                             ("took_seconds_sum", {})] + [
                ("took_seconds_bucket", {"le": le}) for le in ("0.001", "0.01", "1.0", "+Inf")]:
            self.assertEqual(hot.get_sample_value(name, labels),
                             reference.get_sample_value(name, labels), (name, labels))
