# -*- test-case-name: estat.test.test_schema_plan -*-
"""
Tests for L{estat.schema.plan}: loading, selecting and checking.
"""

from __future__ import annotations

import json
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from estat.schema.plan import MAX_ERRORS, PlanError, Violation, load_plan


def write(directory: str, name: str, content) -> str:
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


PAGE = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"event": {"const": "page_view"}, "path": {"type": "string"},
                       "user": {"$ref": "common/user.json"}},
        "required": ["path"]}
USER = {"type": "object", "properties": {"id": {"type": "string", "minLength": 2}},
        "required": ["id"]}
ANY_EVENT = {"type": "object", "required": ["event"]}


class PlanTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        write(self.dir, "schemas/page.json", PAGE)
        write(self.dir, "schemas/common/user.json", USER)
        write(self.dir, "schemas/any.json", ANY_EVENT)

    def plan(self, text: str):
        return load_plan(write(self.dir, "plan.yaml", text))

    def test_by_name_and_default(self) -> None:
        """
        C{select: event} picks the schema by the event's field; names the
        plan does not list take the default; each entry has its mode.
        """
        plan = self.plan(
            "collect:\n"
            "  select: event\n"
            "  mode: quarantine\n"
            "  schemas:\n"
            "    page_view: {file: schemas/page.json, mode: reject}\n"
            "  default: {file: schemas/any.json}\n")
        check = plan.check("collect", {"event": "page_view", "path": "/"})
        self.assertEqual((check.schema, check.mode, check.errors), ("schemas/page.json", "reject", ()))
        check = plan.check("collect", {"event": "page_view"})
        self.assertEqual(check.errors, (Violation("", "required", '"path" is a required property'),))
        check = plan.check("collect", {"event": "click"})
        self.assertEqual((check.schema, check.mode, check.errors), ("schemas/any.json", "quarantine", ()))
        self.assertEqual(plan.check("collect", {"name": 1}).errors[0].keyword, "required")
        self.assertIsNone(plan.check("segment", {"type": "track"}))

    def test_file_ref_relative_to_the_referring_file(self) -> None:
        """
        A C{$ref} to a file is followed relative to the file that holds it;
        the error's pointer names the failing value.
        """
        plan = self.plan("collect:\n  default: {file: schemas/page.json, mode: flag}\n")
        self.assertEqual(plan.validate("collect", {"path": "/", "user": {"id": "x"}}),
                         [Violation("/user/id", "minLength", '"x" is shorter than 2 characters')])
        self.assertIsNone(plan.validate("collect", {"path": "/", "user": {"id": "xy"}}))

    def test_segment_by_name(self) -> None:
        """
        Segment's name is track's C{event}, the C{type} of other calls.
        """
        write(self.dir, "schemas/identify.json", {"required": ["traits"]})
        write(self.dir, "schemas/order.json",
              {"properties": {"properties": {"required": ["total"]}}})
        plan = self.plan(
            "segment:\n  mode: quarantine\n  schemas:\n"
            "    identify: {file: schemas/identify.json}\n"
            "    Order Completed: {file: schemas/order.json}\n")
        self.assertEqual(plan.name_of("segment", {"type": "track", "event": "Order Completed"}),
                         "Order Completed")
        bad = plan.check("segment", {"type": "track", "event": "Order Completed",
                                      "properties": {}})
        self.assertEqual(bad.errors[0].pointer, "/properties")
        self.assertEqual(plan.check("segment", {"type": "identify"}).errors[0].keyword, "required")
        self.assertIsNone(plan.check("segment", {"type": "track", "event": "Other"}))
        self.assertIsNone(plan.check("segment", {"type": "page"}))

    def test_off_is_the_default(self) -> None:
        plan = self.plan("collect:\n  default: schemas/any.json\n")
        self.assertIsNone(plan.check("collect", {}))
        self.assertFalse(plan.checks("collect"))

    def test_columns(self) -> None:
        plan = self.plan("collect:\n  columns: schemas/any.json\n")
        self.assertEqual(plan.columns("collect"), os.path.join(os.path.abspath(self.dir), "schemas/any.json"))
        self.assertIsNone(plan.columns("segment"))

    def test_json_plan(self) -> None:
        path = write(self.dir, "plan.json",
                     {"collect": {"default": {"file": "schemas/any.json", "mode": "reject"}}})
        self.assertEqual(load_plan(path).check("collect", {}).mode, "reject")

    def assertRefused(self, text: str, *parts: str) -> None:
        e = self.assertRaises(PlanError, self.plan, text)
        message = str(e)
        self.assertNotIn("\n", message)
        for part in parts:
            self.assertIn(part, message)

    def test_bad_yaml(self) -> None:
        self.assertRefused("collect: [\n", "plan.yaml", "not valid YAML")

    def test_unknown_mode_and_keys(self) -> None:
        self.assertRefused("collect:\n  default: {file: schemas/any.json, mode: drop}\n",
                           "mode 'drop'")
        self.assertRefused("colect: {}\n", "unknown stream 'colect'")
        self.assertRefused("collect:\n  defaults: x\n", "unknown key 'defaults'")

    def test_missing_file_and_ref(self) -> None:
        self.assertRefused("collect:\n  default: schemas/nope.json\n", "nope.json")
        write(self.dir, "schemas/broken.json", {"$ref": "missing.json"})
        self.assertRefused("collect:\n  default: schemas/broken.json\n", "broken.json",
                           "missing.json", "No such file")

    def test_remote_ref_refused(self) -> None:
        write(self.dir, "schemas/remote.json", {"$ref": "https://example.com/s.json"})
        self.assertRefused("collect:\n  default: schemas/remote.json\n",
                           "a remote $ref is not allowed", "https://example.com/s.json")

    def test_bad_schema(self) -> None:
        write(self.dir, "schemas/bad.json", {"type": "strnig"})
        self.assertRefused("collect:\n  default: schemas/bad.json\n", "bad.json",
                           "not a valid JSON Schema at /type")

    def test_other_draft_refused(self) -> None:
        write(self.dir, "schemas/d7.json", {"$schema": "http://json-schema.org/draft-07/schema#"})
        self.assertRefused("collect:\n  default: schemas/d7.json\n", "draft 2020-12")

    def test_ref_cycle(self) -> None:
        """
        A C{$ref} cycle loads and checks without recursing for ever, and a
        recursive schema (a tree) checks every level.
        """
        write(self.dir, "schemas/cycle.json", {"$defs": {"a": {"$ref": "#/$defs/b"},
                                                          "b": {"$ref": "#/$defs/a"}},
                                                "$ref": "#/$defs/a"})
        write(self.dir, "schemas/a.json", {"$ref": "b.json"})
        write(self.dir, "schemas/b.json", {"$ref": "a.json"})
        write(self.dir, "schemas/tree.json", {"type": "object", "properties": {
            "kids": {"type": "array", "items": {"$ref": "#"}}}})
        plan = self.plan("collect:\n  mode: flag\n  schemas:\n    c: schemas/cycle.json\n"
                         "    f: schemas/a.json\n    t: schemas/tree.json\n")
        self.assertIsNotNone(plan.check("collect", {"event": "c"}))
        self.assertIsNotNone(plan.check("collect", {"event": "f"}))
        errors = plan.validate("collect", {"event": "t", "kids": [{"kids": [{"kids": 1}]}]})
        self.assertEqual([e.pointer for e in errors], ["/kids/0/kids/0/kids"])

    def test_catastrophic_pattern_is_linear(self) -> None:
        """
        C{^(a+)+$} on C{a...!} is matched in linear time (Python's re takes
        seconds on 25 characters); a pattern only a backtracking engine
        can run is refused at load.
        """
        write(self.dir, "schemas/evil.json", {"properties": {"s": {"pattern": "^(a+)+$"}}})
        plan = self.plan("collect:\n  default: {file: schemas/evil.json, mode: reject}\n")
        start = time.perf_counter()
        errors = plan.validate("collect", {"s": "a" * 50000 + "!"})
        self.assertLess(time.perf_counter() - start, 0.5)
        self.assertEqual(errors[0].keyword, "pattern")
        write(self.dir, "schemas/look.json", {"properties": {"s": {"pattern": "(?=a)a"}}})
        self.assertRefused("collect:\n  default: schemas/look.json\n", "look.json", "regex")

    def test_errors_capped(self) -> None:
        """
        An event with 10,000 errors keeps MAX_ERRORS of them, short ones,
        and the count of all.
        """
        write(self.dir, "schemas/ints.json", {"additionalProperties": {"type": "integer"}})
        plan = self.plan("collect:\n  default: {file: schemas/ints.json, mode: quarantine}\n")
        check = plan.check("collect", {f"k{i}": "x" * 1000 for i in range(10000)})
        self.assertEqual((len(check.errors), check.total), (MAX_ERRORS, 10000))
        self.assertLessEqual(max(len(e.message) for e in check.errors), 200)

    def test_formats_checked(self) -> None:
        write(self.dir, "schemas/ts.json", {"properties": {"at": {"format": "date-time"}}})
        plan = self.plan("collect:\n  default: {file: schemas/ts.json, mode: flag}\n")
        self.assertEqual(plan.validate("collect", {"at": "yesterday"})[0].keyword, "format")
        self.assertIsNone(plan.validate("collect", {"at": "2026-12-01T08:00:00Z"}))
