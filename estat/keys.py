# -*- test-case-name: estat.test.test_keys -*-
"""
Object keys: where a sealed batch is stored.

    RAW_PREFIX/[k=v/...]dt=YYYY-MM-DD/hour=HH/<instance>-<YYYYMMDDTHHMMSSmmmZ>-<unique>.jsonl.gz

(C{.parquet} with C{OUTPUT_FORMAT=parquet}; the C{k=v/} partitions come
from C{PARTITION_BY}, see L{estat.pipeline.partitions}).

The partition is the UTC time of the batch's first event.  The name is
unique across replicas (the instance id comes from the host or task) and
restarts (the instance id carries random bits drawn at start, and every
key 64 more), and it is fixed when the batch is sealed, so every retry,
from memory or from the dead-letter queue, writes the same object.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from typing import Callable, Mapping

import attr

__all__ = ["KeyMaker", "default_instance_id", "sanitize"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize(name: str) -> str:
    """
    Keep only characters that are safe in an S3 key and a file name.
    """
    return _UNSAFE.sub("-", name).strip("-.")[:64] or "estat"


def default_instance_id(
    environ: Mapping[str, str] | None = None,
    hostname: Callable[[], str] = socket.gethostname,
    entropy: Callable[[int], bytes] = os.urandom,
) -> str:
    """
    A name for this process: the host (a Fargate task's host name is its
    own) plus 16 random bits, so two processes on one host, or one host
    restarted, never share it.
    """
    environ = os.environ if environ is None else environ
    base = environ.get("HOSTNAME") or hostname()
    return f"{sanitize(base)}-{entropy(2).hex()}"


@attr.s(slots=True)
class KeyMaker:
    """
    Makes the key of each sealed batch.

    @ivar raw_prefix: C{RAW_PREFIX}, without slashes at either end.
    @ivar dlq_prefix: C{DLQ_PREFIX}, for raw events that could not be encoded.
    @ivar instance_id: this process's name, already sanitised.
    @ivar entropy: C{os.urandom}-like; injected for tests.
    """

    raw_prefix: str = attr.ib()
    dlq_prefix: str = attr.ib()
    instance_id: str = attr.ib()
    entropy: Callable[[int], bytes] = attr.ib(default=os.urandom)
    #: The encoder's suffix (C{.jsonl.gz}, C{.parquet}).
    suffix: str = attr.ib(default=".jsonl.gz")

    def batch_key(self, first_event_at: float, sealed_at: float,
                  unique: str | None = None, partition: str = "") -> str:
        """
        The key of a batch whose first event was received at
        C{first_event_at} and that was sealed at C{sealed_at} (epoch
        seconds).  C{unique} (16 hex digits) replaces the random part: the
        write-ahead log derives it from its id and the batch's sequence
        numbers.  C{partition} (C{"k=v/..."}, already encoded) goes
        before C{dt}.
        """
        first = datetime.datetime.fromtimestamp(first_event_at, tz=datetime.timezone.utc)
        sealed = datetime.datetime.fromtimestamp(sealed_at, tz=datetime.timezone.utc)
        stamp = sealed.strftime("%Y%m%dT%H%M%S") + f"{sealed.microsecond // 1000:03d}Z"
        return (
            f"{self.raw_prefix}/{partition}dt={first:%Y-%m-%d}/hour={first:%H}/"
            f"{self.instance_id}-{stamp}-{unique or self.entropy(8).hex()}{self.suffix}"
        )

    def with_partition(self, batch_key: str, partition: str) -> str:
        """
        C{batch_key} (of no partition) with C{partition} in front of C{dt}.
        """
        head = self.raw_prefix + "/"
        if not batch_key.startswith(head):
            raise ValueError(f"{batch_key!r} is not under {head!r}")
        return head + partition + batch_key[len(head):]

    def poison_key(self, batch_key: str) -> str:
        """
        The key under C{DLQ_PREFIX} that holds the raw originals of the
        events of batch C{batch_key} that could not be encoded (gzip JSON
        Lines, whatever the output format).
        """
        rest = batch_key[len(self.raw_prefix) + 1:] if batch_key.startswith(self.raw_prefix + "/") else batch_key
        if self.suffix != ".jsonl.gz" and rest.endswith(self.suffix):
            rest = rest[:-len(self.suffix)] + ".jsonl.gz"
        return f"{self.dlq_prefix}/{rest}"
