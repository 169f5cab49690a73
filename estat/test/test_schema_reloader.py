# -*- test-case-name: estat.test.test_schema_reloader -*-
"""
Tests for L{estat.schema.reloader} (SIGHUP reloads the plan) and the
start-up checks of C{SCHEMAS} in L{estat.tap}.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.internet.defer import maybeDeferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from estat.config import Config, ConfigError
from estat.ingest.validation import EventValidation
from estat.metrics import Metrics
from estat.schema.plan import load_plan
from estat.schema.reloader import PlanReloader
from estat.tap import _plan, _tables


def synchronous(f, *args):
    return maybeDeferred(f, *args)


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "any.json"), "w") as f:
            f.write('{"required": ["event"]}')
        self.path = os.path.join(self.dir, "plan.yaml")
        self.write("collect:\n  default: {file: any.json, mode: reject}\n")
        self.metrics = Metrics(CollectorRegistry())
        self.validation = EventValidation(load_plan(self.path), self.metrics)
        self.handlers = []
        self.reloader = PlanReloader(path=self.path, validation=self.validation,
                                     metrics=self.metrics, run_in_thread=synchronous,
                                     on_signal=self.install)

    def install(self, handler):
        self.handlers.append(handler)
        return lambda: self.handlers.remove(handler)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def mode(self) -> str:
        return self.validation.plan.check("collect", {}).mode

    def test_signal_reloads(self) -> None:
        self.reloader.startService()
        self.write("collect:\n  default: {file: any.json, mode: quarantine}\n")
        self.handlers[0]()
        self.assertEqual(self.mode(), "quarantine")
        self.assertEqual(self.metrics.registry.get_sample_value(
            "estat_schema_plan_reloads_total", {"result": "loaded"}), 1)
        self.reloader.stopService()
        self.assertEqual(self.handlers, [])

    def test_bad_plan_keeps_the_running_one(self) -> None:
        self.write("collect:\n  default: {file: missing.json, mode: flag}\n")
        with capturedLogs() as events:
            self.successResultOf(self.reloader.reload())
        self.assertEqual(self.mode(), "reject")
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("missing.json", errors[0]["reason"])
        self.assertEqual(self.metrics.registry.get_sample_value(
            "estat_schema_plan_reloads_total", {"result": "failed"}), 1)


class StartupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "cols.json"), "w") as f:
            f.write('{"properties": {"price": {"type": "number"}}}')
        self.path = os.path.join(self.dir, "plan.yaml")
        with open(self.path, "w") as f:
            f.write("collect:\n  columns: cols.json\n  default: {file: cols.json, mode: flag}\n")

    def test_no_plan(self) -> None:
        self.assertIsNone(_plan(Config.defaults()))

    def test_columns_from_the_plan(self) -> None:
        collect, segment = _tables(Config.defaults(schemas=self.path))
        self.assertIn("price", [c.name for c in collect.columns])

    def test_refused_with_column_settings(self) -> None:
        e = self.assertRaises(ConfigError, _plan,
                              Config.defaults(schemas=self.path, collect_schema="x.json"))
        self.assertIn("COLLECT_SCHEMA is set too", str(e))

    def test_bad_prefix_collision(self) -> None:
        e = self.assertRaises(ConfigError, _plan,
                              Config.defaults(schemas=self.path, bad_prefix="segment"))
        self.assertIn("BAD_PREFIX='segment'", str(e))

    def test_plan_that_does_not_load(self) -> None:
        with open(self.path, "w") as f:
            f.write("collect:\n  default: nope.json\n")
        e = self.assertRaises(ConfigError, _plan, Config.defaults(schemas=self.path))
        self.assertIn(f"invalid SCHEMAS={self.path!r}", str(e))
        self.assertIn("nope.json", str(e))
