#!/usr/bin/env python
"""
Estat's reliability soak (`make soak`): a bounded chaos run that checks the
one promise that matters, every event answered 2xx is stored exactly once.

It starts, on 127.0.0.1 only, a moto S3 server with SigV4 checking on, the
fault-injecting proxy in front of it, and the real `twistd estat`, then:

 - many client threads post distinct events (each with a unique id), as
   single events and JSON arrays of 1-50, and note per id whether it was
   acknowledged (2xx), rejected (503) or met an error.  Clients retry
   nothing: a refused or failed id is only counted;
 - the proxy cycles through S3's failures with healthy periods between:
   500 InternalError, 503 SlowDown, answers slower than S3_TIMEOUT, stored
   but connection dropped, connections refused, and a full blackhole of
   `--blackout` seconds;
 - in the middle (inside the blackhole) the server is stopped with SIGTERM
   (or SIGKILL with `--sigkill`) and a new process is started on the same
   DLQ_DIR; the clients move to its port;
 - at the end the proxy is healthy, the load stops, a SIGTERM drains the
   server, and if the dead-letter queue still holds files a new process
   runs on it until it is empty.

Every object is then read back from the bucket.  The soak PASSES iff no
acknowledged event is missing, none is stored twice, no 503'd event was
stored, and every process stopped with SIGTERM exited 0.  With `--sigkill`
the events the crash lost (they were only in memory: queue, open batch,
uploads in flight) are reported, not failed; duplicates still fail, and so
does a lost event acknowledged by any process that was not killed.

Peak RSS is VmHWM from /proc/<pid>/status; the dead-letter peaks are
sampled from /metrics (dlq_files_current, dlq_bytes_current) and from the
directory itself.  Every wait is bounded; every process started here is
ended by its PID.

    python bench/soak.py [--duration 180] [--blackout 60] [--clients 16]
                         [--rate 25] [--quick] [--sigkill] [--output bench/SOAK.md]

`run_soak(duration, blackout, clients, sigkill=False) -> dict` is the same
run as a function (the end-to-end test calls it).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import gzip
import http.client
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from estat.test.harness import (  # noqa: E402
    BUCKET,
    LOOPBACK,
    EstatProcess,
    FaultProxy,
    MotoServer,
    parse_metrics,
)

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is an Estat dependency
    _loads = json.loads

__all__ = ["run_soak", "fault_schedule", "markdown_table", "main"]

S3_TIMEOUT = 1.0
SHUTDOWN_TIMEOUT = 8.0
#: How long the proxy sits on a request in "slow" mode: longer than
#: S3_TIMEOUT, then it forwards anyway (stored after the client gave up).
SLOW_SECONDS = 2.5
#: The short faults, in the order they are cycled through.
SHORT_FAULTS = ("500", "slowdown", "slow", "drop_after_store", "refuse")
#: Longest array a client posts.
MAX_ARRAY = 50
#: Client socket timeout: Estat answers from memory, so anything near this
#: is a stall worth counting as an error.
CLIENT_TIMEOUT = 10.0
#: Bound of the wait for the drain process to empty the dead-letter queue.
DRAIN_TIMEOUT = 180.0
#: Requests per second each client aims at (0: as fast as it can).
DEFAULT_RATE = 25.0

# Per-id outcome, one byte per id in each client's array.
REJECTED = 1
ERROR = 2
OTHER = 3
#: ACKED + n: acknowledged by the process of generation n.
ACKED = 16

_ID = re.compile(r"^c(\d+)-(\d+)$")
_RAW_ID = re.compile(r'"id"\s*:\s*"(c\d+-\d+)"')
_EVENTS = ("page_view", "click", "scroll", "signup", "purchase", "search")
_PATHS = ("/", "/pricing", "/docs/getting-started", "/blog/2026/11/launch-week",
          "/signup", "/account/settings", "/products/42?ref=home", "/search?q=twisted")


# --- the timeline -----------------------------------------------------------


def fault_schedule(duration: float, blackout: float) -> tuple[list, float]:
    """
    The proxy's timeline for a run of C{duration} seconds: C{([(start,
    mode), ...], restart_at)}.

    The blackhole is centred on the middle of the run, where the server is
    restarted; the short faults fill the time before and after it, each
    followed by a healthy gap, and the last stretch of the run is healthy.
    """
    fault = min(8.0, max(2.0, duration / 22))
    gap = min(6.0, max(1.5, duration / 30))
    tail = max(2 * gap, min(15.0, duration * 0.1))
    restart_at = duration / 2
    phases = [(0.0, "pass")]
    faults = iter(SHORT_FAULTS * 100)

    def fill(t: float, until: float) -> float:
        while t + fault <= until:
            phases.append((t, next(faults)))
            phases.append((t + fault, "pass"))
            t += fault + gap
        return t

    t = gap
    if blackout > 0:
        start = max(gap, restart_at - blackout / 2)
        fill(t, start)
        phases.append((start, "blackhole"))
        phases.append((start + blackout, "pass"))
        # Deep enough in that the whole shutdown of a long blackhole happens
        # inside it; early enough in a short one to meet it at all.
        restart_at = start + min(blackout / 2, max(1.0, blackout - SHUTDOWN_TIMEOUT - 2))
        t = start + blackout + gap
    fill(t, duration - tail)
    return phases, restart_at


# --- the clients --------------------------------------------------------------


class Target:
    """
    The port of the server the clients post to, and its generation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.port = 0
        self.generation = -1

    def set(self, port: int, generation: int) -> None:
        with self._lock:
            self.port, self.generation = port, generation

    def get(self) -> tuple[int, int]:
        with self._lock:
            return self.port, self.generation


class Client(threading.Thread):
    """
    Posts events with ids C{c<index>-<seq>} until told to stop; the
    outcome of id C{seq} is C{self.status[seq]}.
    """

    def __init__(self, index: int, target: Target, stop: threading.Event,
                 rate: float, seed: int) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.index = index
        self.target = target
        self.stop = stop
        self.rate = rate
        self.rng = random.Random(seed)
        self.status = bytearray()
        self.requests = collections.Counter()
        self.errors = collections.Counter()
        self.acked = self.rejected = self.failed = 0

    def _event(self, seq: int) -> dict:
        rng = self.rng
        pad = rng.randint(8, 160)
        return {
            "id": f"c{self.index}-{seq}",
            "event": rng.choice(_EVENTS),
            "user_id": f"u-{rng.randrange(100000)}",
            "path": rng.choice(_PATHS),
            "value": rng.randrange(100000) / 100,
            "pad": "%0*x" % (pad, rng.getrandbits(4 * pad)),
        }

    def _body(self) -> tuple[bytes, int]:
        seq = len(self.status)
        if self.rng.random() < 0.5:
            return json.dumps(self._event(seq), separators=(",", ":")).encode(), 1
        n = self.rng.randint(1, MAX_ARRAY)
        events = [self._event(seq + i) for i in range(n)]
        return json.dumps(events, separators=(",", ":")).encode(), n

    def run(self) -> None:
        conn = None
        conn_port = 0
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                if interval:
                    now = time.monotonic()
                    if next_at > now and self.stop.wait(next_at - now):
                        break
                    # No bursts to catch up after a stall.
                    next_at = max(next_at, time.monotonic() - interval) + interval
                port, generation = self.target.get()
                if conn is not None and conn_port != port:
                    conn.close()
                    conn = None
                if conn is None:
                    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=CLIENT_TIMEOUT)
                    conn_port = port
                body, n = self._body()
                pause = 0.0
                try:
                    conn.request("POST", "/collect", body=body, headers={
                        "Content-Type": "application/json", "User-Agent": "estat-soak/1"})
                    response = conn.getresponse()
                    answer = response.read()
                    if 200 <= response.status < 300:
                        if json.loads(answer).get("accepted") != n:
                            raise AssertionError(f"accepted {answer!r} for {n} events")
                        code = ACKED + generation
                        self.acked += n
                    elif response.status == 503:
                        code = REJECTED
                        self.rejected += n
                        pause = 0.2  # Retry-After asks for 1 s; be a bit impatient
                    else:
                        code = OTHER
                        self.errors[f"HTTP {response.status}"] += 1
                    self.requests[response.status] += 1
                    if response.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException, ValueError, AssertionError) as e:
                    code = ERROR
                    self.failed += n
                    self.requests["error"] += 1
                    self.errors[type(e).__name__] += 1
                    conn.close()
                    conn = None
                    pause = 0.1
                self.status.extend(bytes((code,)) * n)
                if pause and self.stop.wait(pause):
                    break
        finally:
            if conn is not None:
                conn.close()


# --- the processes --------------------------------------------------------------


class Server:
    """
    One Estat process of the run and what was seen of it.
    """

    def __init__(self, name: str, generation: int, process: EstatProcess) -> None:
        self.name = name
        self.generation = generation
        self.process = process
        self.peak_rss_kb = 0
        self.last_metrics: dict = {}
        self.stopped_with: str | None = None
        self.exit_code: int | None = None
        self.metrics_at_stop: dict = {}
        self.stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def read_rss(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
                        return
        except (OSError, ValueError):
            pass

    def read_metrics(self, timeout: float = 2.0) -> dict:
        conn = http.client.HTTPConnection(LOOPBACK, self.process.port, timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise OSError(f"/metrics answered {response.status}")
        metrics = parse_metrics(body.decode("utf-8"))
        self.last_metrics = metrics
        return metrics


def _dlq_files(directory: str) -> tuple[int, int]:
    files = size = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".dlq") and not entry.name.startswith(".tmp-"):
                    try:
                        size += entry.stat().st_size
                        files += 1
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return files, size


class Sampler(threading.Thread):
    """
    Every half second: peak RSS of every live server, its /metrics, and the
    dead-letter queue (metrics and directory).
    """

    def __init__(self, servers: list, dlq_dir: str, interval: float = 0.5) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.servers = servers
        self.dlq_dir = dlq_dir
        self.interval = interval
        self.done = threading.Event()
        self.peak_dlq_files = self.peak_dlq_bytes = 0
        self.peak_dir_files = self.peak_dir_bytes = 0
        self.dlq_files = self.dlq_bytes = 0
        #: (monotonic time, files in the directory) of every sample.
        self.series: list = []

    def sample(self) -> None:
        for server in list(self.servers):
            if not server.alive():
                continue
            server.read_rss()
            try:
                m = server.read_metrics()
            except (OSError, http.client.HTTPException, ValueError):
                continue
            self.dlq_files = int(m.get("dlq_files_current", 0))
            self.dlq_bytes = int(m.get("dlq_bytes_current", 0))
            self.peak_dlq_files = max(self.peak_dlq_files, self.dlq_files)
            self.peak_dlq_bytes = max(self.peak_dlq_bytes, self.dlq_bytes)
        files, size = _dlq_files(self.dlq_dir)
        self.series.append((time.monotonic(), files))
        self.peak_dir_files = max(self.peak_dir_files, files)
        self.peak_dir_bytes = max(self.peak_dir_bytes, size)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()


class FaultCycler(threading.Thread):
    """
    Sets the proxy's mode at the times of the schedule.
    """

    def __init__(self, proxy: FaultProxy, phases: list, started: float, log) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.proxy = proxy
        self.phases = phases
        self.started = started
        self.log = log
        self.done = threading.Event()
        #: (monotonic time, mode) of every change made.
        self.changes: list = []

    def run(self) -> None:
        for at, mode in self.phases:
            if self.done.wait(max(0.0, self.started + at - time.monotonic())):
                break
            self.proxy.set_mode(mode)
            self.changes.append((time.monotonic(), mode))
            self.log(f"[{time.monotonic() - self.started:6.1f}s] S3 via proxy: {mode}")
        self.proxy.set_mode("pass")


# --- reading back ---------------------------------------------------------------


def read_back(moto: MotoServer, workers: int = 8) -> dict:
    """
    Every object of the bucket (every prefix): C{{"objects", "lines",
    "ids", "unknown", "poison", "no_server_fields", "prefixes"}}, where
    C{ids[client][seq]} is how many times id C{c<client>-<seq>} is stored
    (a byte per id: a soak holds millions).
    """
    keys = moto.keys("")
    ids: dict = collections.defaultdict(bytearray)
    result = {"objects": len(keys), "lines": 0, "unknown": 0, "poison": 0,
              "no_server_fields": 0, "prefixes": collections.Counter()}

    def fetch(key: str) -> tuple[str, bytes]:
        return key, moto.get(key)["body"]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for key, body in pool.map(fetch, keys):
            result["prefixes"][key.split("/", 1)[0]] += 1
            text = gzip.decompress(body)
            for line in text.split(b"\n"):
                if not line:
                    continue
                result["lines"] += 1
                obj = _loads(line)
                if "_estat" not in obj:
                    result["no_server_fields"] += 1
                event_id = obj.get("id")
                if event_id is None and "raw" in obj:
                    # A poison event's raw original, stored under DLQ_PREFIX.
                    result["poison"] += 1
                    m = _RAW_ID.search(str(obj["raw"]))
                    event_id = m.group(1) if m else None
                m = _ID.match(event_id) if isinstance(event_id, str) else None
                if m is None:
                    result["unknown"] += 1
                    continue
                counts, seq = ids[int(m.group(1))], int(m.group(2))
                if seq >= len(counts):
                    counts.extend(bytes(seq + 1 - len(counts)))
                counts[seq] = min(255, counts[seq] + 1)
    result["ids"] = ids
    return result


# --- the run --------------------------------------------------------------------


def run_soak(duration: float, blackout: float, clients: int, sigkill: bool = False,
             rate: float = DEFAULT_RATE, log=print, keep: bool = False) -> dict:
    """
    Run the soak and return its results (see L{markdown_table} for the
    fields); C{result["passed"]} is the verdict.
    """
    def say(text: str) -> None:
        log(text)

    workdir = tempfile.mkdtemp(prefix="estat-soak-")
    dlq_dir = os.path.join(workdir, "dlq")
    phases, restart_at = fault_schedule(duration, blackout)
    servers: list = []
    moto = proxy = sampler = cycler = None
    workers: list = []
    stop_load = threading.Event()
    target = Target()
    result: dict = {
        "duration": duration, "blackout": blackout, "clients": clients, "rate": rate,
        "sigkill": sigkill, "workdir": workdir,
    }
    begun = time.monotonic()
    t0 = None  # the start of the load: every time printed counts from it

    def elapsed() -> str:
        return "[  setup]" if t0 is None else f"[{time.monotonic() - t0:6.1f}s]"

    def start_server(name: str, generation: int) -> Server:
        directory = os.path.join(workdir, name)
        os.makedirs(directory)
        env = {
            "RAW_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": proxy.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key,
            "S3_TIMEOUT": f"{S3_TIMEOUT:g}s",
            "S3_APP_RETRIES": "1",
            "BATCH_SIZE": "500",
            "FLUSH_INTERVAL": "1s",
            "DLQ_DIR": dlq_dir,
            "DLQ_RETRY_INTERVAL": "500ms",
            "SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
            # The real default: host name plus random bits.
            "INSTANCE_ID": "",
        }
        server = Server(name, generation, EstatProcess(env, directory=directory))
        servers.append(server)
        server.process.wait_ready(30)
        server.read_rss()
        say(f"{elapsed()} started {name}: pid {server.pid}, port {server.process.port}")
        return server

    def stop_server(server: Server, how: str) -> int:
        try:
            server.metrics_at_stop = server.read_metrics()
        except (OSError, http.client.HTTPException, ValueError):
            server.metrics_at_stop = dict(server.last_metrics)
        server.read_rss()
        server.stopped_with = how
        os.kill(server.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        began = time.monotonic()
        # Sample its RSS while it drains: the peak may come now.
        while server.alive() and time.monotonic() - began < SHUTDOWN_TIMEOUT + 15:
            server.read_rss()
            time.sleep(0.1)
        if server.alive():
            say(f"{elapsed()} {server.name} still running {SHUTDOWN_TIMEOUT + 15:g}s after "
                f"{how}: killing it")
            server.process.kill()
            server.process.wait(10)
            server.exit_code = None
        else:
            server.exit_code = server.process.wait(5)
        server.process.stop()
        server.stop_seconds = time.monotonic() - began
        say(f"{elapsed()} {server.name} stopped with {how} after "
            f"{server.stop_seconds:.1f}s: exit code {server.exit_code}")
        return server.exit_code

    def progress(current: Server | None) -> None:
        sent = sum(len(c.status) for c in workers)
        acked = sum(c.acked for c in workers)
        rejected = sum(c.rejected for c in workers)
        failed = sum(c.failed for c in workers)
        rss = f"{current.peak_rss_kb / 1024:.0f} MB" if current else "-"
        say(f"{elapsed()} sent {sent}, acked {acked}, 503 {rejected}, errors {failed}; "
            f"DLQ {sampler.dlq_files} files / {sampler.dlq_bytes} B; proxy {proxy.mode}; "
            f"server peak RSS {rss}")

    try:
        say(f"soak: {duration:g}s of load, {clients} clients at {rate:g} req/s each, "
            f"blackhole {blackout:g}s, mid-run {'SIGKILL' if sigkill else 'SIGTERM'} "
            f"at {restart_at:.1f}s; work directory {workdir}")
        say("schedule: " + ", ".join(f"{at:.1f}s {mode}" for at, mode in phases))
        moto = MotoServer()
        proxy = FaultProxy(moto.port, slow_seconds=SLOW_SECONDS)
        first = start_server("first", 0)
        first.process.wait_log("store check", 15)
        target.set(first.process.port, 0)
        sampler = Sampler(servers, dlq_dir)
        sampler.start()

        workers = [Client(i, target, stop_load, rate, seed=i) for i in range(clients)]
        t0 = started = time.monotonic()
        for c in workers:
            c.start()
        cycler = FaultCycler(proxy, phases, started, say)
        cycler.start()

        # The mid-run stop and restart.
        current = first
        report_every = 10.0 if duration >= 60 else 5.0
        next_report = report_every
        restarted = False
        while True:
            now = time.monotonic() - started
            if now >= duration:
                break
            if not restarted and now >= restart_at:
                restarted = True
                how = "SIGKILL" if sigkill else "SIGTERM"
                say(f"{elapsed()} mid-run {how} of {first.name} (pid {first.pid})")
                stop_server(first, how)
                if sigkill:
                    m = first.metrics_at_stop
                    result["in_memory_at_kill"] = int(
                        m.get("events_accepted_total", 0)
                        - (m.get("s3_events_stored_total", 0)
                           - m.get("dlq_events_recovered_total", 0))
                        - m.get("dlq_events_enqueued_total", 0)
                        - m.get("encoder_poison_events_total", 0))
                current = start_server("second", 1)
                target.set(current.process.port, 1)
                continue
            if now >= next_report:
                next_report += report_every
                progress(current)
            time.sleep(min(0.2, max(0.0, duration - now)))

        # The end: S3 healthy, load stopped, a drain, then the DLQ emptied.
        cycler.done.set()
        cycler.join(10)
        proxy.set_mode("pass")
        stop_load.set()
        for c in workers:
            c.join(CLIENT_TIMEOUT + 5)
        progress(current)
        say(f"{elapsed()} load stopped; final SIGTERM of {current.name}")
        stop_server(current, "SIGTERM")
        left, left_bytes = _dlq_files(dlq_dir)
        if left:
            say(f"{elapsed()} {left} files ({left_bytes} B) left in the DLQ: "
                "starting a process to drain them")
            drainer = start_server("drain", 2)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    m = drainer.read_metrics()
                except (OSError, http.client.HTTPException, ValueError):
                    m = {}
                if m and m.get("dlq_files_current", 1) == 0 and m.get("batches_pending", 1) == 0:
                    break
                time.sleep(0.25)
            else:
                say(f"{elapsed()} the DLQ did not drain within {DRAIN_TIMEOUT:g}s")
            stop_server(drainer, "SIGTERM")
        sampler.done.set()
        sampler.join(5)
        sampler.sample()

        say(f"{elapsed()} reading every object back from the bucket")
        stored = read_back(moto)
        result["proxy_requests"] = dict(proxy.counts)
        result.update(_tally(workers, stored, servers, sampler, dlq_dir, sigkill))
        result["dlq_recovery"] = _dlq_recovery(cycler.changes, sampler.series, started + duration)
        result["elapsed"] = time.monotonic() - begun
        result["logs"] = _log_findings(servers)
        say(f"{elapsed()} done: {'PASS' if result['passed'] else 'FAIL'}")
        return result
    finally:
        stop_load.set()
        if cycler is not None:
            cycler.done.set()
        for c in workers:
            c.join(CLIENT_TIMEOUT + 5)
        if sampler is not None:
            sampler.done.set()
        for server in servers:
            server.process.stop()
        if proxy is not None:
            proxy.stop()
        if moto is not None:
            moto.stop()
        if result.get("passed") and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir} (process logs in */estat.log)")


def _tally(workers: list, stored: dict, servers: list, sampler: Sampler,
           dlq_dir: str, sigkill: bool) -> dict:
    counts = stored["ids"]
    sent = acked = rejected = failed = other = 0
    stored_ids = lost = duplicated = extra_copies = 0
    stored_not_acked = stored_rejected = stored_other = unsent_stored = 0
    lost_by_generation: collections.Counter = collections.Counter()
    lost_examples: list = []
    duplicate_examples: list = []
    for c in workers:
        status = c.status
        stored_counts = counts.get(c.index, b"")
        sent += len(status)
        for seq, code in enumerate(status):
            n = stored_counts[seq] if seq < len(stored_counts) else 0
            if code >= ACKED:
                acked += 1
                if n == 0:
                    lost += 1
                    lost_by_generation[code - ACKED] += 1
                    if len(lost_examples) < 10:
                        lost_examples.append(f"c{c.index}-{seq}")
            elif code == REJECTED:
                rejected += 1
                if n:
                    stored_rejected += 1
            elif code == ERROR:
                failed += 1
                if n:
                    stored_not_acked += 1
            else:
                other += 1
                if n:
                    stored_other += 1
            if n:
                stored_ids += 1
            if n > 1:
                duplicated += 1
                extra_copies += n - 1
                if len(duplicate_examples) < 10:
                    duplicate_examples.append(f"c{c.index}-{seq} x{n}")
    for index, stored_counts in counts.items():
        first_unsent = len(workers[index].status) if index < len(workers) else 0
        unsent_stored += sum(stored_counts[first_unsent:])

    killed = [s for s in servers if s.stopped_with == "SIGKILL"]
    killed_generations = {s.generation for s in killed}
    lost_unexplained = sum(n for g, n in lost_by_generation.items()
                           if g not in killed_generations)
    exit_codes = [(s.name, s.stopped_with, s.exit_code) for s in servers]
    stop_seconds = {s.name: s.stop_seconds for s in servers}
    clean_exits = all(code == 0 for _, how, code in exit_codes if how == "SIGTERM")
    quarantined = len(os.listdir(os.path.join(dlq_dir, "quarantine"))) \
        if os.path.isdir(os.path.join(dlq_dir, "quarantine")) else 0
    left_files, _ = _dlq_files(dlq_dir)
    s3_errors: collections.Counter = collections.Counter()
    for s in servers:
        for name, value in (s.metrics_at_stop or s.last_metrics).items():
            m = re.match(r's3_put_errors_by_code_total\{code="([^"]+)"\}', name)
            if m:
                s3_errors[m.group(1)] += int(value)
    if sigkill:
        passed = (duplicated == 0 and lost_unexplained == 0 and clean_exits
                  and stored_rejected == 0 and unsent_stored == 0)
    else:
        passed = (lost == 0 and duplicated == 0 and clean_exits
                  and stored_rejected == 0 and unsent_stored == 0)
    return {
        "sent": sent,
        "acknowledged": acked,
        "stored": stored_ids,
        "stored_lines": stored["lines"],
        "objects": stored["objects"],
        "prefixes": dict(stored["prefixes"]),
        "duplicated": duplicated,
        "extra_copies": extra_copies,
        "lost": lost,
        "lost_by_generation": dict(lost_by_generation),
        "lost_unexplained": lost_unexplained,
        "lost_examples": lost_examples,
        "duplicate_examples": duplicate_examples,
        "stored_not_acknowledged": stored_not_acked,
        "rejected": rejected,
        "stored_but_rejected": stored_rejected,
        "client_errors": failed,
        "other_status": other,
        "stored_other_status": stored_other,
        "unknown_stored": stored["unknown"] + unsent_stored,
        "no_server_fields": stored["no_server_fields"],
        "poison_lines": stored["poison"],
        "requests": sum(sum(c.requests.values()) for c in workers),
        "request_outcomes": dict(sum((c.requests for c in workers), collections.Counter())),
        "client_error_types": dict(sum((c.errors for c in workers), collections.Counter())),
        "dlq_peak_files": sampler.peak_dlq_files,
        "dlq_peak_bytes": sampler.peak_dlq_bytes,
        "dlq_dir_peak_files": sampler.peak_dir_files,
        "dlq_dir_peak_bytes": sampler.peak_dir_bytes,
        "dlq_left_files": left_files,
        "dlq_quarantined": quarantined,
        "peak_rss_kb": {s.name: s.peak_rss_kb for s in servers},
        "exit_codes": exit_codes,
        "stop_seconds": stop_seconds,
        "clean_exits": clean_exits,
        "s3_errors_by_code": dict(s3_errors),
        "passed": passed,
    }


def _dlq_recovery(changes: list, series: list, load_end: float) -> list:
    """
    After each fault ended: how long until the dead-letter directory was
    first seen empty, C{[(mode, seconds or None, during_load)]}.
    """
    recovery = []
    for (at, mode), (ended, _) in zip(changes, changes[1:]):
        if mode == "pass":
            continue
        empty = next((t for t, files in series if t >= ended and files == 0), None)
        recovery.append((mode, None if empty is None else empty - ended,
                         empty is not None and empty <= load_end))
    return recovery


def _log_findings(servers: list) -> dict:
    """
    Lines of the process logs worth a look: deadline missed, events
    dropped or lost, failures.
    """
    patterns = {
        "deadline_missed": "shutdown deadline of",
        "events_lost": "events lost",
        "dropped": "dropped",
        "tracebacks": "Traceback",
        "quarantined": "quarantine",
        "hurried": "shutdown deadline near",
    }
    found = {}
    for s in servers:
        try:
            text = s.process.log()
        except OSError:
            continue
        for name, needle in patterns.items():
            n = text.count(needle)
            if n:
                found[f"{s.name}:{name}"] = n
    return found


# --- the report -----------------------------------------------------------------


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def markdown_table(r: dict) -> str:
    """
    The results as a Markdown table.
    """
    verdict = "**PASS**" if r["passed"] else "**FAIL**"
    restart = "SIGKILL" if r["sigkill"] else "SIGTERM"
    rows = [
        ("verdict", verdict),
        ("load", f"{r['duration']:g} s, {r['clients']} clients at {_rate(r)} "
                 f"(single events and arrays of 1-{MAX_ARRAY})"),
        ("faults", "500, SlowDown, slow (> S3_TIMEOUT), drop after store, refuse, "
                   f"blackhole {r['blackout']:g} s; mid-run {restart} + restart"),
        ("requests", f"{r['requests']:,} ({_outcomes(r['request_outcomes'])})"),
        ("events sent", f"{r['sent']:,}"),
        ("acknowledged (2xx)", f"{r['acknowledged']:,}"),
        ("stored (distinct ids)", f"{r['stored']:,} in {r['objects']:,} objects "
                                  f"({_prefixes(r['prefixes'])})"),
        ("duplicated (stored more than once)", f"{r['duplicated']:,}"),
        ("lost (acknowledged, not stored)", f"{r['lost']:,}" + _lost_detail(r)),
        ("stored but not acknowledged (client error)", f"{r['stored_not_acknowledged']:,}"),
        ("rejected with 503", f"{r['rejected']:,}"),
        ("rejected with 503 but stored", f"{r['stored_but_rejected']:,}"),
        ("client errors (connection, timeout)",
         f"{r['client_errors']:,} events ({_outcomes(r['client_error_types'])})"),
        ("other statuses", f"{r['other_status']:,}"),
        ("stored lines not from the clients / without _estat",
         f"{r['unknown_stored']:,} / {r['no_server_fields']:,}"),
        ("DLQ peak (/metrics)", f"{r['dlq_peak_files']:,} files, {r['dlq_peak_bytes']:,} B"),
        ("DLQ peak (directory)", f"{r['dlq_dir_peak_files']:,} files, "
                                 f"{r['dlq_dir_peak_bytes']:,} B"),
        ("DLQ at the end", f"{r['dlq_left_files']} files, {r['dlq_quarantined']} quarantined"),
        ("peak RSS (VmHWM)", ", ".join(f"{n} {_mb(kb)}" for n, kb in r["peak_rss_kb"].items())),
        ("exit codes (time to exit)", ", ".join(
            f"{n} {how}: {code} ({r['stop_seconds'].get(n) or 0:.1f} s)"
            for n, how, code in r["exit_codes"])),
        ("S3 put errors by code (last /metrics before each stop)", _outcomes(r["s3_errors_by_code"]) or "none"),
        ("proxy requests (by mode)", _outcomes(r["proxy_requests"])),
        ("DLQ empty again after each fault ended", _recovery(r.get("dlq_recovery", ()))),
        ("log findings", _outcomes(r["logs"]) or "none"),
        ("wall time (whole run)", f"{r['elapsed']:.0f} s"),
    ]
    if r["sigkill"]:
        rows.insert(10, ("in memory at the SIGKILL (approx., from /metrics just before)",
                         f"{r.get('in_memory_at_kill', 0):,}"))
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _rate(r: dict) -> str:
    return f"{r['rate']:g} req/s each" if r["rate"] > 0 else "full speed"


def _recovery(recovery) -> str:
    parts = []
    for mode, seconds, during_load in recovery:
        if seconds is None:
            parts.append(f"{mode}: never")
        else:
            parts.append(f"{mode}: {seconds:.1f} s" + ("" if during_load else
                                                      " (after the load, by the drain)"))
    return ", ".join(parts) or "-"


def _outcomes(counter: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _prefixes(prefixes: dict) -> str:
    return ", ".join(f"{k}/: {v:,}" for k, v in sorted(prefixes.items())) or "none"


def _lost_detail(r: dict) -> str:
    if not r["lost"]:
        return ""
    by = ", ".join(f"acked by generation {g}: {n:,}"
                   for g, n in sorted(r["lost_by_generation"].items()))
    if r["sigkill"]:
        return f" ({by}; the killed process's in-memory events) e.g. {r['lost_examples'][:3]}"
    return f" ({by}) e.g. {r['lost_examples'][:5]}"


def write_report(r: dict, path: str, command: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        "# Estat reliability soak\n\n"
        f"`{command}`, {now}, on {os.cpu_count()} CPUs. Written by `bench/soak.py`.\n\n"
        "Real `twistd estat` behind a fault proxy in front of moto (SigV4 checked), "
        "S3_TIMEOUT=1s, S3_APP_RETRIES=1, BATCH_SIZE=500, FLUSH_INTERVAL=1s, "
        "DLQ_RETRY_INTERVAL=500ms, SHUTDOWN_TIMEOUT=8s, one DLQ_DIR for every process. "
        "Clients retry nothing. *Lost* is acknowledged (2xx) but not in the bucket; "
        "*duplicated* is an id stored more than once. Every object in the bucket is read "
        "back.\n\n"
        + markdown_table(r) + "\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (180)")
    parser.add_argument("--blackout", type=float, default=60.0,
                        help="seconds of S3 blackhole around the restart (60)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (16)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"requests per second per client, 0 for flat out ({DEFAULT_RATE:g})")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 35 s of load, 5 s of blackhole")
    parser.add_argument("--sigkill", action="store_true",
                        help="stop mid-run with SIGKILL instead of SIGTERM")
    parser.add_argument("--output", default=os.path.join(HERE, "SOAK.md"),
                        help="Markdown report (bench/SOAK.md); '' for none")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.blackout = 35.0, 5.0

    def log(text: str) -> None:
        print(text, flush=True)

    result = run_soak(args.duration, args.blackout, args.clients, sigkill=args.sigkill,
                      rate=args.rate, log=log, keep=args.keep)
    table = markdown_table(result)
    print()
    print(table)
    if result["duplicate_examples"]:
        print(f"\nduplicated, e.g.: {result['duplicate_examples']}")
    if result["lost_examples"]:
        print(f"lost, e.g.: {result['lost_examples']}")
    if args.output:
        command = "python bench/soak.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        write_report(result, args.output, command)
        print(f"\nwritten to {os.path.relpath(args.output)}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
