# -*- test-case-name: estat.test.test_tap -*-
"""
Tests for what L{estat.tap} adds to the wiring: the worker threads'
priority (C{WORKER_NICE}).
"""

from __future__ import annotations

import os
import threading

from twisted.trial.unittest import SynchronousTestCase

from estat.tap import _niced


class WorkerNiceTests(SynchronousTestCase):
    def test_worker_thread_runs_at_the_given_niceness(self):
        """
        Work run through C{_niced} runs in a thread whose niceness is the
        setting's; the calling thread's is untouched.
        """
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen = []

        def work(x):
            seen.append((x, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            return x * 2

        results = []
        thread = threading.Thread(target=lambda: results.append(_niced(max(before, 7), work, 21)))
        thread.start()
        thread.join(10)
        self.assertEqual(results, [42])
        self.assertEqual(seen, [(21, max(before, 7))])
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), before)
