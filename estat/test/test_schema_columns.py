# -*- test-case-name: estat.test.test_schema_columns -*-
"""
Tests for L{estat.schema.columns}: JSON Schema to declared columns.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from estat.schema.columns import (
    ESTAT, SEGMENT_BUILTIN, Column, SchemaError, Table, collect_table, segment_table,
    table_from_schema,
)


class SchemaFiles:
    def write(self, doc, name="schema.json"):
        directory = getattr(self, "_dir", None)
        if directory is None:
            directory = self._dir = self.mktemp()
            os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    def table(self, props, **extra):
        return table_from_schema("collect", self.write(dict(type="object", properties=props,
                                                              **extra)))


class KindTests(SchemaFiles, SynchronousTestCase):
    def kind_of(self, node):
        return self.table({"f": node}).columns[0]

    def test_scalars(self):
        cases = [
            ({"type": "string"}, Column("f", "string")),
            ({"type": "integer"}, Column("f", "int64")),
            ({"type": "number"}, Column("f", "double")),
            ({"type": "boolean"}, Column("f", "bool")),
            ({"type": "string", "format": "date-time"}, Column("f", "timestamp")),
            ({"type": "string", "format": "date"}, Column("f", "date")),
            ({"type": "string", "format": "email"}, Column("f", "string")),
            ({"type": "null"}, Column("f", "json")),
            ({}, Column("f", "json")),
            ({"type": "object"}, Column("f", "json")),
            ({"type": "object", "properties": {}}, Column("f", "json")),
            ({"type": "array"}, Column("f", "json")),
            ({"type": "array", "items": {"type": "object"}}, Column("f", "json")),
            ({"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
             Column("f", "json")),
            ({"type": "array", "items": {"type": "integer"}}, Column("f", "list", item="int64")),
            ({"type": "array", "items": {"type": "string", "format": "date-time"}},
             Column("f", "list", item="timestamp")),
            ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, Column("f", "json")),
        ]
        for node, expected in cases:
            self.assertEqual(self.kind_of(node), expected, node)

    def test_nullable_unions(self):
        self.assertEqual(self.kind_of({"type": ["string", "null"]}), Column("f", "string"))
        self.assertEqual(self.kind_of({"type": ["null", "integer"]}), Column("f", "int64"))
        self.assertEqual(self.kind_of({"type": ["string", "integer"]}), Column("f", "json"))
        self.assertEqual(self.kind_of({"type": ["string", "integer", "null"]}),
                         Column("f", "json"))

    def test_enum_and_const(self):
        self.assertEqual(self.kind_of({"enum": ["a", "b"]}), Column("f", "string"))
        self.assertEqual(self.kind_of({"enum": ["a", None]}), Column("f", "string"))
        self.assertEqual(self.kind_of({"enum": ["a", 1]}), Column("f", "json"))
        self.assertEqual(self.kind_of({"const": "x"}), Column("f", "string"))
        self.assertEqual(self.kind_of({"const": 1}), Column("f", "json"))

    def test_struct(self):
        column = self.kind_of({"type": "object", "properties": {
            "a": {"type": "integer"},
            "b": {"type": "object", "properties": {"c": {"type": "boolean"}}},
            "d": {"type": "array", "items": {"type": "number"}}}})
        self.assertEqual(column, Column("f", "struct", fields=(
            Column("a", "int64"),
            Column("b", "struct", fields=(Column("c", "bool"),)),
            Column("d", "list", item="double"))))

    def test_table_order(self):
        table = self.table({"b": {"type": "string"}, "a": {"type": "integer"}})
        self.assertEqual(table.names, ["b", "a", "_estat", "_extra"])
        self.assertEqual(table.columns[-1], ESTAT)
        self.assertEqual(ESTAT.fields, (Column("received_at", "timestamp"),
                                        Column("ip", "string"), Column("user_agent", "string"),
                                        Column("source", "string")))


class RefTests(SchemaFiles, SynchronousTestCase):
    def test_local_defs(self):
        table = self.table({"f": {"$ref": "#/$defs/when"}},
                           **{"$defs": {"when": {"type": "string", "format": "date-time"}}})
        self.assertEqual(table.columns[0], Column("f", "timestamp"))

    def test_file_beside(self):
        self.write({"$defs": {"n": {"type": "integer"}}}, "other.json")
        table = self.table({"f": {"$ref": "other.json#/$defs/n"},
                            "g": {"$ref": "other.json#/$defs/n"}})
        self.assertEqual(table.columns[:2], (Column("f", "int64"), Column("g", "int64")))

    def test_cycle_is_json(self):
        table = self.table({"f": {"$ref": "#/$defs/node"}}, **{"$defs": {"node": {
            "type": "object", "properties": {"next": {"$ref": "#/$defs/node"},
                                             "v": {"type": "integer"}}}}})
        column = table.columns[0]
        self.assertEqual(column.kind, "struct")
        self.assertEqual(column.fields[1], Column("v", "int64"))
        # Somewhere down the chain the cycle ends in a json column.
        node = column
        for _ in range(40):
            if node.kind != "struct":
                break
            node = node.fields[0]
        self.assertEqual(node.kind, "json")

    def test_self_ref_cycle(self):
        table = self.table({"f": {"$ref": "#/$defs/a"}},
                           **{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}})
        self.assertEqual(table.columns[0], Column("f", "json"))

    def test_remote_refused(self):
        for ref in ("https://example.com/s.json", "//example.com/s.json"):
            path = self.write({"properties": {"f": {"$ref": ref}}})
            e = self.assertRaises(SchemaError, table_from_schema, "collect", path)
            self.assertIn("remote", str(e))

    def test_missing_file_and_pointer(self):
        path = self.write({"properties": {"f": {"$ref": "nope.json"}}})
        self.assertRaises(SchemaError, table_from_schema, "collect", path)
        path = self.write({"properties": {"f": {"$ref": "#/$defs/nothing"}}})
        self.assertRaises(SchemaError, table_from_schema, "collect", path)


class RefusalTests(SchemaFiles, SynchronousTestCase):
    def test_reserved(self):
        for name in ("_estat", "_extra"):
            path = self.write({"properties": {name: {"type": "string"}}})
            e = self.assertRaises(SchemaError, table_from_schema, "collect", path)
            self.assertIn(name, str(e))

    def test_case_only(self):
        path = self.write({"properties": {"Name": {"type": "string"},
                                          "name": {"type": "string"}}})
        self.assertRaises(SchemaError, table_from_schema, "collect", path)
        path = self.write({"properties": {"o": {"type": "object", "properties": {
            "a": {"type": "string"}, "A": {"type": "string"}}}}})
        self.assertRaises(SchemaError, table_from_schema, "collect", path)

    def test_bad_files(self):
        self.assertRaises(SchemaError, table_from_schema, "collect", self.write("{nope"))
        self.assertRaises(SchemaError, table_from_schema, "collect", self.write("[1]"))
        self.assertRaises(SchemaError, table_from_schema, "collect", "/nonexistent/s.json")
        self.assertRaises(SchemaError, table_from_schema, "collect",
                          self.write({"properties": [1]}))


class BuiltinTests(SchemaFiles, SynchronousTestCase):
    def test_collect_without_schema(self):
        self.assertEqual(collect_table(), Table(stream="collect", columns=(ESTAT,)))
        self.assertEqual(collect_table().names, ["_estat", "_extra"])

    def test_segment_builtin(self):
        table = segment_table()
        kinds = {c.name: c.kind for c in table.columns}
        for name in ("type", "messageId", "userId", "anonymousId", "event", "name",
                     "groupId", "previousId", "context_ip", "context_library_name",
                     "context_library_version", "context_page_url", "context_page_path",
                     "context_page_referrer", "context_user_agent"):
            self.assertEqual(kinds[name], "string", name)
        for name in ("timestamp", "sentAt", "receivedAt", "originalTimestamp"):
            self.assertEqual(kinds[name], "timestamp", name)
        for name in ("properties", "traits", "context", "integrations"):
            self.assertEqual(kinds[name], "json", name)
        self.assertEqual(table.columns[-1], ESTAT)
        self.assertEqual(dict((c.name, c.source) for c in table.columns)["context_ip"],
                         ("context", "ip"))

    def test_segment_schema_replaces(self):
        path = self.write({"properties": {
            "properties": {"type": "object", "properties": {"revenue": {"type": "number"}}},
            "traits": {"type": "object", "properties": {"email": {"type": "string"}}},
            "plan": {"type": "string"}}})
        table = segment_table(path)
        by_name = {c.name: c for c in table.columns}
        self.assertEqual(by_name["properties"],
                         Column("properties", "struct", fields=(Column("revenue", "double"),)))
        self.assertEqual(by_name["traits"].kind, "struct")
        self.assertEqual([c.name for c in table.columns[:len(SEGMENT_BUILTIN)]],
                         [c.name for c in SEGMENT_BUILTIN])
        self.assertEqual(table.names[-3:], ["plan", "_estat", "_extra"])

    def test_segment_typed_redeclared_refused(self):
        for name in ("userId", "timestamp", "context_ip"):
            path = self.write({"properties": {name: {"type": "string"}}})
            self.assertRaises(SchemaError, segment_table, path)

    def test_segment_case_clash_refused(self):
        for name in ("userid", "Properties", "CONTEXT_IP"):
            path = self.write({"properties": {name: {"type": "string"}}})
            self.assertRaises(SchemaError, segment_table, path)
