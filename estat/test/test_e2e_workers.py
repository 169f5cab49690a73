# -*- test-case-name: estat.test.test_e2e_workers -*-
"""
C{WORKERS=N} against the real C{twistd estat}: a supervisor binding
C{HTTP_ADDR} once and N worker processes serving it.

  - two workers share one port, and every acknowledged event is stored
    exactly once, under either worker's instance name;
  - SIGTERM under load: exit 0, nothing lost, no worker left;
  - ACK_MODE=disk, one worker SIGKILLed under load: it is restarted in its
    slot and replays its own write-ahead log;
  - SIGKILL of the supervisor: the workers drain and go;
  - WORKERS=auto follows the CPU affinity (1 CPU: one plain process);
  - workers that cannot start: a crash loop, exit 1;
  - one dead-letter directory drained by both workers against moto, each
    entry uploaded once;
  - one /metrics summed over the workers (these tests are written to the
    contract of docs/workers.md: counters summed over live and dead
    workers, per-worker gauges labelled C{worker}, the DLQ gauges once).

Every process started here is ended by its pid, worker children included
(their pids are collected while they run and any still alive at teardown
is killed).
"""

from __future__ import annotations

import collections
import gzip
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time

import pytest

from estat.test.harness import (
    LOOPBACK, EstatProcess, MotoServer, parse_metrics, stored_objects_local, wait_until,
    _http_get,
)

pytestmark = pytest.mark.e2e

SHUTDOWN_TIMEOUT = 8.0
BASE_ENV = {
    "WORKERS": "2",
    "FLUSH_INTERVAL": "1s",
    "SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
}


# --- processes -------------------------------------------------------------


def children(pid: int) -> list:
    """
    The child pids of C{pid} (empty when it is gone).
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def proc_environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    env = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            env[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def running(pid: int) -> bool:
    """
    Whether C{pid} is a process that has not exited (a zombie has).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def is_worker_of(pid: int, estat: EstatProcess) -> bool:
    """
    Whether C{pid} is still a worker of C{estat} (not a reused pid).
    """
    env = proc_environ(pid)
    return ("ESTAT_WORKER_SLOT" in env
            and env.get("HTTP_ADDR") == estat.env["HTTP_ADDR"])


class Tracked:
    """
    One C{EstatProcess} and every worker pid seen under it (a thread polls
    its children), so that teardown can kill whatever is left.
    """

    def __init__(self, estat: EstatProcess) -> None:
        self.estat = estat
        self.seen: dict = {}  # pid -> slot
        self.metrics_dirs: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.workers()
            self._stop.wait(0.1)

    def workers(self) -> dict:
        """
        C{{slot: pid}} of the workers running now (and note them).
        """
        out = {}
        for pid in children(self.estat.pid):
            env = proc_environ(pid)
            if "ESTAT_WORKER_SLOT" not in env:
                continue
            slot = int(env["ESTAT_WORKER_SLOT"])
            out[slot] = pid
            with self._lock:
                self.seen[pid] = slot
                if env.get("ESTAT_METRICS_DIR"):
                    self.metrics_dirs.add(env["ESTAT_METRICS_DIR"])
        return out

    def wait_workers(self, count: int, timeout: float = 20.0) -> dict:
        """
        Wait until C{count} workers run and each has said it listens.
        """
        self.estat.wait_log("listening on", timeout=timeout, count=count)
        return wait_until(lambda: (lambda w: w if len(w) == count else None)(self.workers()),
                          timeout, 0.05, lambda: f"{count} workers: {self.workers()}")

    def seen_pids(self) -> list:
        with self._lock:
            return list(self.seen)

    def teardown(self) -> None:
        try:
            self.workers()
            self.estat.stop(SHUTDOWN_TIMEOUT + 12)
        finally:
            self._stop.set()
            self._thread.join(2)
            for pid in self.seen_pids():
                if running(pid) and is_worker_of(pid, self.estat):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            # A supervisor killed with SIGKILL cannot remove its metrics
            # directory; it is ours.
            for d in self.metrics_dirs:
                if os.path.basename(d).startswith("estat-metrics-"):
                    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(tmp_path):
    started = []

    def start(env: dict, name: str = "estat", ready: bool = True) -> Tracked:
        directory = tmp_path / f"{name}-{len(started)}"
        directory.mkdir()
        tracked = Tracked(EstatProcess({**BASE_ENV, **env}, directory=str(directory)))
        started.append(tracked)
        if ready:
            tracked.estat.wait_ready()
        return tracked

    try:
        yield start
    finally:
        for tracked in started:
            tracked.teardown()


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


# --- load ------------------------------------------------------------------


class Load:
    """
    Client threads posting distinct events to C{port}, a new connection
    every C{per_connection} requests, until L{stop} (or until the server
    stops listening).  C{acked}: every id answered 202.
    """

    def __init__(self, port: int, clients: int = 4, per_connection: int = 5,
                 events: int = 5, pause: float = 0.003, prefix: str = "w") -> None:
        self.port = port
        self.per_connection = per_connection
        self.events = events
        self.pause = pause
        self.prefix = prefix
        self.acked: list = []
        self.requests = 0
        self.connections = 0
        self.errors: list = []  # transport errors (expected around a stop)
        self.failures: list = []  # answers that are neither 202 nor 503
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True)
                         for c in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def wait_acked(self, count: int, timeout: float = 20.0) -> None:
        wait_until(lambda: len(self.acked) >= count, timeout, 0.05,
                   lambda: f"{count} events acknowledged (have {len(self.acked)}, "
                           f"failures {self.failures[:3]}, errors {self.errors[:3]})")

    def _run(self, client: int) -> None:
        seq = 0
        refused = 0
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=15)
            with self._lock:
                self.connections += 1
            try:
                for _ in range(self.per_connection):
                    if self._stop.is_set():
                        break
                    ids = [f"{self.prefix}{client}-{seq + i}" for i in range(self.events)]
                    seq += self.events
                    body = json.dumps([{"id": i, "client": client} for i in ids])
                    try:
                        conn.request("POST", "/collect", body=body,
                                     headers={"Content-Type": "application/json"})
                        response = conn.getresponse()
                        answer = response.read()
                    except ConnectionRefusedError as e:
                        refused += 1
                        with self._lock:
                            self.errors.append(repr(e))
                        if refused >= 20:
                            return  # the server is gone
                        time.sleep(0.05)
                        break
                    except (OSError, http.client.HTTPException) as e:
                        with self._lock:
                            self.errors.append(repr(e))
                        break
                    refused = 0
                    with self._lock:
                        self.requests += 1
                        if response.status == 202:
                            self.acked.extend(ids)
                        elif response.status != 503:
                            self.failures.append(f"{response.status} {answer[:200]!r}")
                    if response.getheader("Connection", "").lower() == "close":
                        break
                    time.sleep(self.pause)
            finally:
                conn.close()


def stored_ids(store_dir: str) -> tuple[collections.Counter, dict]:
    """
    C{(id -> times stored, key -> events)} of a directory store.
    """
    objects = stored_objects_local(store_dir)
    counts = collections.Counter(e["id"] for events in objects.values() for e in events)
    return counts, objects


def assert_exactly_once(acked: list, stored: collections.Counter) -> None:
    assert len(acked) == len(set(acked)), "an id was acknowledged twice"
    missing = [i for i in acked if stored[i] == 0]
    duplicated = {i: n for i, n in stored.items() if n > 1}
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged ids lost, e.g. " \
                        f"{sorted(missing)[:5]}"
    assert not duplicated, f"{len(duplicated)} ids stored more than once, e.g. " \
                           f"{sorted(duplicated.items())[:5]}"


def scrape(port: int) -> dict:
    """
    One C{GET /metrics} on a new connection.
    """
    status, body = _http_get(port, "/metrics", timeout=5.0)
    assert status == 200, (status, body[:200])
    return parse_metrics(body.decode("utf-8"))


def assert_no_worker_left(tracked: Tracked, timeout: float) -> None:
    pids = tracked.seen_pids()
    assert pids, "no worker was ever seen"
    wait_until(lambda: not [p for p in pids if running(p) and is_worker_of(p, tracked.estat)],
               timeout, 0.1,
               lambda: f"workers {[p for p in pids if running(p)]} to exit: "
                       f"{tracked.estat.log_tail()}")


# --- the tests -------------------------------------------------------------


def test_two_workers_serve_one_port(start):
    tracked = start({})
    estat = tracked.estat
    workers = tracked.wait_workers(2)
    assert sorted(workers) == [0, 1]
    assert estat.pid not in workers.values()

    # 40 connections, a few requests each, from 4 threads at once.
    load = Load(estat.port, clients=4, per_connection=3, events=4, pause=0.001)
    load.start()
    wait_until(lambda: load.connections >= 44, 30, 0.02, "40 connections")
    load.stop()
    assert not load.failures, load.failures[:5]
    assert not load.errors, load.errors[:5]
    assert len(load.acked) >= 40 * 3 * 4

    estat.terminate()
    assert estat.wait(SHUTDOWN_TIMEOUT + 12) == 0, estat.log_tail()
    stored, objects = stored_ids(estat.store_dir)
    assert_exactly_once(load.acked, stored)
    assert sum(stored.values()) == len(load.acked)
    names = " ".join(objects)
    assert "e2e-w0-" in names and "e2e-w1-" in names, sorted(objects)
    assert_no_worker_left(tracked, 5)
    # The supervisor was started with --reactor=estat: so were its workers.
    log = estat.log()
    assert log.count("reactor class: estat.http.reactor.EstatEPollReactor") == 3, log[-3000:]
    assert "reactor class: twisted.internet.epollreactor" not in log


def test_sigterm_under_load_loses_nothing(start):
    tracked = start({})
    estat = tracked.estat
    tracked.wait_workers(2)
    load = Load(estat.port, clients=6, per_connection=20, events=3).start()
    load.wait_acked(4000)
    estat.terminate()
    assert estat.wait(SHUTDOWN_TIMEOUT + 12) == 0, estat.log_tail()
    load.stop()
    assert not load.failures, load.failures[:5]
    stored, _ = stored_ids(estat.store_dir)
    assert_exactly_once(load.acked, stored)
    print(f"{len(load.acked)} acknowledged, {sum(stored.values())} stored, "
          f"{len(load.errors)} transport errors around the stop")
    assert_no_worker_left(tracked, 3)


def test_disk_mode_killed_worker_is_restarted_and_replays(start, tmp_path):
    wal = tmp_path / "wal"
    tracked = start({"ACK_MODE": "disk", "WAL_DIR": str(wal)})
    estat = tracked.estat
    before = tracked.wait_workers(2)
    load = Load(estat.port, clients=4, per_connection=10, events=4).start()
    load.wait_acked(2000)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    estat.wait_log("restarting it", timeout=10)
    after = wait_until(lambda: (lambda w: w if len(w) == 2 and w[0] != victim else None)(
        tracked.workers()), 20, 0.05, "worker 0 to be restarted")
    assert after[1] == before[1], "the other worker was not touched"
    assert sorted(os.listdir(wal)) == ["worker-0", "worker-1"]
    estat.wait_log("listening on", timeout=20, count=3)
    # More load, served by both again.
    acked = len(load.acked)
    load.wait_acked(acked + 1500)
    load.stop()
    assert not load.failures, load.failures[:5]
    estat.terminate()
    assert estat.wait(SHUTDOWN_TIMEOUT + 12) == 0, estat.log_tail()
    stored, _ = stored_ids(estat.store_dir)
    assert_exactly_once(load.acked, stored)
    log = estat.log()
    assert "worker 0 exited with status 137" in log
    replays = re.findall(r"write-ahead log \S+/worker-0 open: .*?(\d+) events to replay", log)
    assert len(replays) == 2, replays
    print(f"{len(load.acked)} acknowledged; the restarted worker 0 replayed {replays[1]} events")
    assert_no_worker_left(tracked, 3)


def test_sigkill_of_the_supervisor_leaves_no_worker(start, tmp_path):
    tracked = start({"ACK_MODE": "disk", "WAL_DIR": str(tmp_path / "wal")})
    estat = tracked.estat
    workers = tracked.wait_workers(2)
    load = Load(estat.port, clients=4, per_connection=10, events=4).start()
    load.wait_acked(800)
    load.stop()
    assert not load.failures, load.failures[:5]
    estat.kill()
    estat.wait(5)
    t0 = time.monotonic()
    pids = list(workers.values())
    wait_until(lambda: not [p for p in pids if running(p)], SHUTDOWN_TIMEOUT + 4, 0.1,
               lambda: f"workers {[p for p in pids if running(p)]} to exit after the "
                       f"supervisor's SIGKILL: {estat.log_tail()}")
    print(f"workers gone {time.monotonic() - t0:.1f}s after the supervisor's SIGKILL")
    # Each worker drained (SIGTERM from the kernel or end-of-file on its pipe).
    assert estat.log().count("shutdown complete: every accepted event is stored") == 2, \
        estat.log_tail()
    stored, _ = stored_ids(estat.store_dir)
    assert_exactly_once(load.acked, stored)


def _start_with_affinity(start, cpus: set, env: dict) -> Tracked:
    """
    Start C{estat} with the CPU affinity C{cpus} (the child inherits the
    affinity of the thread that forks it; ours is put back at once).
    """
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        tracked = start(env, ready=False)
    finally:
        os.sched_setaffinity(0, mine)
    assert os.sched_getaffinity(tracked.estat.pid) == cpus
    tracked.estat.wait_ready()
    return tracked


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity")
def test_workers_auto_follows_the_affinity(start):
    # One CPU: one plain process, no supervisor, no children.
    one = _start_with_affinity(start, {sorted(os.sched_getaffinity(0))[0]}, {"WORKERS": "auto"})
    assert one.estat.post({"id": "auto-1"})[0] == 202
    time.sleep(0.3)
    assert children(one.estat.pid) == []
    assert "supervisor:" not in one.estat.log()
    one.estat.terminate()
    assert one.estat.wait(SHUTDOWN_TIMEOUT + 12) == 0
    stored, objects = stored_ids(one.estat.store_dir)
    assert stored == {"auto-1": 1}
    assert all("-w0-" not in k and "-w1-" not in k for k in objects), sorted(objects)

    from estat.config import available_cpus

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or available_cpus() < 2:
        pytest.skip("fewer than 2 CPUs (affinity or cgroup quota)")
    two = _start_with_affinity(start, set(cpus[:2]), {"WORKERS": "auto"})
    assert sorted(two.wait_workers(2)) == [0, 1]
    assert "supervisor: starting 2 workers" in two.estat.log()


def test_workers_that_cannot_start_are_a_crash_loop(start, tmp_path):
    # WAL_DIR is a regular file: no worker can make WAL_DIR/worker-<slot>.
    not_a_dir = tmp_path / "wal-file"
    not_a_dir.write_text("not a directory\n")
    tracked = start({"ACK_MODE": "disk", "WAL_DIR": str(not_a_dir)}, ready=False)
    estat = tracked.estat
    t0 = time.monotonic()
    status = estat.wait(25)
    elapsed = time.monotonic() - t0
    log = estat.log()
    assert status == 1, log[-3000:]
    assert elapsed < 25
    assert "a crash loop; stopping" in log, log[-3000:]
    # The workers really failed at start: non-zero, not killed.
    assert log.count("exited with status 2") >= 4, log[-3000:]
    assert "Traceback" not in log
    print(f"crash loop exit after {elapsed:.1f}s")
    assert_no_worker_left(tracked, 3)


# --- the shared dead-letter queue -----------------------------------------


DLQ_FILES = 300


def _fill_dlq(directory: str) -> dict:
    """
    Write L{DLQ_FILES} dead-letter files with estat's own encoding; return
    C{{key: (body, count)}}.
    """
    from estat.dlq import encode_dlq_file
    from estat.encoder import EncodedObject, content_md5, gzip_bytes
    from estat.fsutil import atomic_write

    os.makedirs(directory, exist_ok=True)
    expected = {}
    now_ns = time.time_ns()
    for i in range(DLQ_FILES):
        count = i % 7 + 1
        lines = "".join(json.dumps({"id": f"dlq-{i}-{j}", "n": j}) + "\n" for j in range(count))
        body = gzip_bytes(lines.encode("utf-8"), 6)
        key = f"raw/dt=2026-01-01/hour=00/dlq-prefill-{i:04d}.jsonl.gz"
        obj = EncodedObject(key=key, body=body, count=count, content_md5=content_md5(body))
        created_ns = now_ns - (DLQ_FILES - i) * 1_000_000
        name = f"{created_ns:020d}-{secrets.token_hex(4)}.dlq"
        atomic_write(os.path.join(directory, name), encode_dlq_file(obj, created_ns / 1e9))
        expected[key] = (body, count)
    return expected


def _dlq_files(directory: str) -> list:
    return [n for n in os.listdir(directory) if n.endswith(".dlq")]


def _snapshot_counter(directory: str, metric: str) -> dict:
    """
    C{{file name: value}} of one counter in each worker's own metrics
    snapshot (the files behind the merged /metrics), live and dead.
    """
    out = {}
    for name in os.listdir(directory):
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                families = json.load(f)
        except (OSError, ValueError):
            continue
        for family in families:
            for sample, labels, value in family[3]:
                if sample == metric and not labels:
                    out[name] = value
    return out


def test_workers_drain_one_dead_letter_directory_once(start, moto, tmp_path):
    dlq = str(tmp_path / "shared-dlq")
    expected = _fill_dlq(dlq)
    total = sum(count for _, count in expected.values())
    assert len(_dlq_files(dlq)) == DLQ_FILES
    tracked = start({
        "DLQ_DIR": dlq,
        "DLQ_RETRY_INTERVAL": "0.2s",
        "RAW_BUCKET": moto.bucket,
        "S3_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": moto.access_key,
        "AWS_SECRET_ACCESS_KEY": moto.secret_key,
    })
    estat = tracked.estat
    tracked.wait_workers(2)
    wait_until(lambda: not _dlq_files(dlq), 60, 0.2,
               lambda: f"the DLQ to drain ({len(_dlq_files(dlq))} left): {estat.log_tail()}")
    assert os.listdir(dlq) == [] or set(os.listdir(dlq)) <= {"quarantine"}, os.listdir(dlq)

    # One /metrics: the recovered events summed over both workers, exactly.
    wait_until(lambda: scrape(estat.port).get("dlq_events_recovered_total") == total, 10, 0.2,
               lambda: f"dlq_events_recovered_total == {total}: "
                       f"{scrape(estat.port).get('dlq_events_recovered_total')}")
    # Each worker recounts the shared directory every DLQ_RETRY_INTERVAL:
    # its gauge may lag the other worker's removals by that much.
    wait_until(lambda: [scrape(estat.port)["dlq_files_current"] for _ in range(4)] == [0] * 4,
               5, 0.2, lambda: f"dlq_files_current == 0 in every worker: "
                               f"{scrape(estat.port)['dlq_files_current']}")
    for _ in range(4):
        m = scrape(estat.port)
        assert m["dlq_events_recovered_total"] == total
        assert m["dlq_files_current"] == 0
        assert m["dlq_bytes_current"] == 0
    # Each worker's own share, from the snapshots behind the scrape.
    (metrics_dir,) = tracked.metrics_dirs
    per_worker = wait_until(
        lambda: (lambda s: s if sum(s.values()) == total else None)(
            _snapshot_counter(metrics_dir, "dlq_events_recovered_total")),
        10, 0.2, "the snapshots to add up")
    print(f"{DLQ_FILES} files, {total} events; recovered per worker snapshot: {per_worker}")
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker

    assert estat.log().count("from the dead-letter queue") == DLQ_FILES
    keys = moto.keys("raw/dt=2026-01-01/")
    assert sorted(keys) == sorted(expected)
    for key, (body, _) in expected.items():
        got = moto.get(key)["body"]
        assert got == body, key
        assert len(gzip.decompress(got).splitlines()) == expected[key][1]

    estat.terminate()
    assert estat.wait(SHUTDOWN_TIMEOUT + 12) == 0, estat.log_tail()
    assert_no_worker_left(tracked, 3)


# --- one /metrics (the contract of docs/workers.md) ------------------------


def _counters(samples: dict) -> dict:
    return {k: v for k, v in samples.items()
            if k.split("{", 1)[0].endswith(("_total", "_count", "_sum", "_bucket"))}


def test_one_metrics_summed_over_workers(start):
    tracked = start({})
    estat = tracked.estat
    before = tracked.wait_workers(2)
    requests = 200
    load = Load(estat.port, clients=4, per_connection=5, events=1, pause=0.0)
    # Exactly `requests` POSTs: run, then count what was sent.
    load.start()
    wait_until(lambda: load.requests >= requests, 30, 0.01, f"{requests} requests")
    load.stop()
    assert not load.failures and not load.errors, (load.failures[:3], load.errors[:3])
    sent = load.requests
    assert load.connections >= sent // 5

    wait_until(lambda: scrape(estat.port).get("http_requests_total") == sent, 10, 0.2,
               lambda: f"http_requests_total == {sent}: "
                       f"{scrape(estat.port).get('http_requests_total')}")
    for _ in range(6):
        m = scrape(estat.port)
        assert m["http_requests_total"] == sent  # never more: GETs are not counted
        assert m["events_accepted_total"] == sent
        opened = sorted(k for k in m if k.startswith("http_connections_open"))
        assert opened == ['http_connections_open{worker="0"}',
                          'http_connections_open{worker="1"}'], opened
        depth = sorted(k for k in m if k.split("{", 1)[0] == "event_queue_depth")
        assert depth == ['event_queue_depth{worker="0"}', 'event_queue_depth{worker="1"}']
        assert [k for k in m if k.split("{", 1)[0] == "dlq_files_current"] == \
            ["dlq_files_current"]
        assert [k for k in m if k.split("{", 1)[0] == "dlq_bytes_current"] == \
            ["dlq_bytes_current"]
        time.sleep(0.1)

    # Idle for more than a snapshot period: every worker's file is current.
    time.sleep(1.5)
    last = _counters(scrape(estat.port))
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    estat.wait_log("restarting it", timeout=10)
    wait_until(lambda: (lambda w: w if len(w) == 2 and w[1] != victim else None)(
        tracked.workers()), 20, 0.05, "worker 1 to be restarted")
    estat.wait_log("listening on", timeout=20, count=3)

    def never_down(samples: dict) -> None:
        nonlocal last
        now = _counters(samples)
        down = {k: (last[k], now.get(k)) for k in last if now.get(k, 0.0) < last[k]}
        assert not down, f"counters went down: {sorted(down.items())[:5]}"
        last = now

    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        m = scrape(estat.port)
        never_down(m)
        assert m["http_requests_total"] == sent, "the killed worker's counts were kept"
        time.sleep(0.05)
    # Gauges: one line per live worker, still two.
    wait_until(lambda: sorted(k for k in scrape(estat.port)
                              if k.startswith("http_connections_open")) ==
               ['http_connections_open{worker="0"}', 'http_connections_open{worker="1"}'],
               5, 0.2, "two worker gauges after the restart")

    # More requests after the restart add on top of the dead worker's.
    more = 40
    for i in range(more):
        assert estat.post({"id": f"after-{i}"})[0] == 202
    wait_until(lambda: scrape(estat.port).get("http_requests_total") == sent + more, 10, 0.2,
               lambda: f"http_requests_total == {sent + more}: "
                       f"{scrape(estat.port).get('http_requests_total')}")
    time.sleep(1.5)
    for _ in range(10):
        never_down(scrape(estat.port))
    estat.terminate()
    assert estat.wait(SHUTDOWN_TIMEOUT + 12) == 0, estat.log_tail()


def test_healthz_and_readyz_while_the_supervisor_drains(start):
    """
    Each worker answers C{/healthz} 200 while it serves; once the
    supervisor is told to stop, a request begun on a worker's connection
    gets C{/readyz} 503 (every worker drains), and nothing listens after.
    """
    tracked = start({"WORKERS": "2", "SHUTDOWN_TIMEOUT": "20s"})
    tracked.wait_workers(2)
    estat = tracked.estat
    sockets = []
    try:
        for _ in range(8):
            s = socket.create_connection((LOOPBACK, estat.port), timeout=10)
            # A request begun: the drain waits for its answer.
            s.sendall(b"GET /readyz HTTP/1.1\r\n")
            sockets.append(s)
        for _ in range(10):
            assert estat.get("/healthz")[0] == 200
        estat.terminate()
        estat.wait_log("shutting down", count=2)
        statuses = []
        for s in sockets:
            s.sendall(b"Host: estat\r\n\r\n")
            response = http.client.HTTPResponse(s)
            response.begin()
            body = response.read()
            statuses.append(response.status)
            assert b"shutting down" in body
        assert statuses == [503] * len(sockets)
    finally:
        for s in sockets:
            s.close()
    with pytest.raises(OSError):
        estat.get("/readyz", timeout=2)
    assert estat.wait(30) == 0, estat.log_tail()
