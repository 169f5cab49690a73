# -*- test-case-name: estat.test.test_encode_rows -*-
"""
Events to rows of declared columns, and rows back to events, losing
nothing.

The rules (README, "Tables"):

 - a member whose value fits its column is in the column, and only there;
 - a member no column declares, and a value that does not fit its column
   (its column is then null and the misfit counted), is in C{_extra}, at
   its own path: C{_extra} mirrors the event's shape and holds exactly what
   no column holds, so the event is the deep merge of the columns with
   C{_extra} (C{_extra} winning);
 - an explicit C{null} is recorded in C{_extra}, so absent and null stay
   apart; C{true} never fits an integer nor C{1} a boolean; an integer fits
   a double column only when the double is exactly it;
 - a timestamp fits as RFC 3339 with an offset (or C{Z}) and at most six
   fractional digits; the column holds the instant, and when the text is
   not the one the column gives back (C{2026-12-06T14:40:04.123Z}, or
   six digits when the microseconds are not whole milliseconds) the text
   is also kept in C{_extra}, so the event comes back as sent;
 - a date fits as C{YYYY-MM-DD}; an empty object is a non-null struct and
   an empty array an empty list; a list whose items do not all fit is kept
   whole in C{_extra}.

Pure Python, no pyarrow: the values are what C{pyarrow.array} takes for
each column's type (timestamps as microseconds since the epoch, dates as
days).
"""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from typing import Any, Callable

import orjson

from ..schema.columns import ESTAT_COLUMN, SCHEMA_ERRORS_COLUMN, Column, Table

__all__ = ["MISSING", "RowBuilder", "dumps_json", "format_timestamp", "parse_timestamp",
           "rebuild_event", "deep_merge"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: "Nothing for _extra".
MISSING: Any = _Missing()

_INT64_MIN = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()

_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,6}))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))\Z")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")

#: Epoch seconds of the start of each hour seen (a batch's timestamps share
#: a few).
_hour_cache: dict = {}
#: C{"YYYY-MM-DDTHH:"} -> epoch seconds of that hour (UTC, C{Z} spellings).
_prefix_cache: dict = {}


def _hour_epoch(year: int, month: int, day: int, hour: int) -> int:
    key = (year, month, day, hour)
    seconds = _hour_cache.get(key)
    if seconds is None:
        # Raises ValueError for a date that does not exist.
        days = datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
        if not 0 <= hour <= 23:
            raise ValueError("hour")
        seconds = days * 86400 + hour * 3600
        if len(_hour_cache) > 4096:
            _hour_cache.clear()
        _hour_cache[key] = seconds
    return seconds


def parse_timestamp(text: str) -> int | None:
    """
    Microseconds since the epoch of an RFC 3339 date-time with an offset,
    or C{None} when C{text} is not one that converts without loss.
    """
    if len(text) == 24 and text[23] == "Z":
        # The common spelling (YYYY-MM-DDTHH:MM:SS.mmmZ): its hour is one a
        # batch has seen already.
        base = _prefix_cache.get(text[:14])
        if base is not None and text[16] == ":" and text[19] == "." and text.isascii():
            rest = text[14:16] + text[17:19] + text[20:23]
            if rest.isdigit():
                minute_i = int(rest[0:2])
                second_i = int(rest[2:4])
                if minute_i < 60 and second_i < 60:
                    return (base + minute_i * 60 + second_i) * 1000000 + int(rest[4:]) * 1000
    m = _TIMESTAMP.match(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, sign, off_h, off_m = m.groups()
    minute_i = int(minute)
    second_i = int(second)
    if minute_i > 59 or second_i > 59:  # no leap seconds: they have no instant
        return None
    try:
        seconds = _hour_epoch(int(year), int(month), int(day), int(hour))
    except ValueError:
        return None
    seconds += minute_i * 60 + second_i
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            return None
        offset = oh * 3600 + om * 60
        seconds = seconds - offset if sign == "+" else seconds + offset
    micros = int(frac.ljust(6, "0")) if frac else 0
    value = seconds * 1000000 + micros
    if sign is None and len(text) == 24 and text[10] == "T" and len(_prefix_cache) < 4096:
        _prefix_cache[text[:14]] = seconds - minute_i * 60 - second_i
    # The years a timestamp column (and Python's datetime) can hold.
    if not -62135596800000000 <= value <= 253402300799999999:
        return None
    return value


def format_timestamp(micros: int) -> str:
    """
    The text a timestamp column gives back: UTC, C{Z}, milliseconds, or
    microseconds when they are not whole milliseconds.
    """
    seconds, us = divmod(micros, 1000000)
    days, rest = divmod(seconds, 86400)
    date = datetime.date.fromordinal(days + _EPOCH_ORDINAL)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    if us % 1000:
        fraction = f"{us:06d}"
    else:
        fraction = f"{us // 1000:03d}"
    return f"{date.isoformat()}T{hour:02d}:{minute:02d}:{second:02d}.{fraction}Z"


def parse_date(text: str) -> int | None:
    if _DATE.match(text) is None:
        return None
    try:
        return datetime.date.fromisoformat(text).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None


def format_date(days: int) -> str:
    return datetime.date.fromordinal(days + _EPOCH_ORDINAL).isoformat()


def dumps_json(value: Any) -> str:
    """
    Compact JSON text of C{value}; the standard library takes what orjson
    refuses (integers beyond 64 bits, nesting deeper than 255).
    """
    try:
        return orjson.dumps(value).decode("utf-8")
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# A fitter: value -> (column value, what goes to _extra or MISSING); it
# counts misfits in the Counter it is given.
Fitter = Callable[[Any, Counter], tuple]


def _scalar_fitter(kind: str, label: str) -> Fitter:
    if kind == "string":
        def fit(v, misfits):
            if type(v) is str:
                return v, MISSING
            if v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "int64":
        def fit(v, misfits):
            if type(v) is int and _INT64_MIN <= v <= _INT64_MAX:
                return v, MISSING
            if v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "double":
        def fit(v, misfits):
            t = type(v)
            if t is float:
                return v, MISSING
            if t is int:
                try:
                    f = float(v)
                except OverflowError:
                    f = None
                if f is not None and f == v:
                    return f, MISSING
            if v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "bool":
        def fit(v, misfits):
            if type(v) is bool:
                return v, MISSING
            if v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "timestamp":
        def fit(v, misfits):
            if type(v) is str:
                micros = parse_timestamp(v)
                if micros is not None:
                    # The text itself, when the column would not give it back.
                    return micros, (MISSING if format_timestamp(micros) == v else v)
            elif v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "date":
        def fit(v, misfits):
            if type(v) is str:
                days = parse_date(v)
                if days is not None:
                    return days, MISSING
            elif v is None:
                return None, None
            misfits[label] += 1
            return None, v
    elif kind == "json":
        def fit(v, misfits):
            if v is None:
                return None, None
            return dumps_json(v), MISSING
    else:  # pragma: no cover - Column validates kinds
        raise ValueError(kind)
    return fit


def _list_fitter(column: Column, label: str) -> Fitter:
    item = _scalar_fitter(column.item, label)
    scratch: Counter = Counter()

    def fit(v, misfits):
        if type(v) is list:
            values = []
            keep = False
            for x in v:
                if x is None:
                    values.append(None)
                    continue
                value, rest = item(x, scratch)
                if scratch:
                    scratch.clear()
                    misfits[label] += 1
                    return None, v
                if rest is not MISSING:
                    keep = True
                values.append(value)
            return values, (v if keep else MISSING)
        if v is None:
            return None, None
        misfits[label] += 1
        return None, v

    return fit


def _struct_fitter(fields: tuple, label: str) -> Fitter:
    children = [(f.name, fitter_for(f, f"{label}.{f.name}" if label else f.name))
                for f in fields]
    names = frozenset(f.name for f in fields)

    def fit(v, misfits):
        if type(v) is not dict:
            if v is None:
                return None, None
            misfits[label] += 1
            return None, v
        out = {}
        extra = {}
        found = 0
        for name, child in children:
            if name in v:
                found += 1
                value, rest = child(v[name], misfits)
                out[name] = value
                if rest is not MISSING:
                    extra[name] = rest
            else:
                out[name] = None
        if found < len(v):
            for key, value in v.items():
                if key not in names:
                    extra[key] = value
        return out, (extra if extra else MISSING)

    return fit


def fitter_for(column: Column, label: str) -> Fitter:
    if column.kind == "struct":
        return _struct_fitter(column.fields, label)
    if column.kind == "list":
        return _list_fitter(column, label)
    return _scalar_fitter(column.kind, label)


def _source_reader(column: Column) -> Callable[[dict, Counter], Any]:
    """
    A derived column: its value if the member at its source path fits,
    else null (a misfit is counted; the member itself is kept whole by
    another column).
    """
    path = column.source
    fit = _scalar_fitter(column.kind, column.name)

    def read(event, misfits):
        node = event
        for part in path:
            if type(node) is not dict or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        value, _ = fit(node, misfits)
        return value

    return read


def _canonical(text: str, micros: int) -> bool:
    """
    Whether a timestamp column gives C{text} back as it is.
    """
    if len(text) == 24 and text[23] == "Z" and text[19] == "." and text[10] == "T":
        return True  # YYYY-MM-DDTHH:MM:SS.mmmZ, valid: always its own rendering
    return format_timestamp(micros) == text


def _int_fits_double(v: int) -> bool:
    try:
        return float(v) == v
    except OverflowError:
        return False


class _Compiler:
    """
    Writes the Python source of a batch's row building for one table: the
    checks of every declared column inlined in one loop (no call, tuple or
    closure per value), one function per declared object.  What it writes
    is a pure function of the table, and runs with the rules above; the
    fitters of L{fitter_for} keep the rules for lists and derived columns.
    """

    def __init__(self) -> None:
        self.namespace: dict = {
            "MISSING": MISSING, "dumps_json": dumps_json, "parse_timestamp": parse_timestamp,
            "parse_date": parse_date, "_canonical": _canonical,
            "_int_fits_double": _int_fits_double,
        }
        self.sources: list = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.name(prefix)
        self.namespace[name] = value
        return name

    def fit(self, column: Column, label: str, target: str, x: str, indent: str) -> list:
        """
        Lines that fit C{v} (present) to C{column}: set C{target}, and on a
        misfit or null put C{v} in dict C{x} under the column's name.
        """
        key = repr(column.name)
        lab = repr(label)
        miss = [f"{indent}    {target} = None", f"{indent}    {x}[{key}] = v",
                f"{indent}    if v is not None:", f"{indent}        M[{lab}] += 1"]
        kind = column.kind
        if kind == "string":
            return [f"{indent}if type(v) is str:", f"{indent}    {target} = v",
                    f"{indent}else:"] + miss
        if kind == "int64":
            return [f"{indent}if type(v) is int and -9223372036854775808 <= v <= 9223372036854775807:",
                    f"{indent}    {target} = v", f"{indent}else:"] + miss
        if kind == "bool":
            return [f"{indent}if type(v) is bool:", f"{indent}    {target} = v",
                    f"{indent}else:"] + miss
        if kind == "double":
            return [f"{indent}t = type(v)", f"{indent}if t is float:", f"{indent}    {target} = v",
                    f"{indent}elif t is int and _int_fits_double(v):",
                    f"{indent}    {target} = float(v)", f"{indent}else:"] + miss
        if kind == "timestamp":
            return [f"{indent}if type(v) is str and ({target} := parse_timestamp(v)) is not None:",
                    f"{indent}    if not _canonical(v, {target}):",
                    f"{indent}        {x}[{key}] = v",
                    f"{indent}else:"] + miss
        if kind == "date":
            return [f"{indent}if type(v) is str and ({target} := parse_date(v)) is not None:",
                    f"{indent}    pass", f"{indent}else:"] + miss
        if kind == "json":
            return [f"{indent}if v is None:", f"{indent}    {target} = None",
                    f"{indent}    {x}[{key}] = None",
                    f"{indent}else:", f"{indent}    {target} = dumps_json(v)"]
        if kind == "list":
            helper = self.constant("L", fitter_for(column, label))
        else:  # struct
            helper = self.struct(column.fields, label)
        return [f"{indent}{target}, r = {helper}(v, M)",
                f"{indent}if r is not MISSING:", f"{indent}    {x}[{key}] = r"]

    def fields(self, fields: tuple, label: str, d: str, x: str, targets: list,
               indent: str) -> list:
        lines = [f"{indent}found = 0"]
        for column, target in zip(fields, targets):
            key = repr(column.name)
            sub = f"{label}.{column.name}" if label else column.name
            lines += [f"{indent}if {key} in {d}:", f"{indent}    found += 1",
                      f"{indent}    v = {d}[{key}]"]
            lines += self.fit(column, sub, target, x, indent + "    ")
            lines += [f"{indent}else:", f"{indent}    {target} = None"]
        names = self.constant("N", frozenset(c.name for c in fields))
        lines += [f"{indent}if found < len({d}):", f"{indent}    for k in {d}:",
                  f"{indent}        if k not in {names}:",
                  f"{indent}            {x}[k] = {d}[k]"]
        return lines

    def struct(self, fields: tuple, label: str) -> str:
        """
        A function C{(v, M) -> (dict or None, extra or MISSING)} for a
        declared object; returns its name.
        """
        name = self.name("S")
        targets = [f"c{i}" for i in range(len(fields))]
        lines = [f"def {name}(d, M):", "    if type(d) is not dict:",
                 "        if d is None:", "            return None, None",
                 f"        M[{label!r}] += 1", "        return None, d", "    x = {}"]
        lines += self.fields(fields, label, "d", "x", targets, "    ")
        pairs = ", ".join(f"{c.name!r}: {t}" for c, t in zip(fields, targets))
        lines += [f"    return {{{pairs}}}, (x if x else MISSING)"]
        self.sources.append("\n".join(lines))
        return name

    def table(self, table: Table) -> str:
        columns = table.columns
        top = [c for c in columns if not c.derived]
        targets = {c.name: f"c{i}" for i, c in enumerate(columns)}
        n = len(columns)
        lines = ["def build(events, cols, M, failed):"]
        lines += [f"    a{i} = cols[{i}].append" for i in range(n + 1)]
        lines += ["    for index, d in enumerate(events):",
                  "        if type(d) is not dict:",
                  f"            for i in range({n}):", "                cols[i].append(None)",
                  f"            a{n}(dumps_json(d))", "            continue",
                  "        try:", "            x = {}"]
        lines += self.fields(tuple(top), "", "d", "x", [targets[c.name] for c in top],
                             "            ")
        for i, column in enumerate(columns):
            if column.derived:
                reader = self.constant("R", _source_reader(column))
                lines.append(f"            c{i} = {reader}(d, M)")
        lines += ["            xt = dumps_json(x) if x else None",
                  "        except Exception as e:  # one event never fails its batch",
                  "            failed.append((index, e))", "            continue"]
        lines += [f"        a{i}(c{i})" for i in range(n)] + [f"        a{n}(xt)"]
        self.sources.append("\n".join(lines))
        source = "\n\n".join(self.sources) + "\n"
        exec(compile(source, f"<estat rows of {table.stream}>", "exec"), self.namespace)
        self.source = source
        return "build"


class RowBuilder:
    """
    Builds the columns of a batch of events for L{Table} C{table}: one
    Python list per column, then C{_extra}'s.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        compiler = _Compiler()
        self._build = compiler.namespace[compiler.table(table)]
        #: The generated source, for reading and debugging.
        self.source = compiler.source

    def columns(self, events: list) -> tuple[list, Counter, list]:
        """
        C{(columns, misfits, failed)}: one list per column of the table,
        then C{_extra}'s (JSON text or C{None}); misfits per column path;
        the indexes of the events that could not be made a row (with the
        exception), which are in no column.
        """
        misfits: Counter = Counter()
        cols = [[] for _ in range(len(self.table.columns) + 1)]
        failed: list = []
        self._build(events, cols, misfits, failed)
        return cols, misfits, failed


def deep_merge(base: dict, extra: dict) -> dict:
    """
    C{base} with C{extra} merged in, C{extra} winning; objects merge
    member by member.
    """
    for key, value in extra.items():
        old = base.get(key, MISSING)
        if type(old) is dict and type(value) is dict:
            deep_merge(old, value)
        else:
            base[key] = value
    return base


def _from_column(column: Column, value: Any) -> Any:
    kind = column.kind
    if kind == "timestamp":
        return format_timestamp(_micros(value))
    if kind == "date":
        return value.isoformat() if isinstance(value, datetime.date) else format_date(value)
    if kind == "json":
        return _loads(value)
    if kind == "struct":
        out = {}
        for f in column.fields:
            v = value.get(f.name)
            if v is not None:
                out[f.name] = _from_column(f, v)
        return out
    if kind == "list":
        item = Column("item", column.item)
        return [None if v is None else _from_column(item, v) for v in value]
    return value


def _micros(value: Any) -> int:
    if isinstance(value, datetime.datetime):
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1000000 + delta.microseconds
    return int(value)


def rebuild_event(table: Table, row: dict) -> Any:
    """
    The event a row was made from (key order aside): the columns' values,
    deep-merged with C{_extra}.  C{row} maps column names to values as
    C{pyarrow.Table.to_pylist} gives them.
    """
    extra_text = row.get("_extra")
    extra = _loads(extra_text) if extra_text is not None else {}
    if type(extra) is not dict:
        return extra  # an event that was not an object
    event: dict = {}
    for column in table.columns:
        if column.derived:
            continue
        value = row.get(column.name)
        if value is not None:
            event[column.name] = _from_column(column, value)
    flagged = event.pop(SCHEMA_ERRORS_COLUMN, None)
    if flagged is not None and type(event.get(ESTAT_COLUMN)) is dict:
        event[ESTAT_COLUMN]["schema_errors"] = flagged
    return deep_merge(event, extra)


def _loads(text: str) -> Any:
    # Not orjson: it reads integers beyond 64 bits as floats.
    return json.loads(text)
