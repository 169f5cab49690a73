# -*- test-case-name: estat.test.test_e2e_process -*-
"""
End-to-end tests of the real C{twistd estat} process on the local
directory store: concurrent keep-alive clients and a SIGTERM mid-stream,
the command line, readiness during shutdown, and the metrics page.

Everything talks to 127.0.0.1; every process is ended by its PID; every
wait is bounded.
"""

from __future__ import annotations

import collections
import datetime
import http.client
import json
import os
import socket
import subprocess
import threading

import pytest

from estat.config import SETTINGS
from estat.metrics import SEED_METRIC_NAMES
from estat.test.harness import (
    LOOPBACK,
    TWISTD,
    EstatProcess,
    EstatProcesses,
    stored_events_local,
    stored_objects_local,
    wait_until,
)

pytestmark = pytest.mark.e2e

USER_AGENT = "estat-e2e/1"


@pytest.fixture
def start_estat(tmp_path):
    """
    C{start_estat(env) -> EstatProcess}, ready; every process started is
    ended after the test.
    """
    processes = EstatProcesses(str(tmp_path))
    yield processes.start
    processes.stop_all()


def assert_server_fields(event: dict) -> None:
    server = event["_estat"]
    assert server["ip"] == LOOPBACK, server
    assert server["user_agent"] == USER_AGENT, server
    received = datetime.datetime.strptime(
        server["received_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    age = datetime.datetime.now(datetime.timezone.utc) - received
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10), server


class Client(threading.Thread):
    """
    Posts its events one after another on one keep-alive connection.

    @ivar accepted: ids answered 202.
    @ivar refused: ids answered 503 (not accepted).
    @ivar unknown: ids whose request failed without an answer: the server
        may or may not have taken them.
    @ivar unexpected: other answers, and failures before shutdown began.
    """

    def __init__(self, estat: EstatProcess, events: list, shutdown_begun: threading.Event,
                 progress) -> None:
        super().__init__(daemon=True)
        self.estat = estat
        self.events = events
        self.shutdown_begun = shutdown_begun
        self.progress = progress
        self.accepted: list = []
        self.refused: list = []
        self.unknown: list = []
        self.unexpected: list = []

    def run(self) -> None:
        conn = self.estat.connection(timeout=10)
        try:
            for event in self.events:
                body = json_bytes(event)
                try:
                    conn.request("POST", "/collect", body=body, headers={
                        "Content-Type": "application/json", "User-Agent": USER_AGENT})
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as e:
                    self.unknown.append(event["id"])
                    if not self.shutdown_begun.is_set():
                        self.unexpected.append((event["id"], repr(e)))
                    # The listener is closed or closing: this client is done.
                    return
                if response.status == 202:
                    self.accepted.append(event["id"])
                    self.progress()
                elif response.status == 503 and self.shutdown_begun.is_set():
                    self.refused.append(event["id"])
                else:
                    self.unexpected.append((event["id"], response.status))
        finally:
            conn.close()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def make_event(client: int, n: int) -> dict:
    return {"id": f"c{client}-{n}", "client": client, "n": n, "kind": "click",
            "props": {"page": f"/p/{n % 17}", "tags": ["a", "b"], "x": n / 7}}


def test_sigterm_mid_stream_loses_and_duplicates_nothing(start_estat):
    """
    Eight keep-alive clients post distinct events; SIGTERM arrives while
    they are posting.  The process exits 0 and every event answered 202 is
    stored exactly once, with its server fields; nothing is stored that
    was not sent, or that was refused.
    """
    estat = start_estat({"BATCH_SIZE": "200", "FLUSH_INTERVAL": "1s",
                         "SHUTDOWN_TIMEOUT": "20s"})
    clients_count, per_client = 8, 600
    sent = {}
    for c in range(clients_count):
        for n in range(per_client):
            event = make_event(c, n)
            sent[event["id"]] = event

    shutdown_begun = threading.Event()
    lock = threading.Lock()
    accepted_so_far = [0]

    def progress() -> None:
        with lock:
            accepted_so_far[0] += 1

    clients = [
        Client(estat, [sent[f"c{c}-{n}"] for n in range(per_client)], shutdown_begun, progress)
        for c in range(clients_count)
    ]
    for client in clients:
        client.start()

    wait_until(lambda: accepted_so_far[0] >= 1500, 60, 0.01,
               lambda: f"1500 events accepted (have {accepted_so_far[0]}); "
                       f"log:\n{estat.log_tail()}")
    still_posting = sum(client.is_alive() for client in clients)
    shutdown_begun.set()
    estat.terminate()
    for client in clients:
        client.join(30)
        assert not client.is_alive(), "a client is stuck"
    exit_code = estat.wait(30)
    log = estat.log()

    assert still_posting == clients_count, "SIGTERM came after the clients were done"
    assert "shutdown complete" in log, log[-4000:]

    accepted = [i for c in clients for i in c.accepted]
    refused = {i for c in clients for i in c.refused}
    unknown = {i for c in clients for i in c.unknown}
    unexpected = [u for c in clients for u in c.unexpected]
    assert not unexpected, unexpected[:10]
    assert len(accepted) == len(set(accepted))
    assert len(accepted) < len(sent), "the SIGTERM came too late to be mid-stream"

    stored = stored_events_local(estat.store_dir)
    stored_ids = [e["id"] for e in stored]
    duplicates = [i for i, k in collections.Counter(stored_ids).items() if k > 1]
    assert not duplicates, f"{len(duplicates)} events stored twice: {duplicates[:10]}"
    assert set(stored_ids) - set(sent) == set(), "stored an event that was never sent"
    lost = set(accepted) - set(stored_ids)
    assert not lost, f"{len(lost)} accepted events lost: {sorted(lost)[:10]}"
    # Only an event whose answer never came may be stored without a 202.
    assert set(stored_ids) - set(accepted) <= unknown
    assert not set(stored_ids) & refused

    for event in stored:
        server_less = {k: v for k, v in event.items() if k != "_estat"}
        assert server_less == sent[event["id"]]
        assert_server_fields(event)

    # No batch larger than BATCH_SIZE, and nothing left in the DLQ.
    for key, events in stored_objects_local(estat.store_dir).items():
        assert 1 <= len(events) <= 200, key
    dlq = [n for n in os.listdir(estat.dlq_dir) if n.endswith(".dlq")]
    assert dlq == []
    # Last, so that everything above is checked whatever the exit status.
    assert exit_code == 0, f"exit status {exit_code} after a clean shutdown"


def read_answer(reader) -> tuple[int, bytes]:
    """
    One HTTP/1.1 answer (with a Content-Length) from C{reader}.
    """
    status = int(reader.readline().split()[1])
    length = 0
    for line in iter(reader.readline, b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, reader.read(length)


ESTAT_REACTOR = "reactor class: estat.http.reactor.EstatEPollReactor"
REACTOR_NOTE = "twistd --reactor=estat dispatches HTTP reads faster"


@pytest.mark.parametrize("options, reactor_line, noted", [
    (("--reactor=estat",), ESTAT_REACTOR, False),
    ((), "reactor class: twisted.internet.epollreactor.EPollReactor", True),
])
def test_both_reactors_store_every_event_once(start_estat, options, reactor_line, noted):
    """
    C{twistd --reactor=estat estat} (README's commands, the image) and
    plain C{twistd estat}: the same answers and the same stored events;
    the second says once that the first is faster.
    """
    estat = start_estat({"BATCH_SIZE": "1000", "FLUSH_INTERVAL": "60s"},
                        twistd_options=options)
    sent = []
    with socket.create_connection((LOOPBACK, estat.port), timeout=10) as s:
        # Keep-alive requests, some in one write (each read is one
        # dispatch of the reactor), and a bad one among them.
        reader = s.makefile("rb")
        for n in range(0, 60, 3):
            batch = b""
            for k in range(n, n + 3):
                body = json_bytes(make_event(0, k))
                sent.append(k)
                batch += (b"POST /collect HTTP/1.1\r\nHost: e\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            s.sendall(batch)
            for _ in range(3):
                status, answer = read_answer(reader)
                assert status == 202, answer
    status, body = estat.post(b"{not json")
    assert status == 400 and json.loads(body)["error"]
    estat.terminate()
    assert estat.wait(30) == 0, estat.log_tail()
    log = estat.log()
    assert reactor_line in log
    assert log.count(REACTOR_NOTE) == (1 if noted else 0), estat.log_tail()
    stored = stored_events_local(estat.store_dir)
    assert sorted(e["n"] for e in stored) == sent


def thread_heaps(pid: int) -> int:
    """
    The glibc arenas of threads in process C{pid}: each is a 64 MiB
    mapping, aligned to 64 MiB, of an C{rw-p} part and a C{---p} rest.
    """
    size = 64 << 20
    regions = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            regions.append((start, end, perms))
    heaps = 0
    for (start, end, perms), (start2, end2, perms2) in zip(regions, regions[1:]):
        if (start % size == 0 and perms == "rw-p" and perms2 == "---p" and end == start2
                and end2 - start == size):
            heaps += 1
    return heaps


@pytest.mark.parametrize("env, heaps", [({}, 0), ({"MALLOC_ARENA_MAX": "8"}, None)])
def test_one_malloc_arena(start_estat, env, heaps):
    """
    The real server runs on one glibc arena (estat.malloc): after its
    worker threads have encoded and stored batches, no thread has an arena
    of its own.  With C{MALLOC_ARENA_MAX} set, glibc's setting is left as
    it is, and the worker threads get theirs.
    """
    estat = start_estat({"BATCH_SIZE": "50", "FLUSH_INTERVAL": "60s", **env})
    for n in range(400):
        status, answer = estat.post(json_bytes(make_event(0, n)))
        assert status == 202, answer
    wait_until(lambda: len(stored_events_local(estat.store_dir)) == 400, 30, 0.1,
               "400 events stored")
    if heaps is None:
        assert thread_heaps(estat.pid) > 0
        assert "MALLOC_ARENA_MAX=8 from the environment" in estat.log()
    else:
        assert thread_heaps(estat.pid) == heaps
        assert "malloc arenas: one for the process" in estat.log()
    estat.terminate()
    assert estat.wait(30) == 0, estat.log_tail()


def test_help_lists_every_setting(tmp_path):
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "estat", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    missing = [s.option for s in SETTINGS if f"--{s.option}=" not in result.stdout]
    assert not missing, result.stdout
    missing_env = [s.env for s in SETTINGS if f"${s.env}" not in result.stdout]
    assert not missing_env, result.stdout


def test_bad_setting_is_one_line_and_a_failing_exit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"BATCH_SIZE": "abc", "HTTP_ADDR": f"{LOOPBACK}:0",
                "DLQ_DIR": str(tmp_path / "dlq")})
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "estat"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "BATCH_SIZE" in lines[0] and "'abc'" in lines[0], lines[0]


def test_readyz_is_503_during_shutdown(start_estat):
    """
    A request that has begun when SIGTERM arrives is answered, and
    C{/readyz} says 503 with C{Connection: close}.
    """
    estat = start_estat({"SHUTDOWN_TIMEOUT": "20s"})
    with socket.create_connection((LOOPBACK, estat.port), timeout=10) as s:
        # The request line makes the connection busy (a request has begun),
        # so the shutdown waits for its answer instead of closing it.
        s.sendall(b"GET /readyz HTTP/1.1\r\n")
        # One full request on another connection: by the time it is
        # answered the server has read the line above.
        assert estat.get("/healthz")[0] == 200
        estat.terminate()
        estat.wait_log("shutting down")
        s.sendall(b"Host: estat\r\n\r\n")
        response = http.client.HTTPResponse(s)
        response.begin()
        body = response.read()
    assert response.status == 503, body
    assert response.getheader("Connection", "").lower() == "close"
    assert b"shutting down" in body
    with pytest.raises(OSError):
        estat.get("/readyz", timeout=2)
    assert estat.wait(30) == 0


def test_metrics_expose_the_seed_names_with_true_counts(start_estat):
    estat = start_estat({"BATCH_SIZE": "50", "FLUSH_INTERVAL": "1s"})
    before = estat.metrics()
    for name in SEED_METRIC_NAMES:
        assert name in before, name
        assert before[name] == 0, (name, before[name])

    conn = estat.connection()
    statuses = collections.Counter()
    try:
        for n in range(120):
            conn.request("POST", "/collect", body=json_bytes({"id": n}),
                         headers={"User-Agent": USER_AGENT})
            response = conn.getresponse()
            response.read()
            statuses[response.status] += 1
        for body in (b"not json", b"[1, 2]", b'{"_estat": 1}'):
            conn.request("POST", "/collect", body=body)
            response = conn.getresponse()
            response.read()
            statuses[response.status] += 1
    finally:
        conn.close()
    assert statuses == {202: 120, 400: 3}

    after = wait_until(
        lambda: (lambda m: m if m["s3_events_stored_total"] >= 120 else None)(estat.metrics()),
        20, 0.1, lambda: f"120 events stored: {estat.log_tail()}")
    assert after["http_requests_total"] == 123
    assert after["http_requests_accepted_total"] == 120
    assert after["http_requests_rejected_queue_full_total"] == 0
    assert after["s3_events_stored_total"] == 120
    assert after["s3_put_errors_total"] == 0
    assert after["dlq_events_enqueued_total"] == 0
    assert after["dlq_events_dropped_total"] == 0
    assert after["dlq_files_current"] == 0

    stored = stored_events_local(estat.store_dir)
    assert sorted(e["id"] for e in stored) == list(range(120))

    status, page = estat.get("/metrics")
    text = page.decode("utf-8")
    for name in SEED_METRIC_NAMES:
        kind = "gauge" if name == "dlq_files_current" else "counter"
        assert f"# TYPE {name} {kind}" in text, name

    estat.terminate()
    assert estat.wait(30) == 0
