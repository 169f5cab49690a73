# -*- test-case-name: estat.test.test_logs -*-
"""
Tests for L{estat.logs}.
"""

from __future__ import annotations

import datetime
import io
import json

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from estat.logs import event_as_json, json_observer

WHEN = datetime.datetime(2024, 3, 5, 7, 8, 9, 123000, tzinfo=datetime.timezone.utc).timestamp()


def logged(emit) -> dict:
    """
    Call C{emit(log)} with a L{Logger} of namespace C{estat.test} and return
    the one event it emits.
    """
    events = []
    log = Logger(namespace="estat.test", observer=events.append)
    emit(log)
    [event] = events
    return event


class EventAsJSONTests(SynchronousTestCase):
    def parse(self, line: str) -> dict:
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        return json.loads(line)

    def test_fields(self) -> None:
        event = logged(lambda log: log.info("uploaded {key} ({count} events)",
                                            key="raw/x.jsonl.gz", count=3))
        event["log_time"] = WHEN
        record = self.parse(event_as_json(event))
        self.assertEqual(record["time"], "2024-03-05T07:08:09.123Z")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "estat.test")
        self.assertEqual(record["message"], "uploaded raw/x.jsonl.gz (3 events)")
        self.assertEqual(record["key"], "raw/x.jsonl.gz")
        self.assertEqual(record["count"], 3)
        self.assertNotIn("error", record)
        self.assertNotIn("traceback", record)

    def test_noTwistedInternals(self) -> None:
        event = logged(lambda log: log.warn("hello {who}", who="you"))
        record = self.parse(event_as_json(event))
        self.assertEqual(set(record), {"time", "level", "namespace", "message", "who"})
        self.assertEqual(record["level"], "warn")
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_levels(self) -> None:
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                      LogLevel.critical):
            event = {"log_time": WHEN, "log_level": level, "log_namespace": "n",
                     "log_format": "x"}
            self.assertEqual(self.parse(event_as_json(event))["level"], level.name)

    def test_failure(self) -> None:
        def emit(log: Logger) -> None:
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("upload of {key} failed", key="k")

        record = self.parse(event_as_json(logged(emit)))
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "upload of k failed")
        self.assertEqual(record["key"], "k")
        self.assertIn("division", record["error"])
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("Traceback", record["traceback"])
        self.assertNotIn("failure", record)

    def test_failureAtErrorLevel(self) -> None:
        def emit(log: Logger) -> None:
            try:
                raise ValueError("bad value\non two lines")
            except ValueError:
                log.failure("oops", level=LogLevel.error)

        line = event_as_json(logged(emit))
        record = self.parse(line)
        self.assertEqual(record["level"], "error")
        self.assertEqual(record["error"], "bad value\non two lines")

    def test_valuesMadePlain(self) -> None:
        class Thing:
            def __repr__(self) -> str:
                return "<Thing>"

        event = {"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "n",
                 "log_format": "m", "b": b"by\xfftes", "t": Thing(), "f": 1.5,
                 "flag": True, "none": None, "lst": [1, 2], "s": "\ud55c\uae00"}
        record = self.parse(event_as_json(event))
        self.assertEqual(record["b"], "by\ufffdtes")
        self.assertEqual(record["t"], "<Thing>")
        self.assertEqual(record["f"], 1.5)
        self.assertIs(record["flag"], True)
        self.assertIsNone(record["none"])
        self.assertEqual(record["lst"], "[1, 2]")
        self.assertEqual(record["s"], "\ud55c\uae00")

    def test_nonASCIIKeptReadable(self) -> None:
        event = {"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "n",
                 "log_format": "\ud55c {x}", "x": "\uae00"}
        line = event_as_json(event)
        self.assertIn("\ud55c \uae00", line)

    def test_newlinesInValuesStayOnOneLine(self) -> None:
        event = {"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "n",
                 "log_format": "{x}", "x": "a\nb\r\nc"}
        record = self.parse(event_as_json(event))
        self.assertEqual(record["message"], "a\nb\r\nc")
        self.assertEqual(record["x"], "a\nb\r\nc")

    def test_legacyKeysLeftOut(self) -> None:
        event = {"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "n",
                 "log_format": "m", "format": "%(x)s", "message": ("a",), "isError": 0,
                 "system": "-", "time": 1.0, "why": None, "keep": 1}
        record = self.parse(event_as_json(event))
        self.assertEqual(record["time"], "2024-03-05T07:08:09.123Z")
        self.assertEqual(record["message"], "m")
        self.assertEqual(record["keep"], 1)
        for key in ("format", "isError", "system", "why"):
            self.assertNotIn(key, record)

    def test_missingFields(self) -> None:
        record = self.parse(event_as_json({"log_format": "bare"}))
        self.assertIsNone(record["time"])
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "")
        self.assertEqual(record["message"], "bare")


class JSONObserverTests(SynchronousTestCase):
    def test_writesOneLinePerEvent(self) -> None:
        out = io.StringIO()
        observer = json_observer(out)
        log = Logger(namespace="estat.test", observer=observer)
        log.info("first {n}", n=1)
        log.error("second {n}", n=2)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = map(json.loads, lines)
        self.assertEqual((first["message"], first["n"], first["level"]), ("first 1", 1, "info"))
        self.assertEqual((second["message"], second["level"]), ("second 2", "error"))
