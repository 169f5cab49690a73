# -*- test-case-name: estat.test.test_partitions -*-
"""
Partitions for batches the batcher could not keep apart.

With C{ACK_MODE=memory} the batcher keeps each partition's events in a
batch of their own (L{estat.batcher.Batcher}'s C{partitioner}).  With
C{disk} and C{stored}, a batch is one run of the stream's events (the
write-ahead log and the acknowledgement ledger follow that order), so the
encoder splits it: one object per partition, under the batch's key with
the partition in front of C{dt}.  The split depends on the batch alone,
so a replay writes the same objects under the same keys.
"""

from __future__ import annotations

import attr
from zope.interface import implementer

from ..encoder import Batch
from ..interfaces import IEncoder
from ..keys import KeyMaker
from ..pipeline.partitions import Partitioner

__all__ = ["PartitionedEncoder"]


@implementer(IEncoder)
@attr.s(eq=False)
class PartitionedEncoder:
    inner: IEncoder = attr.ib()
    partitioner: Partitioner = attr.ib()
    key_maker: KeyMaker = attr.ib()

    @property
    def stream(self) -> str:
        return self.inner.stream

    @property
    def suffix(self) -> str:
        return self.inner.suffix

    def encode(self, batch: Batch) -> list:
        if batch.partition is not None:
            return self.inner.encode(batch)
        groups: dict = {}
        other = self.partitioner.other
        limit = self.partitioner.max_partitions
        for event in batch.events:
            path = self.partitioner.path_of(event[1])
            group = groups.get(path)
            if group is None:
                if len(groups) >= limit:
                    path = other
                    group = groups.get(path)
                if group is None:
                    group = groups[path] = []
            group.append(event)
        objects = []
        for path, events in groups.items():
            key = self.key_maker.with_partition(batch.key, path)
            part = attr.evolve(batch, key=key, poison_key=self.key_maker.poison_key(key),
                               events=events, partition=path)
            objects.extend(self.inner.encode(part))
        return objects
