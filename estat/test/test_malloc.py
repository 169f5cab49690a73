# -*- test-case-name: estat.test.test_malloc -*-
"""
Tests for L{estat.malloc}.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from estat.malloc import M_ARENA_MAX, _glibc_mallopt, one_arena

#: In a fresh interpreter: optionally one_arena, then four threads that
#: allocate and free batch-sized buffers and small objects at once; print
#: the arenas glibc's malloc_info reports.
ARENAS = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from estat.malloc import one_arena
    if sys.argv[1] == "one":
        assert one_arena({})
    def work():
        for _ in range(50):
            big = [bytes(2 << 20) for _ in range(3)]
            small = [bytes(400) for _ in range(5000)]
            del big, small
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    with tempfile.NamedTemporaryFile() as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        print(open(f.name).read().count("<heap nr="))
""")


def fake_mallopt(calls: list, answer: int = 1):
    """
    A C{find} for L{one_arena} whose mallopt records its calls in C{calls}
    and returns C{answer}.
    """
    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return answer
    return lambda: mallopt


class OneArenaTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_sets_one_arena(self):
        """
        Without C{MALLOC_ARENA_MAX} in the environment, mallopt is asked for
        one arena.
        """
        calls = []
        self.assertTrue(one_arena({}, fake_mallopt(calls)))
        self.assertEqual(calls, [(M_ARENA_MAX, 1)])

    def test_environment_wins(self):
        """
        C{MALLOC_ARENA_MAX} is glibc's own setting: with it set, mallopt is
        not called, and a log line says whose choice it is.
        """
        calls = []
        self.assertFalse(one_arena({"MALLOC_ARENA_MAX": "4"},
                                   fake_mallopt(calls)))
        self.assertEqual(calls, [])
        self.assertIn("MALLOC_ARENA_MAX=4", formatEvent(self.events[-1]))

    def test_not_glibc(self):
        """
        Where the C library is not glibc, nothing is done and nothing fails.
        """
        self.assertFalse(one_arena({}, lambda: None))

    def test_mallopt_refuses(self):
        """
        A mallopt that refuses (returns 0) leaves glibc's default, with a
        warning.
        """
        calls = []
        self.assertFalse(one_arena({}, fake_mallopt(calls, answer=0)))
        self.assertEqual(calls, [(M_ARENA_MAX, 1)])
        [event] = [e for e in self.events if e.get("log_level") is not None
                   and e["log_level"].name == "warn"]
        self.assertIn("failed", event["log_format"])

    def test_finds_glibc(self):
        """
        On this (glibc) machine the real mallopt is found.
        """
        self.assertIsNotNone(_glibc_mallopt())


class RealArenaTests(SynchronousTestCase):
    def arenas(self, mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip())

    def test_threads_share_one_arena(self):
        """
        In a real process, after one_arena, four allocating threads leave
        glibc with one arena; without it, with more.
        """
        self.assertEqual(self.arenas("one"), 1)
        self.assertGreater(self.arenas("default"), 1)
