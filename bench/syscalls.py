#!/usr/bin/env python
"""
System calls per request of the real C{twistd estat} under the bench's
single-event wrk load (64 keep-alive connections, server on CPU 0, wrk on
CPU 1, as C{bench/run.py}).

Two counts of the same kind of run, each over its own fixed wrk run:

 - C{strace -c -f -p <server pid>}: every thread's calls by name.  ptrace
   slows the server several times over, so its requests/s mean nothing;
   the calls per request do.
 - C{perf stat} on the syscall tracepoints: the same counts at full speed
   (no ptrace), with the requests/s, the server's CPU per request (user and
   system from /proc/<pid>/stat) and how often the server wakes another
   task (C{sched:sched_waking}: mostly wrk, woken by an answer; each costs
   the sender an IPI, and a VM exit on a VM).

Loopback only; every process started here is ended by its PID.

    python bench/syscalls.py [--duration 5] [--estat-path <checkout>] [--batch]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402

#: The calls worth a column; everything else is summed in "other".
NAMED = ("recvfrom", "sendto", "epoll_wait", "epoll_ctl", "futex", "write", "read")
TRACEPOINTS = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{name}" for name in NAMED]


def strace_counts(pid: int, port: int, script: str, duration: float) -> dict:
    out = tempfile.NamedTemporaryFile(prefix="estat-strace-", suffix=".txt", delete=False)
    out.close()
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out.name],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached to every thread
        w = bench.run_wrk(port, script, duration)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    with open(out.name) as f:
        text = f.read()
    os.unlink(out.name)
    calls = {}
    for line in text.splitlines():
        # % time  seconds  usecs/call  calls  [errors]  syscall
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$", line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    return {"requests": w["requests"], "calls": calls, "errors": w["errors"]}


def cpu_times(pid: int) -> tuple:
    """
    User and system CPU seconds of every thread of C{pid} so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / bench.CLK_TCK, int(fields[12]) / bench.CLK_TCK


def perf_counts(pid: int, port: int, script: str, duration: float) -> dict:
    out = tempfile.NamedTemporaryFile(prefix="estat-perf-", suffix=".txt", delete=False)
    out.close()
    events = ",".join(TRACEPOINTS + ["sched:sched_waking", "task-clock"])
    # perf stat -p counts every thread of the process; it stops on SIGINT.
    counter = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(pid),
                                "-o", out.name], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        user, system = cpu_times(pid)
        w = bench.run_wrk(port, script, duration)
        user_after, system_after = cpu_times(pid)
        elapsed = time.monotonic() - started
    finally:
        counter.send_signal(signal.SIGINT)
        counter.wait(30)
    counts = {}
    with open(out.name) as f:
        for line in f:
            fields = line.strip().split(",")
            if len(fields) > 2 and fields[0].replace(".", "").isdigit():
                counts[fields[2]] = float(fields[0])
    os.unlink(out.name)
    calls = {name.rsplit("sys_enter_", 1)[-1]: counts.get(name, 0) for name in TRACEPOINTS[1:]}
    calls["all"] = counts.get("raw_syscalls:sys_enter", 0)
    return {"requests": w["requests"], "calls": calls, "errors": w["errors"],
            "wakeups": counts.get("sched:sched_waking", 0) / max(w["requests"], 1),
            "rps": w["requests"] / duration, "elapsed": elapsed,
            "user_us": (user_after - user) * 1e6 / max(w["requests"], 1),
            "system_us": (system_after - system) * 1e6 / max(w["requests"], 1),
            "cpu_us_per_request": counts.get("task-clock", 0) * 1e3 / w["requests"]
            if w["requests"] else None}


def per_request(calls: dict, requests: int) -> dict:
    return {name: count / requests for name, count in calls.items()} if requests else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--estat-path", default="",
                        help="serve from this checkout of estat (a 'before' run)")
    parser.add_argument("--batch", action="store_true", help="100 events per POST")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--no-perf", action="store_true")
    args = parser.parse_args()
    bench.ESTAT_PATH = os.path.abspath(args.estat_path) if args.estat_path else ""
    for tool in ("wrk", "taskset") + (() if args.no_strace else ("strace",)) + (
            () if args.no_perf else ("perf",)):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="estat-syscalls-")
    script = os.path.join(work, "load.lua")
    with open(script, "w") as f:
        f.write(bench.LUA_BATCH if args.batch else bench.LUA_SINGLE)
    server = bench.start_estat(work, {"RAW_PREFIX": "raw-syscalls"})
    try:
        bench.run_wrk(server.port, script, 2)  # warm-up
        print(f"{bench._code_version()}, {'100 events' if args.batch else '1 event'} per POST, "
              f"{args.duration:.0f} s of wrk per count")
        if not args.no_strace:
            s = strace_counts(server.pid, server.port, script, args.duration)
            calls = s["calls"]
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
            total = sum(calls.values())
            print(f"strace -c -f: {s['requests']:,} requests (ptrace-slowed), "
                  f"{total / s['requests']:.2f} system calls per request, all threads:")
            for name, count in top:
                print(f"   {name:<14} {count / s['requests']:6.3f} per request ({count:,})")
        if not args.no_perf:
            p = perf_counts(server.pid, server.port, script, args.duration)
            r = per_request(p["calls"], p["requests"])
            named = sum(v for k, v in r.items() if k != "all")
            print(f"perf stat: {p['rps']:,.0f} requests/s, "
                  f"{p['cpu_us_per_request']:.1f} us of server CPU per request "
                  f"({p['user_us']:.1f} user, {p['system_us']:.1f} system), "
                  f"{r.get('all', 0):.2f} system calls per request:")
            print("   " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "all")
                  + f", other {r.get('all', 0) - named:.3f}; "
                  f"{p['wakeups']:.3f} wake-ups of other tasks per request")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
