# -*- test-case-name: estat.test.test_dedup -*-
"""
A window of recently seen message ids, so that a client's retry of a batch
Estat already admitted (the SDKs retry whole batches after a timeout) is
acknowledged without being stored again.

Bounded in time and in memory:

 - an id is remembered for C{window} seconds (C{DEDUP_WINDOW}), then
   forgotten;
 - at most C{max_ids} ids are held (C{DEDUP_MAX_IDS}); past that the oldest
   are forgotten early (counted), so a burst shortens the window instead of
   growing the process.

Ids are kept as 60-bit hashes of C{(namespace, id)} in a ring of
generations, one Python C{set} each: a generation is retired whole when it
is older than the window or when the ring is full, so expiry costs nothing
per id.  A 60-bit int is a 32-byte object and a set slot 16 bytes, which is
what keeps the budget under 10 MB per 100,000 ids (measured in
L{estat.test.test_dedup}).  Two different ids share a hash with a
probability of about n^2 / 2^61 (4e-9 for 100,000 ids): such a message would
be taken for a retry.

The window is per process: a retry that reaches another replica is stored
again.  Every stored line keeps its C{messageId} for deduplication
downstream.

Nothing here does I/O or touches the reactor; time comes from the injected
clock.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import attr
from twisted.internet.interfaces import IReactorTime

__all__ = ["FRESH", "SEEN", "PENDING", "DedupWindow", "Retries", "find_retries", "id_key"]

#: A message id not seen within the window: store it.
FRESH = 0
#: Seen (admitted) within the window, or earlier in the same request: a retry.
SEEN = 1
#: Held by a request whose admission has not answered yet.
PENDING = 2

_MASK = (1 << 60) - 1


def id_key(namespace: str, message_id: str) -> int:
    """
    The 60-bit key of C{message_id} in C{namespace} (a stream and a
    source: the same id from two sources is two messages).
    """
    return hash((namespace, message_id)) & _MASK


@attr.s(eq=False)
class DedupWindow:
    """
    @ivar clock: the time source.
    @ivar window: seconds an admitted id is remembered; C{0} disables.
    @ivar max_ids: the most ids held at once.
    @ivar generations: how many sets the window is cut into; one is retired
        at a time, so up to C{1/generations} of the window (in time or in
        ids) is forgotten at once.
    @ivar on_evicted_early: called with a count of ids forgotten before
        their window was over, because C{max_ids} were held.
    """

    clock: IReactorTime = attr.ib()
    window: float = attr.ib(default=600.0)
    max_ids: int = attr.ib(default=100_000)
    generations: int = attr.ib(default=8)
    on_evicted_early: object = attr.ib(default=lambda count: None)

    def __attrs_post_init__(self) -> None:
        if self.generations < 1:
            raise ValueError("generations must be at least 1")
        self._span = self.window / self.generations
        self._per_generation = max(1, -(-self.max_ids // self.generations))
        # (started at, ids), oldest first; the last is the one being filled.
        self._ring: deque = deque()
        self._held = 0
        self._pending: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.max_ids > 0

    def __len__(self) -> int:
        """
        The ids remembered (admitted ones; not the pending).
        """
        return self._held

    def __bool__(self) -> bool:
        # A window is a window even when it holds nothing yet.
        return True

    def _expire(self, now: float) -> None:
        ring = self._ring
        horizon = now - self.window
        # A generation is forgotten once its newest possible id is older
        # than the window: it was started at most one span before that id.
        while ring and ring[0][0] + self._span <= horizon:
            _, ids = ring.popleft()
            self._held -= len(ids)

    def check(self, keys: Iterable[int]) -> list[int]:
        """
        The state of each key: L{FRESH}, L{SEEN} or L{PENDING}.  A key that
        appears twice in C{keys} is L{SEEN} the second time.
        """
        if not self.enabled:
            return [FRESH for _ in keys]
        self._expire(self.clock.seconds())
        # Newest first: a retry usually follows its original closely.
        sets = [ids for _, ids in reversed(self._ring)]
        pending = self._pending
        states = []
        append = states.append
        earlier = set()
        for key in keys:
            if key in earlier:
                append(SEEN)
                continue
            earlier.add(key)
            if key in pending:
                append(PENDING)
                continue
            for ids in sets:
                if key in ids:
                    append(SEEN)
                    break
            else:
                append(FRESH)
        return states

    def reserve(self, keys: Iterable[int]) -> None:
        """
        Hold C{keys} (all L{FRESH}) while their admission is pending, so a
        duplicate arriving meanwhile is not taken as new.
        """
        if not self.enabled:
            return
        pending = self._pending
        for key in keys:
            pending[key] = pending.get(key, 0) + 1

    def release(self, keys: Iterable[int]) -> None:
        """
        Their admission was refused: forget the reservation, so that the
        client's retry is stored.
        """
        if not self.enabled:
            return
        pending = self._pending
        for key in keys:
            count = pending.get(key, 0) - 1
            if count > 0:
                pending[key] = count
            else:
                pending.pop(key, None)

    def commit(self, keys: Iterable[int]) -> None:
        """
        Their admission succeeded: remember them for the window.
        """
        if not self.enabled:
            return
        self.release(keys)
        self.add(keys)

    def add(self, keys: Iterable[int]) -> None:
        """
        Remember C{keys} as admitted now.
        """
        if not self.enabled:
            return
        now = self.clock.seconds()
        self._expire(now)
        ring = self._ring
        keys = list(keys)
        per_generation = self._per_generation
        start = 0
        while start < len(keys):
            if not ring or ring[-1][0] + self._span <= now or \
                    len(ring[-1][1]) >= per_generation:
                self._start_generation(now)
            ids = ring[-1][1]
            before = len(ids)
            chunk = keys[start:start + per_generation - before]
            ids.update(chunk)
            self._held += len(ids) - before
            start += len(chunk)

    def _start_generation(self, now: float) -> None:
        ring = self._ring
        if len(ring) >= self.generations:
            _, ids = ring.popleft()
            self._held -= len(ids)
            # Retired by count, not by age: these ids were still in their
            # window.
            if ids:
                self.on_evicted_early(len(ids))
        ring.append((now, set()))

    @property
    def oldest_age(self) -> float:
        """
        Seconds since the oldest generation held began: how far back
        retries are recognised now (the window, or less under a burst).
        """
        if not self._ring:
            return 0.0
        return max(0.0, self.clock.seconds() - self._ring[0][0])


@attr.s(slots=True, frozen=True)
class Retries:
    """
    What the window says of one request's messages.

    @ivar pending: one of them is being admitted for an earlier request:
        answer 503, retry later.
    @ivar seen: indices of the messages to acknowledge without storing.
    @ivar fresh: keys to L{DedupWindow.reserve} now, then to
        L{DedupWindow.commit} once admitted or L{DedupWindow.release} if
        refused.
    """

    pending: bool = attr.ib(default=False)
    seen: frozenset = attr.ib(default=frozenset())
    fresh: list = attr.ib(factory=list)


_NONE = Retries()


def find_retries(window: DedupWindow | None, namespace: str, message_ids: list) -> Retries:
    """
    The L{Retries} among C{message_ids} (one per message, C{None} or a
    non-string where it has none: a message without an id of its own is
    never a retry).
    """
    if window is None or not window.enabled:
        return _NONE
    own = [(i, m) for i, m in enumerate(message_ids) if type(m) is str and m]
    if not own:
        return _NONE
    keys = [id_key(namespace, m) for _, m in own]
    states = window.check(keys)
    if PENDING in states:
        return Retries(pending=True)
    return Retries(
        seen=frozenset(own[j][0] for j, state in enumerate(states) if state == SEEN),
        fresh=[keys[j] for j, state in enumerate(states) if state == FRESH],
    )
