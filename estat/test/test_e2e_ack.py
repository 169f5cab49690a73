# -*- test-case-name: estat.test.test_e2e_ack -*-
"""
The acknowledgement modes against the real C{twistd estat}: in
C{ACK_MODE=stored} a SIGTERM answers the requests waiting for the store
before their connections close; in C{ACK_MODE=disk} a second process on
one C{WAL_DIR} stops at start-up with one clear line, and a SIGKILLed
process's acknowledged events are uploaded by the next one.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
from twisted.trial.unittest import TestCase

from estat.test.harness import (
    EstatProcess, EstatProcesses, stored_events_local, temp_dir, wait_until,
)

pytestmark = pytest.mark.e2e


def _mkdir(base: str, name: str) -> str:
    path = os.path.join(base, name)
    os.mkdir(path)
    return path


class StoredModeTests(TestCase):
    def test_sigterm_answers_waiting_requests(self) -> None:
        processes = EstatProcesses(temp_dir(self))
        self.addCleanup(processes.stop_all)
        # A long FLUSH_INTERVAL: the requests are still waiting at SIGTERM.
        estat = processes.start({"ACK_MODE": "stored", "FLUSH_INTERVAL": "60s"})
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(estat.post, {"id": f"w-{i}"}, timeout=20) for i in range(3)]
            wait_until(lambda: estat.metric("ack_requests_waiting") == 3, 10,
                       message="three requests waiting")
            time.sleep(0.2)
            self.assertFalse(any(a.done() for a in answers))
            estat.terminate()
            results = [a.result(20) for a in answers]
        self.assertEqual([status for status, _ in results], [202, 202, 202])
        self.assertEqual(estat.wait(30), 0)
        ids = sorted(e["id"] for e in stored_events_local(estat.store_dir))
        self.assertEqual(ids, ["w-0", "w-1", "w-2"])


class DiskModeTests(TestCase):
    def test_second_process_on_one_wal_dir(self) -> None:
        base = temp_dir(self)
        wal = os.path.join(base, "wal")
        first = EstatProcess({"ACK_MODE": "disk", "WAL_DIR": wal}, directory=_mkdir(base, "a"))
        self.addCleanup(first.cleanup)
        first.wait_ready()
        second = EstatProcess({"ACK_MODE": "disk", "WAL_DIR": wal},
                              directory=_mkdir(base, "b"))
        self.addCleanup(second.cleanup)
        self.assertEqual(second.wait(30), 2)
        self.assertIn(f"WAL_DIR {wal} is in use by another Estat process (pid {first.pid})",
                      second.log())
        self.assertNotIn("Traceback", second.log())

    def test_sigkill_then_restart_uploads_acknowledged_events(self) -> None:
        base = temp_dir(self)
        env = {"ACK_MODE": "disk", "WAL_DIR": os.path.join(base, "wal"),
               "DLQ_DIR": os.path.join(base, "dlq"),
               "LOCAL_STORE_DIR": os.path.join(base, "store"), "FLUSH_INTERVAL": "60s"}
        first = EstatProcess(env, directory=_mkdir(base, "a"))
        self.addCleanup(first.cleanup)
        first.wait_ready()
        for i in range(5):
            self.assertEqual(first.post([{"id": f"k-{i}-{j}"} for j in range(3)])[0], 202)
        first.kill()
        first.wait(10)
        self.assertEqual(stored_events_local(env["LOCAL_STORE_DIR"]), [])
        second = EstatProcess(env, directory=_mkdir(base, "b"))
        self.addCleanup(second.cleanup)
        second.wait_ready()
        self.assertEqual(second.metric("wal_events_replayed_total"), 15)
        second.terminate()
        self.assertEqual(second.wait(30), 0)
        ids = sorted(e["id"] for e in stored_events_local(env["LOCAL_STORE_DIR"]))
        self.assertEqual(ids, sorted(f"k-{i}-{j}" for i in range(5) for j in range(3)))
