# -*- test-case-name: estat.test.test_e2e_saturation -*-
"""
End-to-end: a burst of batch requests bigger than C{CHANNEL_SIZE} against
the real C{twistd estat} (local directory store, ACK_MODE=memory).  With
C{QUEUE_MAX_WAIT} the requests that find the queue full wait for the
batcher and are all answered 202; every accepted event is stored once.
"""

from __future__ import annotations

import json
import socket

from twisted.trial.unittest import TestCase

from estat.test.harness import LOOPBACK, EstatProcesses, stored_events_local, temp_dir

#: One request holds the whole queue; one batch is one request's events and
#: one batch at a time is stored: the burst must wait for the batcher.
TIGHT = {"CHANNEL_SIZE": "100", "BATCH_SIZE": "100", "MAX_PENDING_BATCHES": "1",
         "FLUSH_INTERVAL": "60s"}
REQUESTS = 30
EVENTS_PER_REQUEST = 100


def burst(port: int, requests: int) -> list:
    """
    Send C{requests} POSTs of 100 events each on as many connections, all
    of them before reading any answer, so they arrive together; return
    each answer's status line.
    """
    sockets = []
    try:
        for r in range(requests):
            body = json.dumps([{"id": f"{r}-{n}"} for n in range(EVENTS_PER_REQUEST)]).encode()
            s = socket.create_connection((LOOPBACK, port), timeout=30)
            sockets.append(s)
            s.sendall(b"POST /collect HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        statuses = []
        for s in sockets:
            answer = b""
            while b"\r\n" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            statuses.append(answer.split(b"\r\n", 1)[0])
        return statuses
    finally:
        for s in sockets:
            s.close()


class BurstTests(TestCase):
    def run_burst(self, env: dict) -> tuple:
        processes = EstatProcesses(temp_dir(self))
        self.addCleanup(processes.stop_all)
        estat = processes.start({**TIGHT, **env})
        statuses = burst(estat.port, REQUESTS)
        metrics = estat.metrics()
        estat.terminate()
        self.assertEqual(estat.wait(30), 0)
        stored = [e["id"] for e in stored_events_local(estat.store_dir)]
        return statuses, metrics, stored

    def test_a_burst_bigger_than_the_queue_is_accepted(self) -> None:
        """
        30 requests of 100 events against a queue of 100: every one is
        answered 202 once the batcher has taken the events before it, none
        503, and all 3,000 events are stored once.
        """
        statuses, metrics, stored = self.run_burst(
            {"QUEUE_MAX_WAIT": "10s", "QUEUE_MAX_WAITING_EVENTS": "5000"})
        self.assertEqual(statuses, [b"HTTP/1.1 202 Accepted"] * REQUESTS)
        self.assertGreater(metrics.get('event_queue_waits_total{outcome="admitted"}', 0), 0)
        self.assertEqual(metrics.get('event_queue_waits_total{outcome="timed_out"}', 0), 0)
        self.assertEqual(metrics.get("http_requests_rejected_queue_full_total", 0), 0)
        self.assertEqual(metrics["events_accepted_total"], REQUESTS * EVENTS_PER_REQUEST)
        self.assertEqual(sorted(stored), sorted(f"{r}-{n}" for r in range(REQUESTS)
                                                for n in range(EVENTS_PER_REQUEST)))

    def test_without_a_wait_the_same_burst_is_refused_in_part(self) -> None:
        """
        C{QUEUE_MAX_WAIT=0}, the behaviour before waiting: the same burst
        gets 503s, and what was accepted is exactly what is stored.
        """
        statuses, metrics, stored = self.run_burst({"QUEUE_MAX_WAIT": "0"})
        refused = statuses.count(b"HTTP/1.1 503 Service Unavailable")
        self.assertGreater(refused, 0)
        self.assertEqual(statuses.count(b"HTTP/1.1 202 Accepted") + refused, REQUESTS)
        self.assertEqual(metrics["http_requests_rejected_queue_full_total"], refused)
        self.assertEqual(len(stored), metrics["events_accepted_total"])
        self.assertEqual(len(set(stored)), len(stored))
