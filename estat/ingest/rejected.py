# -*- test-case-name: estat.test.test_ingest_body -*-
"""
The one refusal of a request by the ingest rules, whatever the route.
"""

from __future__ import annotations

__all__ = ["Rejected"]


class Rejected(Exception):
    """
    A request the ingest rules refuse: a body that does not decode, is too
    large or is not an event, a Segment message of the wrong shape, a write
    key that is not allowed.

    @ivar status: the HTTP status (400, 401, 413, 415).  Segment's routes
        answer 400 for a 413 (L{segment}): the SDKs retry a 413 for ever.
    @ivar reason: a short reason, for metrics.
    @ivar message: a short sentence for the JSON error body.
    @ivar index: the index of the first bad element of a batch, if any.
    @ivar count: the events in the refused request, where known (for the
        metrics).
    """

    def __init__(self, status: int, reason: str, message: str, index: int | None = None,
                 count: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.index = index
        self.count = count

    def segment(self) -> tuple:
        """
        C{(status, reason)} as Segment's routes answer them: a body too
        large is C{400 too_large}, since the SDKs drop a 400 and retry a
        413 for ever.
        """
        if self.status == 413:
            return 400, "too_large"
        return self.status, self.reason
