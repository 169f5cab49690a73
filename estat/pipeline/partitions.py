# -*- test-case-name: estat.test.test_partitions -*-
"""
Dynamic partitions (C{PARTITION_BY}, C{SEGMENT_PARTITION_BY}): Hive
partition keys in front of C{dt}/C{hour}, from C{source} (the write key's
name) or one declared string field of the stream.

A value is percent-encoded as UTF-8 bytes outside C{A-Z a-z 0-9 - _ .}
(so C{/}, C{=}, C{%}, space, control and non-ASCII characters never appear
raw in a key), cut to L{MAX_VALUE_BYTES} bytes of UTF-8 first.  A missing,
empty or non-string value is L{DEFAULT} (C{__HIVE_DEFAULT_PARTITION__},
which Hive and Spark read as null).
"""

from __future__ import annotations

from typing import Any

import attr
import orjson

from ..event import SERVER_FIELD

__all__ = ["DEFAULT", "OTHER", "MAX_VALUE_BYTES", "Partitioner", "BadRowPartitioner",
           "encode_value", "check_keys"]

DEFAULT = "__HIVE_DEFAULT_PARTITION__"
#: Where events go whose value would open one partition too many.
OTHER = "__other__"
MAX_VALUE_BYTES = 128

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_ESCAPE = [chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256)]


def encode_value(value: Any) -> str:
    """
    A partition value as it appears in a key.
    """
    if type(value) is not str or not value:
        return DEFAULT
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > MAX_VALUE_BYTES:
        data = data[:MAX_VALUE_BYTES].decode("utf-8", "ignore").encode("utf-8")
    text = "".join([_ESCAPE[b] for b in data])
    if text in (DEFAULT, OTHER, ".", ".."):
        # A client's own value never reads as null or as the overflow.
        text = _escape_first(text)
    return text


def _escape_first(text: str) -> str:
    return f"%{ord(text[0]):02X}{text[1:]}"


def check_keys(keys: tuple, stream: str, table) -> None:
    """
    Raise C{ValueError} unless every key is C{source} or a declared
    top-level string column of C{table} (an L{estat.schema.columns.Table}).
    """
    strings = {c.name for c in table.columns if c.kind == "string" and not c.derived}
    for key in keys:
        if key != "source" and key not in strings:
            raise ValueError(
                f"{key!r} is not a partition key of the {stream} stream: use 'source' or a "
                f"top-level string field its schema declares ({', '.join(sorted(strings)) or 'none'})")


@attr.s(eq=False)
class Partitioner:
    """
    The partition path (C{"k=v/..."}) of each event of a stream.

    @ivar keys: the partition keys, in order.
    @ivar max_partitions: C{MAX_PARTITIONS}.
    """

    keys: tuple = attr.ib()
    max_partitions: int = attr.ib(default=100)
    _paths: dict = attr.ib(factory=dict, init=False)

    @property
    def other(self) -> str:
        return "".join(f"{k}={OTHER}/" for k in self.keys)

    def values_of(self, payload) -> tuple:
        obj = orjson.loads(payload) if type(payload) is bytes else payload.obj
        if type(obj) is not dict:
            return (None,) * len(self.keys)
        out = []
        for key in self.keys:
            if key == "source":
                server = obj.get(SERVER_FIELD)
                out.append(server.get("source") if type(server) is dict else None)
            else:
                out.append(obj.get(key))
        return tuple(v if type(v) is str else None for v in out)

    def path_of(self, payload) -> str:
        """
        The partition path of one queued payload (line bytes or an
        L{estat.event.UnencodedEvent}).
        """
        values = self.values_of(payload)
        path = self._paths.get(values)
        if path is None:
            path = "".join(f"{k}={encode_value(v)}/" for k, v in zip(self.keys, values))
            if len(self._paths) > 10000:
                self._paths.clear()
            self._paths[values] = path
        return path


@attr.s(eq=False)
class BadRowPartitioner(Partitioner):
    """
    The partitions of a stream's bad rows: the same keys, read from the
    event as the client sent it (the bad row's C{payload}; C{source} from
    its C{_estat}; a Segment message's C{type}, when the body left it out,
    from the type its route gave it), with the same encoding.
    """

    def values_of(self, payload) -> tuple:
        row = orjson.loads(payload) if type(payload) is bytes else payload.obj
        if type(row) is not dict:
            return (None,) * len(self.keys)
        event = row.get("payload")
        event = event if type(event) is dict else {}
        out = []
        for key in self.keys:
            if key == "source":
                server = row.get(SERVER_FIELD)
                out.append(server.get("source") if type(server) is dict else None)
            elif key == "type" and "type" not in event:
                out.append(row.get("type"))
            else:
                out.append(event.get(key))
        return tuple(v if type(v) is str else None for v in out)
