# -*- test-case-name: estat.test.test_schema_columns -*-
"""
Declared columns: a stream's table, from a JSON Schema file.

A L{Table} is a list of L{Column}s, pure Python (nothing here imports
pyarrow), from which the Parquet encoder builds its Arrow schema and
C{estat-tables} prints DDL, so the columns are written down once.

Each top-level property of the schema becomes a column:

    string                       -> string
    string, format date-time     -> timestamp (UTC, microseconds)
    string, format date          -> date
    integer                      -> int64
    number                       -> double
    boolean                      -> bool
    object with properties       -> struct of the same rules
    array of a scalar type       -> list of it
    anything else                -> json (a string column holding JSON)

C{"type": ["string", "null"]} is the string type (every column is
nullable); any other union is json.  Local C{$ref}s (C{#/$defs/...}) and
C{$ref}s to files beside the schema are followed; a cycle ends in a json
column.  Every table ends with C{_estat} (a struct of the server fields)
and C{_extra} (json: whatever of the event no column holds).
"""

from __future__ import annotations

import json
import os
from typing import Any

import attr

__all__ = [
    "KINDS", "SCALARS", "Column", "Table", "SchemaError", "ESTAT_COLUMN", "EXTRA_COLUMN",
    "load_schema_file", "table_from_schema", "collect_table", "segment_table",
    "SCHEMA_ERRORS_COLUMN", "with_schema_errors",
]

#: Every column kind.
KINDS = ("string", "int64", "double", "bool", "timestamp", "date", "json", "struct", "list")
#: The kinds a list may hold.
SCALARS = ("string", "int64", "double", "bool", "timestamp", "date")

ESTAT_COLUMN = "_estat"
EXTRA_COLUMN = "_extra"
#: With a tracking plan: a flagged event's C{_estat.schema_errors}, as json.
SCHEMA_ERRORS_COLUMN = "_estat_schema_errors"
#: Names no schema may declare at the top level.
RESERVED = (ESTAT_COLUMN, EXTRA_COLUMN, "_estat_schema_errors")

#: Deep enough for any real event schema; deeper declared objects are json.
MAX_DEPTH = 32


class SchemaError(ValueError):
    """
    A schema file cannot declare a table; the message names the file and why.
    """


@attr.s(slots=True, frozen=True)
class Column:
    """
    One column.

    @ivar name: the column's (or struct field's) name.
    @ivar kind: one of L{KINDS}.
    @ivar fields: a struct's fields, in order.
    @ivar item: a list's item kind (one of L{SCALARS}).
    @ivar source: the event path the value is read from; C{None} for
        C{(name,)}.  A column whose source differs from its name (Segment's
        C{context_ip}, from C{context.ip}) is I{derived}: a copy of a member
        another column keeps whole, so it never adds to C{_extra}.
    """

    name: str = attr.ib()
    kind: str = attr.ib(validator=attr.validators.in_(KINDS))
    fields: tuple = attr.ib(default=())
    item: str | None = attr.ib(default=None)
    source: tuple | None = attr.ib(default=None)

    @property
    def derived(self) -> bool:
        return self.source is not None


@attr.s(slots=True, frozen=True)
class Table:
    """
    A stream's columns: C{columns} (declared or built in, then C{_estat});
    C{_extra} always follows them.

    @ivar stream: C{collect} or C{segment}.
    @ivar schema_id: where the columns came from (a file path, or
        C{builtin}).
    """

    stream: str = attr.ib()
    columns: tuple = attr.ib()
    schema_id: str = attr.ib(default="builtin")

    @property
    def names(self) -> list:
        return [c.name for c in self.columns] + [EXTRA_COLUMN]


ESTAT = Column(ESTAT_COLUMN, "struct", fields=(
    Column("received_at", "timestamp"),
    Column("ip", "string"),
    Column("user_agent", "string"),
    Column("source", "string"),
))


def load_schema_file(path: str) -> dict:
    """
    Read a JSON Schema file (JSON, or YAML when the name ends in .yaml or
    .yml).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SchemaError(f"{path}: {e.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            doc = yaml.safe_load(data)
        else:
            doc = json.loads(data)
    except Exception as e:  # JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise SchemaError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {e}") from None
    if not isinstance(doc, dict):
        raise SchemaError(f"{path}: a schema must be a JSON object")
    return doc


@attr.s
class _Resolver:
    """
    Follows C{$ref}s: C{#/json/pointer} in the same document, and
    C{file.json#/pointer} relative to the referring file's directory.
    Remote references are refused.
    """

    path: str = attr.ib()
    docs: dict = attr.ib(factory=dict)

    def resolve(self, ref: str, base: str) -> tuple[Any, str]:
        if "://" in ref or ref.startswith("//"):
            raise SchemaError(f"{base}: remote $ref {ref!r} is not allowed; "
                              "refer to files beside the schema")
        file_part, _, pointer = ref.partition("#")
        target = base
        if file_part:
            target = os.path.normpath(os.path.join(os.path.dirname(base), file_part))
        doc = self.docs.get(target)
        if doc is None:
            if not os.path.exists(target):
                raise SchemaError(f"{base}: $ref {ref!r}: no such file {target}")
            doc = self.docs[target] = load_schema_file(target)
        node = doc
        for part in pointer.split("/")[1:] if pointer else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise SchemaError(f"{base}: $ref {ref!r} points at nothing")
        return node, target


def _single_type(node: dict) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    if isinstance(kind, str):
        return kind
    if "enum" in node and isinstance(node["enum"], list) and node["enum"]:
        values = [v for v in node["enum"] if v is not None]
        if values and all(type(v) is str for v in values):
            return "string"
    if "const" in node and type(node["const"]) is str:
        return "string"
    return None


def _column(name: str, node: Any, base: str, resolver: _Resolver, depth: int,
            seen: tuple) -> Column:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        key = (base, ref)
        if key in seen or depth > MAX_DEPTH:
            return Column(name, "json")  # a cycle: keep the value whole
        seen = seen + (key,)
        node, base = resolver.resolve(ref, base)
    if not isinstance(node, dict):
        return Column(name, "json")
    kind = _single_type(node)
    if kind == "string":
        fmt = node.get("format")
        if fmt == "date-time":
            return Column(name, "timestamp")
        if fmt == "date":
            return Column(name, "date")
        return Column(name, "string")
    if kind == "integer":
        return Column(name, "int64")
    if kind == "number":
        return Column(name, "double")
    if kind == "boolean":
        return Column(name, "bool")
    if kind == "object" and depth < MAX_DEPTH:
        props = node.get("properties")
        if isinstance(props, dict) and props:
            fields = _fields(props, base, resolver, depth + 1, seen, where=name)
            return Column(name, "struct", fields=fields)
    if kind == "array":
        items = node.get("items")
        if isinstance(items, dict):
            item = _column("item", items, base, resolver, depth + 1, seen)
            if item.kind in SCALARS:
                return Column(name, "list", item=item.kind)
    return Column(name, "json")


def _fields(props: dict, base: str, resolver: _Resolver, depth: int, seen: tuple,
            where: str) -> tuple:
    folded: dict = {}
    fields = []
    for key, sub in props.items():
        other = folded.setdefault(key.lower(), key)
        if other != key:
            raise SchemaError(
                f"{resolver.path}: {where + '.' if where else ''}{key!r} and {other!r} differ "
                "only by case; Athena, Glue and Spark cannot tell such columns apart")
        fields.append(_column(key, sub, base, resolver, depth, seen))
    return tuple(fields)


def table_from_schema(stream: str, path: str, doc: dict | None = None,
                      builtin: tuple = ()) -> Table:
    """
    The table of C{stream} declared by the schema file at C{path}:
    C{builtin} columns first (Segment's), then the schema's top-level
    properties, then C{_estat}.

    A schema property named like a built-in json column (C{properties},
    C{traits}, C{integrations}) replaces it; one named like any other
    built-in column is refused, as are C{_estat} and C{_extra}.
    """
    if doc is None:
        doc = load_schema_file(path)
    resolver = _Resolver(path=path, docs={os.path.normpath(path): doc})
    node, base = doc, os.path.normpath(path)
    if isinstance(doc.get("$ref"), str):
        node, base = resolver.resolve(doc["$ref"], base)
    props = node.get("properties") if isinstance(node, dict) else None
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise SchemaError(f"{path}: 'properties' must be an object")
    for name in RESERVED:
        if name in props:
            raise SchemaError(f"{path}: the schema declares {name!r}, a column Estat "
                              "writes itself; rename the field")
    declared = _fields(props, base, resolver, 1, (), where="")
    columns = list(builtin)
    by_name = {c.name: i for i, c in enumerate(columns)}
    folded = {c.name.lower(): c.name for c in columns if not c.derived}
    for column in declared:
        if column.name in by_name:
            old = columns[by_name[column.name]]
            if old.kind != "json" or old.derived:
                raise SchemaError(f"{path}: {column.name!r} is a built-in column of the "
                                  f"{stream} stream ({old.kind}); it cannot be redeclared")
            columns[by_name[column.name]] = column
            continue
        clash = folded.get(column.name.lower()) or next(
            (c.name for c in columns if c.name.lower() == column.name.lower()), None)
        if clash is not None:
            raise SchemaError(f"{path}: {column.name!r} and the built-in column {clash!r} "
                              "differ only by case")
        columns.append(column)
    columns.append(ESTAT)
    return Table(stream=stream, columns=tuple(columns), schema_id=path)


def with_schema_errors(table: Table) -> Table:
    """
    C{table} with the L{SCHEMA_ERRORS_COLUMN} after C{_estat} (a tracking
    plan is set: flagged events carry their errors there).
    """
    return attr.evolve(table, columns=table.columns + (Column(SCHEMA_ERRORS_COLUMN, "json"),))


def collect_table(path: str | None = None) -> Table:
    """
    The C{/collect} stream's table: the schema's columns, or none (the whole
    client event in C{_extra}), then C{_estat}.
    """
    if path:
        return table_from_schema("collect", path)
    return Table(stream="collect", columns=(ESTAT,))


#: Segment's warehouse columns (as Segment and RudderStack name them).
SEGMENT_BUILTIN = (
    Column("type", "string"),
    Column("messageId", "string"),
    Column("userId", "string"),
    Column("anonymousId", "string"),
    Column("event", "string"),
    Column("name", "string"),
    Column("groupId", "string"),
    Column("previousId", "string"),
    Column("timestamp", "timestamp"),
    Column("sentAt", "timestamp"),
    Column("receivedAt", "timestamp"),
    Column("originalTimestamp", "timestamp"),
    Column("context_ip", "string", source=("context", "ip")),
    Column("context_library_name", "string", source=("context", "library", "name")),
    Column("context_library_version", "string", source=("context", "library", "version")),
    Column("context_page_url", "string", source=("context", "page", "url")),
    Column("context_page_path", "string", source=("context", "page", "path")),
    Column("context_page_referrer", "string", source=("context", "page", "referrer")),
    Column("context_user_agent", "string", source=("context", "userAgent")),
    Column("properties", "json"),
    Column("traits", "json"),
    Column("context", "json"),
    Column("integrations", "json"),
)


def segment_table(path: str | None = None) -> Table:
    """
    The Segment stream's table: the built-in columns, with what the schema
    file at C{path} declares (C{properties} and C{traits} as structs, say).
    """
    if path:
        return table_from_schema("segment", path, builtin=SEGMENT_BUILTIN)
    return Table(stream="segment", columns=SEGMENT_BUILTIN + (ESTAT,))
