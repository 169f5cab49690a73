# -*- test-case-name: estat.test.test_encoder -*-
"""
C{OUTPUT_FORMAT=jsonl}: gzip JSON Lines, the bytes Estat has always stored
(L{estat.encoder.encode_batch}).
"""

from __future__ import annotations

import attr
from zope.interface import implementer

from ..encoder import Batch, encode_batch
from ..interfaces import IEncoder

__all__ = ["JsonlEncoder", "SUFFIX"]

SUFFIX = ".jsonl.gz"


@implementer(IEncoder)
@attr.s(frozen=True)
class JsonlEncoder:
    """
    @ivar level: C{GZIP_LEVEL}.
    @ivar stream: the stream whose batches it encodes.
    """

    level: int = attr.ib(default=6)
    stream: str = attr.ib(default="collect")
    suffix = SUFFIX

    def encode(self, batch: Batch) -> list:
        return encode_batch(batch, self.level)
