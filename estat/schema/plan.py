# -*- test-case-name: estat.test.test_schema_plan -*-
"""
The tracking plan (C{SCHEMAS=path}): which JSON Schema each event of each
stream must meet, and what happens to one that does not.

A plan is one YAML or JSON file::

    collect:
      columns: event.json          # the table's columns (as COLLECT_SCHEMA)
      select: event                # the field whose value names the schema
      mode: quarantine             # for the entries below that name none
      schemas:
        page_view: {file: page_view.json}
        purchase: {file: purchase.json, mode: reject}
      default: {file: event.json, mode: flag}   # names not listed
    segment:
      schemas:                     # Segment: track's event, else the type
        Order Completed: {file: order.json}
        identify: {file: identify.json}

Modes: C{reject}, C{quarantine}, C{flag}, C{off} (the default: nothing
is checked).  Schemas are JSON Schema draft 2020-12, compiled once by
jsonschema-rs; file paths are relative to the plan's directory, a
C{$ref} to a file is relative to the file that holds it, and a remote
C{$ref} is refused at load.  Patterns use Rust's C{regex} engine, which
matches in linear time (so no pattern can hang the reactor); a pattern it
cannot run (look-around, back-references) is refused at load.

Nothing here does I/O after L{load_plan} returns, nor touches the reactor.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import attr

from .columns import SchemaError, load_schema_file

__all__ = ["MODES", "STREAMS", "Plan", "PlanError", "SchemaCheck", "Violation", "load_plan",
           "MAX_ERRORS", "error_pointer"]

MODES = ("reject", "quarantine", "flag", "off")
STREAMS = ("collect", "segment")
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
#: Errors kept per event (a bad row's list, the flag's); the rest are counted.
MAX_ERRORS = 100
#: A message longer than this is cut (it may quote a large value).
MAX_MESSAGE = 200


class PlanError(SchemaError):
    """
    The plan cannot be used; the message names the file and why, on one line.
    """


class Violation(NamedTuple):
    """
    One reason an event fails its schema.

    @ivar pointer: the failing value's JSON Pointer (RFC 6901; C{""} is the
        whole event).
    @ivar keyword: the JSON Schema keyword that failed (C{type},
        C{required}, ...).
    """

    pointer: str
    keyword: str
    message: str

    def as_dict(self) -> dict:
        return {"pointer": self.pointer, "keyword": self.keyword, "message": self.message}


_VALID = ()


class SchemaCheck(NamedTuple):
    """
    The outcome of checking one event.

    @ivar schema: the schema's id (its file, relative to the plan).
    @ivar mode: what to do with the event when C{errors} is not empty.
    @ivar errors: at most L{MAX_ERRORS} L{Violation}s; empty when valid.
    @ivar total: how many errors there were in all.
    """

    schema: str
    mode: str
    errors: tuple
    total: int


def error_pointer(path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@attr.s(slots=True, frozen=True)
class _Entry:
    schema: str = attr.ib()
    mode: str = attr.ib()
    validator: Any = attr.ib(eq=False, repr=False)
    #: The check of a valid event: the same object every time.
    valid: SchemaCheck = attr.ib(init=False, eq=False, repr=False)

    @valid.default
    def _valid(self) -> SchemaCheck:
        return SchemaCheck(self.schema, self.mode, _VALID, 0)


@attr.s(slots=True)
class _Stream:
    select: str | None = attr.ib()
    by_name: dict = attr.ib()
    default: _Entry | None = attr.ib()
    columns: str | None = attr.ib()




@attr.s
class Plan:
    """
    A compiled plan.  L{check} is the hot path: one dict lookup to pick the
    schema, then the validator's C{is_valid} (about 1.3 us on the bench's
    events); the errors are listed only for an event that fails.

    @ivar path: the plan file.
    """

    path: str = attr.ib()
    streams: dict = attr.ib(factory=dict)

    def columns(self, stream: str) -> str | None:
        """
        The column schema file the plan names for C{stream}, if any.
        """
        s = self.streams.get(stream)
        return s.columns if s is not None else None

    def checks(self, stream: str) -> bool:
        """
        Whether any event of C{stream} can be checked (some mode is not off).
        """
        s = self.streams.get(stream)
        if s is None:
            return False
        entries = list(s.by_name.values()) + ([s.default] if s.default else [])
        return any(e.mode != "off" for e in entries)

    def modes(self) -> set:
        return {e.mode for s in self.streams.values()
                for e in list(s.by_name.values()) + ([s.default] if s.default else [])}

    def name_of(self, stream: str, event: Any) -> Any:
        s = self.streams.get(stream)
        if s is None or s.select is None or type(event) is not dict:
            return None
        if s.select == "name":
            kind = event.get("type")
            return event.get("event") if kind == "track" else kind
        return event.get(s.select)

    def check(self, stream: str, event: Any, name: Any = None) -> SchemaCheck | None:
        """
        Check C{event} (as the client sent it) against its schema.

        @param name: the name that picks the schema, when the caller knows
            it better than the event (a Segment message sent to
            C{/v1/track} carries no C{type}); else read with L{name_of}.
        @return: C{None} when no schema applies (none listed, no default,
            or mode C{off}), else a L{SchemaCheck}.
        """
        s = self.streams.get(stream)
        if s is None:
            return None
        entry = s.default
        if s.by_name:
            if name is None:
                name = self.name_of(stream, event)
            if type(name) is str:
                entry = s.by_name.get(name, s.default)
        if entry is None or entry.mode == "off":
            return None
        validator = entry.validator
        if validator.is_valid(event):
            return entry.valid
        errors = []
        total = 0
        for error in validator.iter_errors(event):
            total += 1
            if total <= MAX_ERRORS:
                message = error.message
                if len(message) > MAX_MESSAGE:
                    message = message[:MAX_MESSAGE - 3] + "..."
                errors.append(Violation(error_pointer(error.instance_path), error.kind.name,
                                        message))
        return SchemaCheck(entry.schema, entry.mode, tuple(errors), total)

    def validate(self, stream: str, event: Any) -> list | None:
        """
        C{None} if C{event} meets its schema (or none applies), else its
        errors (at most L{MAX_ERRORS}).
        """
        result = self.check(stream, event)
        if result is None or not result.errors:
            return None
        return list(result.errors)


def _file_retriever(plan_path: str):
    """
    The jsonschema-rs retriever: local files only, read with
    L{load_schema_file} (JSON or YAML).
    """

    def retrieve(uri: str) -> Any:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise PlanError("a remote $ref is not allowed; refer to files beside the schema")
        return load_schema_file(unquote(parts.path))

    return retrieve


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _compile(plan_path: str, file: str, cache: dict) -> Any:
    import jsonschema_rs

    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(plan_path)), file))
    if path in cache:
        return cache[path]
    try:
        doc = load_schema_file(path)
    except SchemaError as e:
        raise PlanError(_one_line(f"{plan_path}: {e}")) from None
    declared = doc.get("$schema")
    if declared is not None and declared.rstrip("#") != DRAFT_2020_12:
        raise PlanError(f"{path}: $schema {declared!r}: a plan's schemas are draft 2020-12 "
                        f"({DRAFT_2020_12})")
    try:
        jsonschema_rs.meta.validate(doc)
    except jsonschema_rs.ValidationError as e:
        pointer = error_pointer(e.instance_path)
        raise PlanError(f"{path}: not a valid JSON Schema at {pointer or '/'}: "
                        f"{_first_line(e)}") from None
    try:
        validator = jsonschema_rs.Draft202012Validator(
            doc,
            base_uri="file://" + path,
            retriever=_file_retriever(path),
            # Rust's regex crate: linear time, so no pattern can backtrack
            # catastrophically; one it cannot run is refused here.
            pattern_options=jsonschema_rs.RegexOptions(),
            validate_formats=True,
        )
    except jsonschema_rs.ValidationError as e:
        text = _first_line(e)
        if "retrieving it failed" in text:
            # "Resource 'x' is not present ... failed: ErrorType: why"
            text = "$ref " + text.split(" is not present", 1)[0].replace("Resource ", "") + \
                ": " + text.rsplit(": ", 1)[-1]
        raise PlanError(f"{path}: {text}") from None
    except Exception as e:  # noqa: BLE001 - jsonschema-rs raises its own types too
        raise PlanError(f"{path}: {_first_line(e)}") from None
    cache[path] = validator
    return validator


def _mode(value: Any) -> Any:
    # YAML 1.1 reads a bare off as false.
    return "off" if value is False else value


def _entry(plan_path: str, where: str, value: Any, mode: str, cache: dict) -> _Entry:
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict) or not isinstance(value.get("file"), str):
        raise PlanError(f"{plan_path}: {where}: expected {{file: path, mode: ...}}")
    unknown = set(value) - {"file", "mode"}
    if unknown:
        raise PlanError(f"{plan_path}: {where}: unknown key {sorted(unknown)[0]!r}")
    mode = _mode(value.get("mode", mode))
    if mode not in MODES:
        raise PlanError(f"{plan_path}: {where}: mode {mode!r} is not one of "
                        + ", ".join(MODES))
    validator = _compile(plan_path, value["file"], cache)
    return _Entry(schema=value["file"], mode=mode, validator=validator)


def load_plan(path: str) -> Plan:
    """
    Read and compile the plan at C{path}.

    @raise PlanError: naming the file and the reason (bad YAML or JSON, an
        unknown key or mode, a schema that does not load or compile, a
        missing or remote C{$ref}).
    """
    try:
        doc = load_schema_file(path)
    except SchemaError as e:
        raise PlanError(_one_line(str(e).replace("a schema must", "a plan must"))) from None
    unknown = set(doc) - set(STREAMS)
    if unknown:
        raise PlanError(f"{path}: unknown stream {sorted(unknown)[0]!r} (streams: "
                        + ", ".join(STREAMS) + ")")
    cache: dict = {}
    plan = Plan(path=path)
    base = os.path.dirname(os.path.abspath(path))
    for stream in STREAMS:
        spec = doc.get(stream)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise PlanError(f"{path}: {stream}: expected a mapping")
        unknown = set(spec) - {"columns", "select", "mode", "schemas", "default"}
        if unknown:
            raise PlanError(f"{path}: {stream}: unknown key {sorted(unknown)[0]!r}")
        mode = _mode(spec.get("mode", "off"))
        if mode not in MODES:
            raise PlanError(f"{path}: {stream}: mode {mode!r} is not one of " + ", ".join(MODES))
        schemas = spec.get("schemas") or {}
        if not isinstance(schemas, dict):
            raise PlanError(f"{path}: {stream}.schemas: expected a mapping of name to schema")
        select = spec.get("select")
        if stream == "segment":
            if select not in (None, "name"):
                raise PlanError(f"{path}: segment.select: only 'name' (track's event, "
                                "else the message type)")
            select = "name" if schemas else None
        else:
            if select is not None and not isinstance(select, str):
                raise PlanError(f"{path}: collect.select: the name of a field")
            if schemas and select is None:
                select = "event"
        by_name = {str(name): _entry(path, f"{stream}.schemas.{name}", value, mode, cache)
                   for name, value in schemas.items()}
        default = spec.get("default")
        default_entry = (_entry(path, f"{stream}.default", default, mode, cache)
                         if default is not None else None)
        columns = spec.get("columns")
        if columns is not None:
            if not isinstance(columns, str):
                raise PlanError(f"{path}: {stream}.columns: the path of a schema file")
            columns = os.path.normpath(os.path.join(base, columns))
        plan.streams[stream] = _Stream(select=select, by_name=by_name, default=default_entry,
                                       columns=columns)
    return plan
