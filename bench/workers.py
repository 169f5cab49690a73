#!/usr/bin/env python
"""
`WORKERS=N` (issue 19): how the port is shared, what a second worker buys
on this machine, and what it costs.

1. Spread of 64 keep-alive connections between 2 processes sharing one
   port, two ways, with the same tiny stand-alone Twisted server (it adopts
   its listening socket with `reactor.adoptStreamPort` and counts the
   connections it accepted): (a) one listening socket bound by the parent
   and inherited by both children (what Estat's supervisor does), (b) a
   socket of its own in each child with `SO_REUSEPORT`.  64 connections
   are opened at once (non-blocking connects in a row, as wrk does), kept
   open until both children's counts add up to 64, then closed; `--rounds`
   rounds.  Each way twice: children idle, and children busy (each burns
   its CPU in 2 ms slices between reactor turns, as a loaded server does).
   Then the real Estat, `WORKERS=2` under wrk -c 64: the established
   connections of each worker pid, sampled with `ss -tnp` during the run.
2. One event per POST (bench/run.py's varied events and wrk script, wrk
   -t1 -c64, 3 s warm-up then `--duration`): `WORKERS=1` pinned to CPU 1
   with wrk on CPU 0, `WORKERS=1` with wrk sharing both CPUs, and
   `WORKERS=2` with wrk sharing both CPUs.  Requests/s, p50/p99, non-2xx.
3. Server CPU per event: user+system of the supervisor and every worker
   (/proc/<pid>/stat) over the run, divided by wrk's 2xx answers (one
   event each; /metrics' events_accepted_total is shown beside as a check).
4. `/metrics` with 2 workers, server idle: `--scrapes` sequential scrapes,
   a new connection each; wall time per scrape (mean, p99) and the server
   CPU per scrape (minus the idle CPU of the same wall time).
5. Peak RSS (VmHWM) of each worker and of the supervisor after the load.

    python bench/workers.py [--duration 10] [--reps 2] [--rounds 10]
                            [--scrapes 200] [--out bench/RESULTS.md]

With --out, the section "## Workers (WORKERS=N, issue 19)" of that file is
replaced (or appended); the rest of the file is kept.  Loopback only;
every process started here is ended by its PID.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import run  # noqa: E402  (bench/run.py: its server, wrk and /proc helpers)
from estat.test.harness import free_port, wait_until  # noqa: E402
from sections import write_section  # noqa: E402

SECTION = "## Workers (WORKERS=N, issue 19)"
CONNECTIONS = 64
WARMUP = 3

SPREAD_CHILD = r"""
import os, socket, sys, time
from twisted.internet import reactor, protocol, task

mode, busy, out = sys.argv[1], sys.argv[2] == "busy", sys.argv[3]
if mode in ("inherit", "inherit1"):
    fd = int(sys.argv[4])
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", int(sys.argv[4])))
    s.listen(1024)
    s.setblocking(False)
    fd = s.fileno()
count = [0]

class Counted(protocol.Protocol):
    def connectionMade(self):
        count[0] += 1

factory = protocol.Factory.forProtocol(Counted)
if mode == "inherit1":
    # Twisted's accept loop capped at one accept() per wake-up.
    from twisted.internet import tcp

    class OnePort(tcp.Port):
        numberAccepts = property(lambda self: 1, lambda self, value: None)

    OnePort._fromListeningDescriptor(reactor, fd, socket.AF_INET, factory).startListening()
else:
    reactor.adoptStreamPort(fd, socket.AF_INET, factory)
if mode == "reuseport":
    s.close()  # the port holds its own duplicate

def write():
    with open(out + ".tmp", "w") as f:
        f.write(str(count[0]))
    os.replace(out + ".tmp", out)

def burn():
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    reactor.callLater(0, burn)

task.LoopingCall(write).start(0.02)
if busy:
    reactor.callWhenRunning(burn)
reactor.run()
"""


def say(text: str) -> None:
    print(text, flush=True)


def read_count(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def open_at_once(port: int, count: int) -> list:
    """
    C{count} connections to C{port}, connects started back to back
    (non-blocking), as wrk opens its connections; returned once all are
    established (the kernel completes them before any accept).
    """
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        # Writable once connected; getsockopt says whether it failed.
        import select

        select.select([], [s], [], 5)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    return socks


def spread(mode: str, busy: bool, rounds: int, work: str) -> list:
    """
    For each round, the connections each of the 2 children accepted.
    """
    script = os.path.join(work, "spread_child.py")
    with open(script, "w") as f:
        f.write(SPREAD_CHILD)
    port = free_port()
    listener = None
    procs = []
    tag = f"{mode}-{'busy' if busy else 'idle'}"
    outs = [os.path.join(work, f"spread-{tag}-{n}") for n in range(2)]
    for out in outs:
        if os.path.exists(out):
            os.unlink(out)
    state = "busy" if busy else "idle"
    try:
        if mode != "reuseport":
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(1024)
            listener.setblocking(False)
            listener.set_inheritable(True)
        for out in outs:
            if mode != "reuseport":
                argv = [sys.executable, script, mode, state, out, str(listener.fileno())]
                procs.append(subprocess.Popen(argv, pass_fds=(listener.fileno(),)))
            else:
                argv = [sys.executable, script, mode, state, out, str(port)]
                procs.append(subprocess.Popen(argv))
        wait_until(lambda: all(os.path.exists(o) for o in outs), 20, 0.05, "spread children")
        if listener is not None:
            # As the supervisor: it serves nothing itself.
            listener.close()
            listener = None
        time.sleep(0.3)
        counts = []
        for _ in range(rounds):
            before = [read_count(o) for o in outs]
            conns = open_at_once(port, CONNECTIONS)
            wait_until(lambda: sum(read_count(o) for o in outs) - sum(before) >= CONNECTIONS,
                       10, 0.02, f"{CONNECTIONS} accepted")
            time.sleep(0.05)
            counts.append([read_count(o) - b for o, b in zip(outs, before)])
            for c in conns:
                c.close()
            time.sleep(0.15)
        return counts
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if listener is not None:
            listener.close()


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def family(pid: int) -> list:
    return [pid] + children(pid)


def family_cpu(pid: int) -> float:
    return sum(run.cpu_seconds(p) for p in family(pid))


def connections_per_pid(port: int) -> Counter:
    """
    The established connections on the server side of C{port}, by the pid
    holding each.
    """
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    counts = Counter()
    for line in out.splitlines():
        pids = set(int(p) for p in re.findall(r"pid=(\d+)", line))
        for pid in pids:
            counts[pid] += 1
    return counts


def listening_workers(server) -> int:
    try:
        with open(server.log.name, errors="replace") as f:
            return f.read().count("HTTPListenerService#info] listening on")
    except OSError:
        return 0


def scenario(name: str, workers: int, server_cpu: str, load_cpu: str, duration: float,
             work: str, script: str, scrapes: int) -> dict:
    run.SERVER_CPU, run.LOAD_CPU = server_cpu, load_cpu
    directory = tempfile.mkdtemp(prefix="run-", dir=work)
    server = run.start_estat(directory, {"WORKERS": str(workers)})
    try:
        if workers > 1:
            wait_until(lambda: len(children(server.pid)) == workers, 30, 0.05, "workers")
            wait_until(lambda: listening_workers(server) >= workers, 30, 0.05,
                       "every worker listening")
        run.run_wrk(server.port, script, WARMUP)
        # The workers' /metrics snapshots are written every second.
        time.sleep(1.2)
        before_by_pid = {p: run.cpu_seconds(p) for p in family(server.pid)}
        before_cpu = sum(before_by_pid.values())
        before = server.metrics()
        sampled = []
        stop = threading.Event()

        def sample():
            # The first sample once wrk has its connections open.
            wait = 1.0
            while not stop.wait(wait):
                sampled.append(connections_per_pid(server.port))
                wait = max(1.0, duration / 5)

        sampler = threading.Thread(target=sample, daemon=True)
        if workers > 1:
            sampler.start()
        reaped = os.times()
        w = run.run_wrk(server.port, script, duration)
        done = os.times()
        # wrk (taskset execs it) is the only child reaped meanwhile, but ss.
        wrk_cpu = (done.children_user - reaped.children_user
                   + done.children_system - reaped.children_system)
        stop.set()
        if workers > 1:
            sampler.join()
        after_by_pid = {p: run.cpu_seconds(p) for p in family(server.pid)}
        after_cpu = sum(after_by_pid.values())
        busy_by_pid = {p: (after_by_pid[p] - before_by_pid.get(p, 0.0)) / duration
                       for p in after_by_pid}
        rss = {p: run.peak_rss_mb(p) for p in family(server.pid)}
        time.sleep(1.2)
        after = server.metrics()
        ok = w["requests"] - w["non2xx"]
        cpu = after_cpu - before_cpu
        result = {
            "name": name, "workers": workers, "rps": w["requests"] / duration,
            "p50": w["p50"], "p99": w["p99"], "non2xx": w["non2xx"], "errors": w["errors"],
            "ok": ok, "cpu": cpu, "server_cpus": cpu / duration, "wrk_cpus": wrk_cpu / duration,
            "metrics_events": after.get("events_accepted_total", 0)
            - before.get("events_accepted_total", 0),
            "cpu_us_per_event": cpu / ok * 1e6 if ok else None,
            "rss": rss, "supervisor": server.pid, "connections": sampled,
            "worker_pids": children(server.pid) if workers > 1 else [server.pid],
            "busy_by_pid": busy_by_pid,
        }
        if workers > 1:
            result["scrape"] = scrape_cost(server, scrapes)
        return result
    finally:
        code = server.stop()
        if code not in (0, None):
            say(f"   ({name}: server exited {code}; see {server.log.name})")


def scrape_cost(server, count: int) -> dict:
    """
    C{count} sequential scrapes of the idle server, a new connection each.
    """
    pids = family(server.pid)
    # The idle CPU (the workers' snapshots every second, timers).
    idle_started, idle_before = time.monotonic(), family_cpu(server.pid)
    time.sleep(3)
    idle_rate = (family_cpu(server.pid) - idle_before) / (time.monotonic() - idle_started)
    started, before = time.monotonic(), family_cpu(server.pid)
    times = []
    body = b""
    for _ in range(count):
        t = time.perf_counter()
        status, body = run.get(server.port, "/metrics")
        times.append(time.perf_counter() - t)
        assert status == 200, status
    elapsed = time.monotonic() - started
    cpu = family_cpu(server.pid) - before
    assert family(server.pid) == pids, "a worker was restarted during the scrapes"
    text = body.decode()
    times.sort()
    return {
        "count": count,
        "mean_ms": statistics.mean(times) * 1e3,
        "p50_ms": times[len(times) // 2] * 1e3,
        "p99_ms": times[math.ceil(len(times) * 0.99) - 1] * 1e3,
        "cpu_ms": cpu / count * 1e3,
        "net_cpu_ms": (cpu - idle_rate * elapsed) / count * 1e3,
        "idle_cpu_pct": idle_rate * 100,
        "bytes": len(body),
        "aggregated": bool(re.search(r'^http_connections_open\{[^}]*worker="', text, re.M)),
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rng(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def pct(v: float) -> str:
    return f"{v * 100:.0f} %"



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--reps", type=int, default=2, help="runs of each layout")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds of 64 connections for each way of sharing the port")
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--out", default=None, help="RESULTS.md to update")
    args = parser.parse_args()
    command = "python bench/workers.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    for tool in ("wrk", "taskset", "ss"):
        if shutil.which(tool) is None:
            say(f"{tool} is not installed")
            return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        say("needs 2 CPUs")
        return 2
    started = time.monotonic()
    load_before = loadavg()
    work = tempfile.mkdtemp(prefix="estat-bench-workers-")
    script = os.path.join(work, "single.lua")
    with open(script, "w") as f:
        f.write(run.LUA_SINGLE)
    both = f"{cpus[0]},{cpus[1]}"

    ways = [(mode, busy) for busy in (False, True) for mode in ("inherit", "reuseport", "inherit1")]
    spreads = {}
    for mode, busy in ways:
        counts = spread(mode, busy, args.rounds, work)
        spreads[mode, busy] = counts
        say(f"== spread, {mode}, {'busy' if busy else 'idle'} children: "
            + " ".join(f"{a}/{b}" for a, b in counts))

    layouts = [
        (f"WORKERS=1, server on CPU {cpus[1]}, wrk on CPU {cpus[0]}", 1, str(cpus[1]),
         str(cpus[0])),
        (f"WORKERS=1, server and wrk on CPUs {both}", 1, both, both),
        (f"WORKERS=2, server and wrk on CPUs {both}", 2, both, both),
    ]
    results = {name: [] for name, *_ in layouts}
    for rep in range(args.reps):
        for name, workers, server_cpu, load_cpu in layouts:
            r = scenario(name, workers, server_cpu, load_cpu, args.duration, work, script,
                         args.scrapes)
            results[name].append(r)
            say(f"== {name} (run {rep + 1}/{args.reps}): {r['rps']:,.0f} req/s, "
                f"p50 {r['p50']} ms, p99 {r['p99']} ms, non-2xx {r['non2xx']}, "
                f"socket errors {r['errors']}, "
                f"{r['cpu_us_per_event']:.1f} µs server CPU/event, CPUs busy "
                f"{r['server_cpus']:.2f} server + {r['wrk_cpus']:.2f} wrk "
                f"({r['ok']:,} 2xx, /metrics +{r['metrics_events']:,.0f} events)")
            if workers > 1:
                say("   CPUs busy: supervisor "
                    f"{r['busy_by_pid'].get(r['supervisor'], 0):.2f}, workers "
                    + " / ".join(f"{p}: {r['busy_by_pid'].get(p, 0):.2f}"
                                 for p in r["worker_pids"]))
            for sample in r["connections"]:
                say("   established per pid: " + ", ".join(
                    f"{pid}{'' if pid in r['worker_pids'] else ' (not a worker!)'}: {n}"
                    for pid, n in sorted(sample.items())))
    shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started

    lines = [
        SECTION, "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {run._code_version()}; "
        f"{total:.0f} s in all. A shared machine: other work may have run at the same time "
        f"(load average {load_before} before, {loadavg()} after).",
        "",
        f"### Sharing the port: {CONNECTIONS} connections opened at once, 2 processes", "",
        "Two tiny stand-alone Twisted servers (`reactor.adoptStreamPort`, a connection "
        "counter); the connections are opened back to back with non-blocking connects, held "
        "until both counts add up to 64, then closed. Busy: each server burns its CPU in "
        "2 ms slices between reactor turns. The children are not pinned.",
        "",
        f"| way | servers | busiest process's share, min / mean / max of {args.rounds} rounds "
        "| rounds with both at 40-60 % |",
        "| --- | --- | --- | --- |",
    ]
    labels = {"inherit": "one socket bound by the parent, inherited by both (Estat's supervisor)",
              "reuseport": "a socket of its own in each, SO_REUSEPORT",
              "inherit1": "inherited, as Estat's, but one accept() per wake-up "
                          "(Twisted's accept loop capped at 1; a diagnostic)"}
    for mode, busy in ways:
        counts = spreads[mode, busy]
        shares = [max(c) / sum(c) for c in counts]
        within = sum(1 for s in shares if s <= 0.60)
        lines.append(f"| {labels[mode]} | {'busy' if busy else 'idle'} | {pct(min(shares))} / "
                     f"{pct(statistics.mean(shares))} / {pct(max(shares))} | "
                     f"{within} of {len(shares)} |")
    lines.append("")

    two_name = layouts[2][0]
    worker_shares = []
    per_worker = []
    worker_busy = "; ".join(
        " / ".join(f"{r['busy_by_pid'].get(p, 0):.2f}" for p in r["worker_pids"])
        + f" (supervisor {r['busy_by_pid'].get(r['supervisor'], 0):.2f})"
        for r in results[two_name])
    for r in results[two_name]:
        for sample in r["connections"]:
            counts = [sample.get(p, 0) for p in r["worker_pids"]]
            if sum(counts):
                worker_shares.append(max(counts) / sum(counts))
                per_worker.append("/".join(str(c) for c in counts))
    if worker_shares:
        lines += [f"The real Estat, WORKERS=2 under wrk -c{CONNECTIONS}: established "
                  f"connections per worker (`ss -tnp`, {len(worker_shares)} samples over "
                  f"{len(results[two_name])} runs): {', '.join(per_worker)}; the busiest "
                  f"worker held {pct(min(worker_shares))} to {pct(max(worker_shares))}. "
                  f"CPUs busy per worker in those runs: {worker_busy}.", ""]

    lines += [
        "### One event per POST: throughput, CPU, memory", "",
        f"wrk -t1 -c{CONNECTIONS} with bench/run.py's varied events, {WARMUP} s warm-up then "
        f"{args.duration:.0f} s; {args.reps} runs of each layout, median (min-max). Server CPU: "
        "user+system of the supervisor and its workers over the run / wrk's 2xx answers "
        "(the /metrics column is events_accepted_total's increase, a check). CPUs busy: "
        "CPU seconds per second of the run, the server's (all its processes) and wrk's.",
        "",
        "| layout | requests/s | p50 ms | p99 ms | non-2xx | socket errors "
        "| server CPU µs/event | CPUs busy: server + wrk | events per /metrics vs 2xx "
        "| peak RSS MB (last run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    figures = {}
    for name, *_ in layouts:
        rs = results[name]
        last = rs[-1]
        if last["workers"] > 1:
            rss = ", ".join([f"supervisor {last['rss'][last['supervisor']]:.0f}"]
                            + [f"worker {last['rss'][p]:.0f}" for p in last["worker_pids"]
                               if p in last["rss"]])
        else:
            rss = f"{last['rss'][last['supervisor']]:.0f}"
        figures[name] = (median([r["rps"] for r in rs]),
                         median([r["cpu_us_per_event"] for r in rs]))
        checks = "; ".join(f"{r['metrics_events']:,.0f} / {r['ok']:,}" for r in rs)
        lines.append(
            f"| {name} | {rng([r['rps'] for r in rs], lambda v: f'{v:,.0f}')} | "
            f"{rng([r['p50'] for r in rs], lambda v: f'{v:.2f}')} | "
            f"{rng([r['p99'] for r in rs], lambda v: f'{v:.2f}')} | "
            f"{sum(r['non2xx'] for r in rs)} | {sum(r['errors'] for r in rs)} | "
            f"{rng([r['cpu_us_per_event'] for r in rs], lambda v: f'{v:.1f}')} | "
            f"{median([r['server_cpus'] for r in rs]):.2f} + "
            f"{median([r['wrk_cpus'] for r in rs]):.2f} | "
            f"{checks} | {rss} |")
    lines.append("")

    scrapes = [r["scrape"] for r in results[two_name] if "scrape" in r]
    if scrapes:
        aggregated = all(s["aggregated"] for s in scrapes)
        lines += [
            f"### /metrics with 2 workers, idle server: {args.scrapes} sequential scrapes, "
            "a new connection each", "",
            "| run | mean ms | p50 ms | p99 ms | server CPU ms/scrape (minus idle) "
            "| idle server CPU | bytes | aggregated over workers |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for i, s in enumerate(scrapes, 1):
            lines.append(f"| {i} | {s['mean_ms']:.2f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                         f"{s['cpu_ms']:.2f} ({s['net_cpu_ms']:.2f}) | "
                         f"{s['idle_cpu_pct']:.1f} % | {s['bytes']:,} | "
                         f"{'yes' if s['aggregated'] else 'no'} |")
        lines += ["", "Aggregated: `http_connections_open` lines carry a `worker` label "
                  f"({'so every scrape merged both workers' if aggregated else 'not in place: each scrape showed the answering worker only'}).",
                  ""]

    one, shared, two = (figures[n] for n, *_ in layouts)
    rs2 = results[two_name]
    worker_rss = [r["rss"][p] for r in rs2 for p in r["worker_pids"] if p in r["rss"]]
    sup_rss = [r["rss"][r["supervisor"]] for r in rs2]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines += ["### Issue 19's targets", "", "| target | figure | met? |", "| --- | --- | --- |"]
    inherit_idle = [max(c) / sum(c) for c in spreads["inherit", False]]
    inherit_busy = [max(c) / sum(c) for c in spreads["inherit", True]]
    lines.append(f"| each worker 40-60 % of {CONNECTIONS} keep-alive connections | "
                 f"busiest: Estat under wrk "
                 f"{pct(min(worker_shares)) + '-' + pct(max(worker_shares)) if worker_shares else '-'}"
                 f"; inherited socket {pct(statistics.mean(inherit_idle))} idle, "
                 f"{pct(statistics.mean(inherit_busy))} busy (mean) | "
                 f"{met(bool(worker_shares) and max(worker_shares) <= 0.60)} |")
    lines.append(f"| requests/s, WORKERS=2 on both CPUs ≥ 1.5x WORKERS=1 on one CPU | "
                 f"{two[0]:,.0f} / {one[0]:,.0f} = {two[0] / one[0]:.2f}x (vs WORKERS=1 sharing "
                 f"both CPUs with wrk, {shared[0]:,.0f}: {two[0] / shared[0]:.2f}x) | "
                 f"{met(two[0] / one[0] >= 1.5)} |")
    lines.append(f"| server CPU per event, 2 workers within 10 % of 1 | {two[1]:.1f} vs "
                 f"{one[1]:.1f} µs ({two[1] / one[1] - 1:+.0%}; WORKERS=1 sharing: "
                 f"{shared[1]:.1f} µs) | {met(abs(two[1] / one[1] - 1) <= 0.10)} |")
    if scrapes:
        s = scrapes[-1]
        lines.append(f"| /metrics cost per scrape, 2 workers | {s['mean_ms']:.2f} ms mean, "
                     f"{s['p99_ms']:.2f} ms p99, {s['net_cpu_ms']:.2f} ms server CPU | "
                     "reported |")
    lines.append(f"| peak RSS ≤ 100 MB per worker, supervisor ≤ 40 MB | workers "
                 f"{max(worker_rss):.0f} MB at most, supervisor {max(sup_rss):.0f} MB | "
                 f"{met(max(worker_rss) <= 100 and max(sup_rss) <= 40)} |")
    lines.append("")
    text = "\n".join(lines)
    say("")
    say(text)
    if args.out:
        write_section(args.out, text, SECTION)
        say(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
