# -*- test-case-name: estat.test.test_malloc -*-
"""
One glibc malloc arena per process.

glibc gives each thread that allocates its own arena (up to eight per
CPU).  Estat's worker threads (gzip, signing, disk I/O) allocate the
megabytes of a batch's text and its compressed object; freed, those
megabytes stay in the thread's arena, and each arena keeps its own.  In
C{make bench}'s batch-s3 scenario (uploads slower than ingest, every
pending batch slot full) the process grew from 93 to 107 MB over 90
seconds; with one arena it stayed at 90-93 MB, for the same CPU per event
(C{bench/RESULTS.md}, section "Memory").  Nearly every
allocation happens under the GIL, so the threads gain nothing from
arenas of their own.

C{MALLOC_ARENA_MAX} in the environment is glibc's own setting: when it is
set, Estat leaves the choice to it.  Where the C library is not glibc,
nothing is done.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Mapping

from twisted.logger import Logger

__all__ = ["one_arena"]

#: mallopt's parameter number for the arena limit (malloc.h).
M_ARENA_MAX = -8

log = Logger()


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that ignores this
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def one_arena(environ: Mapping[str, str],
              find: Callable[[], Callable[[int, int], int] | None] = _glibc_mallopt) -> bool:
    """
    Limit glibc to one malloc arena, before any worker thread starts.

    @param environ: the process environment; C{MALLOC_ARENA_MAX} there wins.
    @param find: returns C{mallopt(param, value) -> int}, or C{None} when
        the C library is not glibc.
    @return: whether the limit was set.
    """
    if "MALLOC_ARENA_MAX" in environ:
        log.info("malloc arenas: MALLOC_ARENA_MAX={value} from the environment",
                 value=environ["MALLOC_ARENA_MAX"])
        return False
    mallopt = find()
    if mallopt is None:
        return False
    if mallopt(M_ARENA_MAX, 1) != 1:
        log.warn("malloc arenas: mallopt(M_ARENA_MAX, 1) failed; glibc's default stays")
        return False
    log.info("malloc arenas: one for the process (MALLOC_ARENA_MAX unset)")
    return True
