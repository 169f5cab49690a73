# -*- test-case-name: estat.test.test_e2e_supervisor -*-
"""
C{WORKERS=N} with the real C{twistd estat}: a supervisor and its worker
processes on one port, under load, with C{SIGTERM}, C{SIGKILL} of a worker
and of the supervisor, a crash loop, C{WORKERS=auto} under a restricted
CPU affinity, one C{/metrics} over every worker, and one dead-letter
directory drained by two workers into the moto S3 server.
"""

from __future__ import annotations

import collections
import http.client
import os
import shutil
import signal
import threading
import time
import uuid

import pytest

from estat.test.harness import (
    LOOPBACK,
    EstatProcess,
    MotoServer,
    parse_metrics,
    stored_objects_local,
    wait_until,
)

pytestmark = pytest.mark.e2e

SHUTDOWN_TIMEOUT = "8s"


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Processes:
    """
    Every supervisor started by a test and every worker seen, all ended
    (by PID) at teardown.
    """

    def __init__(self, base) -> None:
        self.base = str(base)
        self.started: list = []
        self.workers: set = set()

    def start(self, env: dict, ready: bool = True, name: str | None = None) -> EstatProcess:
        directory = os.path.join(self.base, name or f"estat-{len(self.started)}")
        os.mkdir(directory)
        estat = EstatProcess({"SHUTDOWN_TIMEOUT": SHUTDOWN_TIMEOUT, "FLUSH_INTERVAL": "1s",
                              **env}, directory=directory)
        self.started.append(estat)
        if ready:
            estat.wait_ready()
        return estat

    def workers_of(self, estat: EstatProcess, count: int, timeout: float = 30.0) -> list:
        def found():
            pids = children(estat.pid)
            return pids if len(pids) == count else None

        pids = wait_until(found, timeout, 0.05, lambda: f"{count} workers: {estat.log_tail()}")
        self.workers.update(pids)
        return pids

    def stop_all(self) -> None:
        for estat in self.started:
            self.workers.update(children(estat.pid))
            estat.stop()
        for pid in self.workers:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def processes(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


class Load:
    """
    Client threads posting one event per request, a new connection every
    few requests; every id answered 202 is remembered.
    """

    def __init__(self, port: int, threads: int = 4, per_connection: int = 5) -> None:
        self.port = port
        self.acknowledged: list = []
        self.statuses = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(per_connection,), daemon=True)
                         for _ in range(threads)]
        self.connections = 0

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, per_connection: int) -> None:
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
                with self._lock:
                    self.connections += 1
                for _ in range(per_connection):
                    if self._stop.is_set():
                        break
                    event_id = uuid.uuid4().hex
                    conn.request("POST", "/collect",
                                 body=f'{{"event":"e2e","id":"{event_id}"}}'.encode(),
                                 headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    with self._lock:
                        self.statuses[response.status] += 1
                        if response.status == 202:
                            self.acknowledged.append(event_id)
                    if response.getheader("connection", "").lower() == "close":
                        break
                conn.close()
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.statuses["error"] += 1
                time.sleep(0.01)


def stored_ids(estat: EstatProcess) -> tuple[collections.Counter, list]:
    objects = stored_objects_local(estat.store_dir)
    ids = collections.Counter(e.get("id") for events in objects.values() for e in events)
    return ids, sorted(objects)


def assert_each_stored_once(load: Load, estat: EstatProcess) -> list:
    ids, keys = stored_ids(estat)
    lost = [i for i in load.acknowledged if ids[i] == 0]
    twice = [i for i, n in ids.items() if n > 1]
    assert load.acknowledged, f"nothing acknowledged: {load.statuses}"
    assert lost == [], f"{len(lost)} of {len(load.acknowledged)} acknowledged events lost"
    assert twice == [], f"{len(twice)} events stored more than once"
    return keys


def wait_gone(pids, timeout: float) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), timeout, 0.05,
               lambda: f"workers still running: {[p for p in pids if alive(p)]}")


def test_two_workers_share_the_port_and_drain_on_sigterm_under_load(processes):
    """
    WORKERS=2: two workers, both serving the one port; SIGTERM while
    clients post: exit 0, every acknowledged event stored exactly once, by
    both workers, and no worker left.
    """
    estat = processes.start({"WORKERS": "2"})
    workers = processes.workers_of(estat, 2)
    load = Load(estat.port, threads=4).start()
    wait_until(lambda: len(load.acknowledged) > 1500, 60, 0.05,
               lambda: f"load: {load.statuses}")
    estat.terminate()
    code = estat.wait(40)
    load.stop()
    assert code == 0, estat.log_tail()
    wait_gone(workers, 5)
    keys = assert_each_stored_once(load, estat)
    assert any("-w0-" in k for k in keys) and any("-w1-" in k for k in keys), keys
    assert "supervisor: every worker stopped; status 0" in estat.log()
    assert load.connections > 40


def test_a_killed_worker_is_restarted_and_replays_its_log(processes):
    """
    ACK_MODE=disk: SIGKILL one worker under load; it is restarted in its
    slot and replays WAL_DIR/worker-<slot>; every 202 is stored once.
    """
    estat = processes.start({"WORKERS": "2", "ACK_MODE": "disk",
                             "WAL_DIR": os.path.join(processes.base, "wal")})
    workers = processes.workers_of(estat, 2)
    load = Load(estat.port, threads=4).start()
    wait_until(lambda: len(load.acknowledged) > 500, 60, 0.05, lambda: f"{load.statuses}")
    os.kill(workers[0], signal.SIGKILL)
    estat.wait_log("restarting it", timeout=10)
    new = processes.workers_of(estat, 2)
    assert workers[0] not in new and workers[1] in new
    count = len(load.acknowledged)
    wait_until(lambda: len(load.acknowledged) > count + 500, 60, 0.05,
               lambda: f"{load.statuses}")
    load.stop()
    estat.terminate()
    assert estat.wait(40) == 0, estat.log_tail()
    assert sorted(os.listdir(os.path.join(processes.base, "wal"))) == ["worker-0", "worker-1"]
    assert_each_stored_once(load, estat)


def test_sigkill_of_the_supervisor_leaves_no_worker(processes):
    """
    The workers of a supervisor killed with SIGKILL drain what they
    acknowledged and exit.
    """
    estat = processes.start({"WORKERS": "2", "ACK_MODE": "disk",
                             "WAL_DIR": os.path.join(processes.base, "wal")})
    workers = processes.workers_of(estat, 2)
    load = Load(estat.port, threads=2).start()
    wait_until(lambda: len(load.acknowledged) > 300, 60, 0.05, lambda: f"{load.statuses}")
    estat.kill()
    estat.wait(10)
    wait_gone(workers, 20)
    load.stop()
    assert_each_stored_once(load, estat)


def test_crash_loop_stops_the_supervisor_with_status_1(processes):
    """
    Workers that cannot start (WAL_DIR is a file): restarted with backoff,
    then the supervisor gives up with status 1.
    """
    wal = os.path.join(processes.base, "not-a-directory")
    with open(wal, "w") as f:
        f.write("x")
    estat = processes.start({"WORKERS": "2", "ACK_MODE": "disk", "WAL_DIR": wal}, ready=False)
    code = estat.wait(40)
    log = estat.log()
    assert code == 1, estat.log_tail()
    assert "a crash loop; stopping" in log
    assert log.count("restarting it") >= 3


def start_with_affinity(processes, cpus: set, env: dict) -> EstatProcess:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return processes.start(env, ready=False)
    finally:
        os.sched_setaffinity(0, previous)


def test_auto_on_one_cpu_is_one_process(processes):
    cpus = sorted(os.sched_getaffinity(0))
    estat = start_with_affinity(processes, {cpus[0]}, {"WORKERS": "auto"})
    estat.wait_ready()
    assert children(estat.pid) == []
    assert estat.post({"event": "x"})[0] == 202
    assert "supervisor" not in estat.log()


def test_auto_on_two_cpus_is_two_workers(processes):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    from estat.config import available_cpus

    if available_cpus(set(cpus[:2])) < 2:
        pytest.skip("the cgroup quota here is under 2 CPUs")
    estat = start_with_affinity(processes, set(cpus[:2]), {"WORKERS": "auto"})
    estat.wait_ready()
    processes.workers_of(estat, 2)
    assert "supervisor: starting 2 workers" in estat.log()


def scrape(estat: EstatProcess) -> dict:
    status, body = estat.get("/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def test_one_metrics_page_over_every_worker(processes):
    """
    Whichever worker answers: counters are the sum over the workers (and
    stay so after one is killed), per-worker gauges carry a worker label,
    the shared DLQ's gauges appear once.
    """
    estat = processes.start({"WORKERS": "2"})
    workers = processes.workers_of(estat, 2)
    # Both workers running: each one's gauges are in the page.
    wait_until(lambda: len([k for k in scrape(estat) if k.startswith("http_connections_open")])
               == 2, 20, 0.1, lambda: estat.log_tail())
    sent = 0
    for _ in range(60):
        status, _ = estat.post({"event": "m"})
        assert status == 202
        sent += 1
    wait_until(lambda: scrape(estat).get("http_requests_accepted_total") == sent, 10, 0.1,
               lambda: f"accepted {scrape(estat).get('http_requests_accepted_total')} != {sent}")
    for _ in range(10):
        samples = scrape(estat)
        assert samples["http_requests_accepted_total"] == sent
        assert 'http_connections_open{worker="0"}' in samples
        assert 'http_connections_open{worker="1"}' in samples
        assert len([k for k in samples if k.startswith("http_connections_open")]) == 2
        assert [k for k in samples if k.startswith("dlq_files_current")] == ["dlq_files_current"]
    # Kill one: what it counted stays in the sum, across its restart.
    os.kill(workers[1], signal.SIGKILL)
    estat.wait_log("restarting it", timeout=10)
    processes.workers_of(estat, 2)
    for _ in range(20):
        samples = scrape(estat)
        assert samples["http_requests_accepted_total"] == sent, samples
        assert len([k for k in samples if k.startswith("http_connections_open")]) <= 2
        time.sleep(0.1)
    estat.terminate()
    assert estat.wait(40) == 0, estat.log_tail()


def make_dlq_files(directory: str, count: int) -> dict:
    import base64
    import gzip
    import hashlib

    from prometheus_client import CollectorRegistry
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock

    from estat.dlq import DiskDeadLetterQueue
    from estat.encoder import EncodedObject
    from estat.metrics import Metrics

    clock = Clock()
    clock.advance(time.time())
    queue = DiskDeadLetterQueue(directory=directory, metrics=Metrics(CollectorRegistry()),
                                clock=clock, run_in_thread=lambda f, *a: succeed(f(*a)))
    os.makedirs(directory, exist_ok=True)
    expected = {}
    for n in range(count):
        lines = b"".join(b'{"event":"dlq","n":%d,"i":%d}\n' % (n, i) for i in range(3))
        body = gzip.compress(lines, 6)
        key = f"raw/dt=2026-12-07/hour=00/dlq-e2e-{n:05d}.jsonl.gz"
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        obj = EncodedObject(key=key, body=body, count=3, content_md5=md5)
        queue.put(obj)
        clock.advance(0.001)
        expected[key] = body
    return expected


def test_two_workers_drain_one_dead_letter_directory_into_s3(processes, tmp_path):
    """
    300 dead-letter files in the one DLQ_DIR, two workers, the moto S3
    server: every entry uploaded, each exactly once (the summed
    dlq_events_recovered_total is exactly the files' events).
    """
    moto = MotoServer()
    try:
        dlq = os.path.join(str(tmp_path), "shared-dlq")
        expected = make_dlq_files(dlq, 300)
        estat = processes.start({
            "WORKERS": "2", "DLQ_DIR": dlq, "DLQ_RETRY_INTERVAL": "1s",
            "RAW_BUCKET": moto.bucket, "S3_ENDPOINT_URL": moto.endpoint,
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key,
        })
        processes.workers_of(estat, 2)

        def drained():
            return not [n for n in os.listdir(dlq) if n.endswith(".dlq")]

        wait_until(drained, 60, 0.2, lambda: f"{len(os.listdir(dlq))} entries left")
        wait_until(lambda: scrape(estat).get("dlq_events_recovered_total") == 900, 10, 0.2,
                   lambda: f"recovered {scrape(estat).get('dlq_events_recovered_total')}")
        keys = moto.keys("raw/dt=2026-12-07/hour=00/dlq-e2e-")
        assert sorted(keys) == sorted(expected)
        for key in list(expected)[::30]:
            assert moto.get(key)["body"] == expected[key]
        log = estat.log()
        assert log.count("from the dead-letter queue") == 300
        time.sleep(1.5)
        assert scrape(estat)["dlq_events_recovered_total"] == 900
        assert scrape(estat)["dlq_files_current"] == 0
        estat.terminate()
        assert estat.wait(40) == 0, estat.log_tail()
    finally:
        moto.stop()
