# -*- test-case-name: estat.test.test_encode_rows -*-
"""
Tests for L{estat.encode.rows}: the fit rules, and rows back to events.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from estat.encode.rows import RowBuilder, parse_timestamp, rebuild_event
from estat.schema.columns import ESTAT, Column, Table

TABLE = Table(stream="collect", columns=(
    Column("s", "string"), Column("i", "int64"), Column("d", "double"), Column("b", "bool"),
    Column("t", "timestamp"), Column("day", "date"), Column("j", "json"),
    Column("o", "struct", fields=(Column("x", "int64"), Column("in", "struct", fields=(
        Column("y", "string"),)))),
    Column("l", "list", item="int64"),
    ESTAT,
))


def build(event, table=TABLE):
    cols, misfits, failed = RowBuilder(table).columns([event])
    names = [c.name for c in table.columns] + ["_extra"]
    row = {n: c[0] for n, c in zip(names, cols)}
    extra = json.loads(row["_extra"]) if row["_extra"] is not None else None
    return row, extra, dict(misfits), failed


class FitTests(SynchronousTestCase):
    def assertFits(self, name, value, column_value):
        row, extra, misfits, _ = build({name: value})
        self.assertEqual((row[name], extra, misfits), (column_value, None, {}), value)

    def assertMisfit(self, name, value, label=None):
        row, extra, misfits, _ = build({name: value})
        self.assertIsNone(row[name], value)
        self.assertEqual(extra, {name: value})
        self.assertEqual(misfits, {label or name: 1})

    def test_int64(self):
        self.assertFits("i", 2 ** 63 - 1, 2 ** 63 - 1)
        self.assertFits("i", -(2 ** 63), -(2 ** 63))
        for v in (2 ** 63, -(2 ** 63) - 1, True, False, 1.0, "1"):
            self.assertMisfit("i", v)

    def test_double(self):
        self.assertFits("d", 1.5, 1.5)
        self.assertFits("d", 2 ** 53, float(2 ** 53))
        for v in (2 ** 53 + 1, 10 ** 400, True, "1.5"):
            self.assertMisfit("d", v)

    def test_bool(self):
        self.assertFits("b", True, True)
        for v in (1, 0, "true"):
            self.assertMisfit("b", v)

    def test_string(self):
        self.assertFits("s", "", "")
        for v in (1, {}, [], True):
            self.assertMisfit("s", v)

    def test_timestamp_canonical(self):
        self.assertFits("t", "2026-12-06T14:40:04.123Z", parse_timestamp("2026-12-06T14:40:04.123Z"))
        self.assertFits("t", "2026-12-06T14:40:04.123456Z", 1796568004123456)

    def test_timestamp_other_text_kept(self):
        for text in ("2026-12-06T15:40:04+01:00", "2026-12-06t14:40:04.1z",
                     "2026-12-06T14:40:04.000000Z", "2026-12-06T14:40:04-00:30"):
            row, extra, misfits, _ = build({"t": text})
            self.assertIsNotNone(row["t"], text)
            self.assertEqual((extra, misfits), ({"t": text}, {}), text)
        row, _, _, _ = build({"t": "2026-12-06T15:40:04+01:00"})
        self.assertEqual(row["t"], parse_timestamp("2026-12-06T14:40:04Z"))

    def test_timestamp_misfits(self):
        for v in ("2026-12-06T23:59:60Z", "2026-12-06T14:40:04.1234567Z",
                  "2026-12-06T14:40:04", "2026-02-30T00:00:00Z", "2026-12-06 14:40:04Z",
                  "2026-12-06T24:00:00Z", "2026-12-06T14:40:04+24:00", "0000-01-01T00:00:00Z",
                  "9999-12-31T23:59:59-01:00", "", 1796568004, "2026-12-06"):
            self.assertMisfit("t", v)

    def test_date(self):
        self.assertFits("day", "1970-01-02", 1)
        for v in ("2026-02-30", "2026-1-01", "20260101", "2026-12-06T00:00:00Z", 3):
            self.assertMisfit("day", v)

    def test_json(self):
        for v in ({"a": [1, {}]}, [], 3, "x", True, 2 ** 70):
            row, extra, misfits, _ = build({"j": v})
            self.assertEqual((json.loads(row["j"]), extra, misfits), (v, None, {}))

    def test_list(self):
        self.assertFits("l", [], [])
        self.assertFits("l", [1, None, 2], [1, None, 2])
        self.assertMisfit("l", [1, "2"])
        self.assertMisfit("l", [1, True])
        self.assertMisfit("l", {"0": 1})

    def test_nested_misfit_at_its_path(self):
        row, extra, misfits, _ = build({"o": {"x": "no", "in": {"y": 5, "z": 1}, "w": 2}})
        self.assertEqual(row["o"], {"x": None, "in": {"y": None}})
        self.assertEqual(extra, {"o": {"x": "no", "in": {"y": 5, "z": 1}, "w": 2}})
        self.assertEqual(misfits, {"o.x": 1, "o.in.y": 1})
        row, extra, misfits, _ = build({"o": {"x": 1, "in": {"y": "ok", "z": 1}}})
        self.assertEqual(row["o"], {"x": 1, "in": {"y": "ok"}})
        self.assertEqual(extra, {"o": {"in": {"z": 1}}})

    def test_empty_object_is_a_struct(self):
        row, extra, _, _ = build({"o": {}})
        self.assertEqual(row["o"], {"x": None, "in": None})
        self.assertIsNone(extra)

    def test_null_and_absent(self):
        for event in ({"s": None}, {"o": None}, {"o": {"x": None}}, {"o": {"in": {"y": None}}},
                      {"o": {"in": None}}, {"j": None}, {"l": None}):
            row, extra, misfits, _ = build(event)
            self.assertEqual((extra, misfits), (event, {}), event)
            self.assertEqual(rebuild_event(TABLE, row), event)
        row, extra, _, _ = build({})
        self.assertIsNone(extra)
        self.assertEqual(rebuild_event(TABLE, row), {})

    def test_undeclared_kept_whole(self):
        event = {"zz": {"deep": [1, {"x": None}]}, "S": "case"}
        row, extra, _, _ = build(event)
        self.assertEqual(extra, event)

    def test_derived_never_in_extra(self):
        table = Table("segment", (Column("context", "json"),
                                  Column("context_ip", "string", source=("context", "ip")), ESTAT))
        row, extra, misfits, _ = build({"context": {"ip": 5}}, table)
        self.assertIsNone(row["context_ip"])
        self.assertIsNone(extra)
        self.assertEqual(misfits, {"context_ip": 1})
        self.assertEqual(rebuild_event(table, row), {"context": {"ip": 5}})

    def test_not_an_object(self):
        row, extra, _, failed = build([1, 2])
        self.assertEqual(extra, [1, 2])
        self.assertEqual(failed, [])


class ServerTimestampTests(SynchronousTestCase):
    def test_received_at_is_canonical(self):
        """
        The server's own received_at text is what the column gives back,
        so _estat never adds to _extra.
        """
        from estat.encode.rows import format_timestamp
        from estat.event import format_received_at

        for at in (0.0, 1765000000.0, 1765000000.123, 1765000000.9999):
            text = format_received_at(at)
            self.assertEqual(format_timestamp(parse_timestamp(text)), text)
            row, extra, misfits, _ = build({"_estat": {"received_at": text, "ip": "1",
                                                       "user_agent": "u", "source": "s"}})
            self.assertEqual((extra, misfits), (None, {}))
