# -*- test-case-name: estat.test.test_encoder -*-
"""
The encoder: a sealed batch becomes one gzip-compressed JSON Lines object.

L{encode_batch} is CPU work (joining, JSON for the rare event the handler
could not serialise, deflate, MD5) and must only ever run in a worker
thread, never on the reactor thread.  One event that cannot be encoded
never fails its batch: its raw original is set aside for the C{DLQ_PREFIX}
key space and the rest is stored.
"""

from __future__ import annotations

import base64
import hashlib
import json
from itertools import chain

import attr

import deflate

from .event import SERVER_FIELD, UnencodedEvent

__all__ = ["LEVELS", "LIBRARY", "Batch", "EncodedObject", "content_md5", "encode_batch",
           "encode_object", "gzip_bytes"]

#: What compresses: libdeflate, through the C{deflate} package.  Measured on
#: the benchmark's batches (bench/compression.py; bench/RESULTS.md,
#: "Compression"), level 6 against zlib level 6: 0.57 of its instructions
#: per byte (0.5-0.7 of its CPU time, run to run) and 5.5-7.5 % smaller
#: objects.  zlib-ng level 6 costs the same within the noise (2 % fewer
#: instructions) but is only 1.4-1.9 % smaller, its levels 1 and 9 are larger
#: than zlib's, and its maintainers do not keep its output the same from one
#: platform to another (x86-64 vs arm64), which replays that overwrite an
#: object with the same bytes would need.  ISA-L is 19-28 % larger than
#: zlib 6 even at its best level.
LIBRARY = f"libdeflate (deflate {deflate.__version__})"

#: C{GZIP_LEVEL} -> libdeflate level.  The numbers keep their meaning: at
#: each level 1-9 libdeflate gives smaller output than zlib at that level
#: for less CPU.  Level 5 would cost 9 % fewer instructions than 6 but is
#: within 1 % of zlib 6's size and over it on one shape of data, so the
#: default stays 6.  libdeflate's levels 10-12 (near-optimal parsing) cost
#: 6-12 times level 9 for 1-3 % and are not offered.
LEVELS = {level: level for level in range(1, 10)}


@attr.s(slots=True, frozen=True)
class Batch:
    """
    A sealed batch: its events and the keys it will be stored under.
    """

    key: str = attr.ib()
    poison_key: str = attr.ib()
    events: list = attr.ib(repr=False)  # of (received_at, bytes | UnencodedEvent)
    first_event_at: float = attr.ib()
    sealed_at: float = attr.ib()
    #: The batch's partition path (C{"k=v/"}, in its key), when the
    #: batcher kept its partition apart; C{None} when it did not.
    partition: str | None = attr.ib(default=None)

    @property
    def count(self) -> int:
        return len(self.events)


@attr.s(slots=True, frozen=True)
class EncodedObject:
    """
    One object for the store: a gzip JSON Lines body and the key it goes
    under.  A batch gives one, or two when some of its events could not be
    encoded (C{poison} is then true for the object of raw originals).

    @ivar count: events in C{body}.
    @ivar content_md5: base64 MD5 of C{body}, for C{Content-MD5}.
    """

    key: str = attr.ib()
    body: bytes = attr.ib(repr=False)
    count: int = attr.ib()
    content_md5: str = attr.ib()
    poison: bool = attr.ib(default=False)
    #: C{((column path, count), ...)}: values that did not fit their
    #: declared column (Parquet), for C{estat_column_mismatches_total}.
    misfits: tuple = attr.ib(default=())


def gzip_bytes(data: bytes, level: int) -> bytes:
    """
    gzip C{data} as one standard gzip member (RFC 1952: MTIME 0, no file
    name, OS "unknown"), so equal input gives equal bytes.

    @param level: a C{GZIP_LEVEL} (1-9), see L{LEVELS}.
    """
    # One call over the whole batch, with the GIL released while libdeflate
    # works (src/_deflate.c wraps libdeflate_gzip_compress in
    # Py_BEGIN/END_ALLOW_THREADS), so the reactor thread runs meanwhile.
    # It returns a bytearray; stores and the DLQ get immutable bytes.
    return bytes(deflate.gzip_compress(data, LEVELS[level]))


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _encode_slow(event: UnencodedEvent) -> bytes:
    text = json.dumps(event.obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _poison_line(event: UnencodedEvent, error: BaseException) -> bytes:
    server = event.obj.get(SERVER_FIELD) if isinstance(event.obj, dict) else None
    record = {
        "error": f"{type(error).__name__}: {error}"[:500],
        "raw": event.raw.decode("utf-8", "backslashreplace") if event.raw is not None
        else repr(event.obj),
        SERVER_FIELD: server,
    }
    return json.dumps(record, ensure_ascii=True, default=repr).encode("ascii")


#: What ends the last line.
_LAST = (b"",)


def encode_object(key: str, lines: list, level: int, poison: bool = False) -> EncodedObject:
    """
    gzip C{lines} (bytes without newlines) as one JSON Lines object.
    """
    # One join, its last line ending too: no second copy of the batch's
    # text for the final newline (join makes a list of the chain: pointers,
    # not text).
    body = gzip_bytes(b"\n".join(chain(lines, _LAST)), level)
    return EncodedObject(key=key, body=body, count=len(lines),
                         content_md5=content_md5(body), poison=poison)


def encode_batch(batch: Batch, level: int = 6) -> list:
    """
    Encode C{batch} into its L{EncodedObject}s.  Runs in a worker thread.
    """
    lines = []
    poison = []
    for _, payload in batch.events:
        if type(payload) is bytes:
            lines.append(payload)
            continue
        try:
            lines.append(_encode_slow(payload))
        except Exception as e:  # any failure of one event must not fail the batch
            poison.append(_poison_line(payload, e))
    objects = []
    if lines:
        objects.append(encode_object(batch.key, lines, level))
    if poison:
        objects.append(encode_object(batch.poison_key, poison, level, poison=True))
    return objects
