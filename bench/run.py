#!/usr/bin/env python
"""
Estat's throughput benchmark (`make bench`).

The real `twistd estat` runs pinned to one CPU (taskset -c 0); wrk drives it
from the other CPU (taskset -c 1) over 64 keep-alive connections with varied
events of about 300-500 bytes, never one body repeated.  Each scenario runs
several times; the table shows the median and the min-max.

Scenarios:
  baseline      a minimal Klein app that parses the JSON and answers 202
  single-local  one event per POST, local directory store
  batch-local   100 events per POST (JSON array), local directory store
  single-s3     one event per POST, moto S3 server on loopback
  batch-s3      100 events per POST, moto S3 server
  half-rate     one event per POST at half the measured maximum: p50/p99
  single-disk   one event per POST, ACK_MODE=disk (write-ahead log), local store
  batch-disk    100 events per POST, ACK_MODE=disk, local store
  half-rate-disk  ACK_MODE=disk at half the memory mode's maximum: p50/p99
  single-stored one event per POST, ACK_MODE=stored, FLUSH_INTERVAL=200ms, local store
  single-quarantine  one event per POST, a tracking plan in quarantine mode
                (bench/schemas/bench-plan-event.json, 15 properties), every event valid
  batch-quarantine   100 events per POST, the same plan, 10 % of the events invalid
                (a user_id that fails its pattern): stored good + bad counted
                against accepted
  outage        S3 answers 503 SlowDown for 60 s under steady load

Server CPU is read from /proc/<pid>/stat (user+system), peak RSS from
VmHWM.  Loopback only; every process started here is ended by its PID.

    python bench/run.py [--duration 10] [--reps 3] [--outage 60] [--quick]
                        [--only single-local,single-disk,...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from estat.test.harness import FaultProxy, MotoServer, free_port, parse_metrics, wait_until  # noqa: E402

#: --estat-path: run the servers from another checkout (see start_estat).
ESTAT_PATH = ""
#: --reactor: the twistd options that choose the server's reactor (the
#: estat reactor, as README's commands start it, for the scripts that call
#: start_estat without main()).
REACTOR_ARGS: list = ["--reactor=estat"]
SERVER_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA_COMMON = r"""
local paths = {"/", "/pricing", "/docs/getting-started", "/blog/2026/11/launch-week",
  "/signup", "/account/settings", "/products/42?ref=home", "/search?q=twisted+python"}
local uas = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
  "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
  "okhttp/4.12.0", "python-requests/2.32.3"}
local events = {"page_view", "click", "scroll", "signup", "purchase", "search"}
local titles = {"Café crème – menu", "東京の天気", "Überraschung! 🎉", "naïve résumé",
  "Pricing — Estat"}
local thread_id = math.random(1, 1e9)
local n = 0
function event()
  n = n + 1
  return string.format(
    '{"event":"%s","id":"%d-%d-%d","user_id":"u-%d","session_id":"s-%08x","path":"%s",' ..
    '"referrer":"https://ref%d.example.com/p/%d","ua":"%s","screen":{"w":%d,"h":%d},' ..
    '"value":%d.%02d,"items":%d,"tags":["t%d","t%d"],"client_ts":%d,' ..
    '"title":"%s","props":{"plan":"%s","ab":{"exp":"e%d","arm":%d}}}',
    events[math.random(#events)], thread_id, n, math.random(1e6), math.random(1e6),
    math.random(0, 0x7fffffff), paths[math.random(#paths)], math.random(50), math.random(1e4),
    uas[math.random(#uas)], 320 + math.random(2000), 480 + math.random(1200),
    math.random(0, 9999), math.random(0, 99), math.random(0, 20), math.random(100),
    math.random(100), 1764000000000 + n,
    titles[math.random(#titles)], (math.random(2) == 1) and "free" or "pro",
    math.random(20), math.random(0, 3))
end
"""

LUA_SINGLE = LUA_COMMON + r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function() return wrk.format(nil, "/collect", nil, event()) end
"""

LUA_BATCH = LUA_COMMON + r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local parts = {}
  for i = 1, 100 do parts[i] = event() end
  return wrk.format(nil, "/collect", nil, "[" .. table.concat(parts, ",") .. "]")
end
"""

LUA_BATCH_INVALID = LUA_COMMON + r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local parts = {}
  for i = 1, 100 do
    local e = event()
    if i % 10 == 0 then
      -- fails the plan's user_id pattern (^u-[0-9]+$): quarantined
      e = string.gsub(e, '"user_id":"u%-', '"user_id":"x-', 1)
    end
    parts[i] = e
  end
  return wrk.format(nil, "/collect", nil, "[" .. table.concat(parts, ",") .. "]")
end
"""

#: The tracking plan of the quarantine scenarios (written to the bench's
#: temporary directory beside a copy of its schema).
BENCH_PLAN = "collect: {mode: quarantine, default: {file: bench-plan-event.json}}\n"

LUA_RATE = LUA_SINGLE + r"""
local interval_ms = tonumber(os.getenv("BENCH_INTERVAL_MS") or "0")
delay = function() return interval_ms end
"""

BASELINE_APP = r"""
import sys, orjson
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site
FORMS = sys.argv[2] == "forms"
app = Klein()
@app.route("/collect", methods=["POST"])
def collect(request):
    obj = orjson.loads(request.content.read())
    request.setResponseCode(202)
    request.setHeader(b"content-type", b"application/json")
    return b'{"accepted":1}'
reactor.listenTCP(int(sys.argv[1]), Site(app.resource(), parsePOSTFormSubmission=FORMS),
                  interface="127.0.0.1")
reactor.run()
"""


def say(text: str) -> None:
    print(text, flush=True)


def twistd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """
    A process pinned to the server CPU, listening on a loopback port.
    """

    def __init__(self, argv: list, env: dict, directory: str, port: int) -> None:
        self.port = port
        self.directory = directory
        self.log = open(os.path.join(directory, "server.log"), "ab")
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *argv], env=env,
                                     cwd=directory, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        wait_until(self._ready, 30, 0.1, f"server on port {port}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log.name}")
        try:
            return get(self.port, "/healthz")[0] in (200, 404)
        except OSError:
            return False

    def metrics(self) -> dict:
        return parse_metrics(get(self.port, "/metrics")[1].decode())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def start_estat(directory: str, extra: dict) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "HTTP_ADDR": f"127.0.0.1:{port}",
        "LOCAL_STORE_DIR": os.path.join(directory, "store"),
        "DLQ_DIR": os.path.join(directory, "dlq"),
        "WAL_DIR": os.path.join(directory, "wal"),
        "INSTANCE_ID": "bench",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.path.join(directory, "none"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(directory, "none"),
    })
    env.update(extra)
    if ESTAT_PATH:
        # Another checkout's estat (the "before" of a change), on this venv.
        env["PYTHONPATH"] = ESTAT_PATH
    return Server([twistd(), "-n", "--pidfile=", *REACTOR_ARGS, "estat"], env, directory, port)


def start_baseline(directory: str, forms: bool = True) -> Server:
    port = free_port()
    path = os.path.join(directory, "baseline.py")
    with open(path, "w") as f:
        f.write(BASELINE_APP)
    return Server([sys.executable, path, str(port), "forms" if forms else "noforms"],
                  dict(os.environ), directory, port)


def run_wrk(port: int, script: str, duration: float, connections: int = 64,
            env: dict | None = None) -> dict:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s",
         "--latency", "-s", script, f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=duration + 60,
        env={**os.environ, **(env or {})})
    text = out.stdout
    result = {"requests": 0, "non2xx": 0, "p50": None, "p99": None, "errors": 0}
    m = re.search(r"(\d+) requests in", text)
    if m:
        result["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        result["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        result["errors"] = sum(int(x) for x in m.groups())
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            value = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            result["p" + pct] = value
    result["raw"] = text
    return result


def measure(server: Server, script: str, duration: float, events_per_request: int,
            env: dict | None = None) -> dict:
    before_cpu = cpu_seconds(server.pid)
    before = server.metrics() if events_per_request else {}
    started = time.monotonic()
    w = run_wrk(server.port, script, duration, env=env)
    elapsed = time.monotonic() - started
    after_cpu = cpu_seconds(server.pid)
    ok = w["requests"] - w["non2xx"]
    if events_per_request:
        after = server.metrics()
        events = after.get("events_accepted_total", 0) - before.get("events_accepted_total", 0)
        rejected = (after.get("http_requests_rejected_queue_full_total", 0)
                    - before.get("http_requests_rejected_queue_full_total", 0))
    else:
        events, rejected = ok, w["non2xx"]
    return {
        "rps": w["requests"] / duration,
        "eps": events / duration,
        "p50": w["p50"], "p99": w["p99"],
        "cpu_us_per_event": (after_cpu - before_cpu) / events * 1e6 if events else None,
        "rejected": rejected,
        "errors": w["errors"],
        "elapsed": elapsed,
    }


def _code_version() -> str:
    root = ESTAT_PATH or ROOT
    try:
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        rev = "?"
    reactor = REACTOR_ARGS[0].split("=", 1)[1] if REACTOR_ARGS else "Twisted's default"
    return (f"estat at {rev}" + (f" ({root})" if ESTAT_PATH else "")
            + f", reactor {reactor}")


def summary(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    fmt = (lambda v: f"{v:,.0f}") if med >= 100 else (lambda v: f"{v:.2f}")
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def drain_and_count(server: Server, store: str, moto: MotoServer | None, prefix: str) -> dict:
    m = server.metrics()
    rc = server.stop()
    if moto is not None:
        objects = len(moto.keys(prefix + "/"))
    else:
        objects = sum(len(files) for _, _, files in os.walk(os.path.join(store, prefix)))
    return {"objects": objects, "exit": rc, "stored_before_stop": m.get("s3_events_stored_total", 0)}


def count_lines(directory: str) -> int:
    """
    Events in the gzip JSON Lines objects under C{directory}.
    """
    import gzip

    count = 0
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".jsonl.gz"):
                with gzip.open(os.path.join(root, name), "rb") as f:
                    count += sum(1 for line in f if line.strip())
    return count


def quarantine_notes(medians: dict) -> list:
    """
    Issue 18's targets: single-quarantine >= 90 % of single-local's
    requests/s; batch-quarantine >= 90 % of batch-local's events/s, lost 0.
    """
    notes = []
    for name, base, index, what in (("single-quarantine", "single-local", 0, "requests/s"),
                                    ("batch-quarantine", "batch-local", 1, "events/s")):
        if name not in medians:
            continue
        line = f"{name}: {medians[name][index]:,.0f} {what}"
        if base in medians:
            line += (f", {medians[name][index] / medians[base][index]:.0%} of {base}'s "
                     f"{medians[base][index]:,.0f} (target >= 90 %)")
        accepted, good, bad = medians[name + ":stored"]
        line += (f"; accepted {accepted:,.0f} events, stored {good:,} good + {bad:,} bad, "
                 f"lost {accepted - good - bad:,.0f}.")
        notes.append(line)
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--outage", type=float, default=60)
    parser.add_argument("--quick", action="store_true", help="1 rep of 5 s, 20 s outage")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--estat-path", default="",
                        help="serve from this checkout of estat instead (a 'before' run)")
    parser.add_argument("--reactor", default=None,
                        help="twistd's --reactor for the server: 'estat' (default, as README's "
                             "commands start it) where the checkout has estat/http/reactor.py, "
                             "else Twisted's default; 'default' for Twisted's")
    args = parser.parse_args()
    global ESTAT_PATH, REACTOR_ARGS
    ESTAT_PATH = os.path.abspath(args.estat_path) if args.estat_path else ""
    reactor = args.reactor
    if reactor is None:
        has_it = os.path.exists(os.path.join(ESTAT_PATH or ROOT, "estat", "http", "reactor.py"))
        reactor = "estat" if has_it else "default"
    REACTOR_ARGS = [] if reactor == "default" else [f"--reactor={reactor}"]
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    if args.quick:
        args.duration, args.reps, args.outage = 5, 1, 20
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            say(f"{tool} is not installed (apt-get install wrk util-linux)")
            return 2
    work = tempfile.mkdtemp(prefix="estat-bench-")
    scripts = {}
    for name, text in (("single", LUA_SINGLE), ("batch", LUA_BATCH), ("rate", LUA_RATE),
                       ("batch-invalid", LUA_BATCH_INVALID)):
        scripts[name] = os.path.join(work, f"{name}.lua")
        with open(scripts[name], "w") as f:
            f.write(text)

    rows = []
    notes = []
    moto = None
    base_rps = None
    outage = None
    try:
      if want("baseline"):
        for forms, label in ((True, "baseline: naive Klein app (form parsing on), no pipeline"),
                             (False, "baseline: Klein app, form parsing off, no pipeline")):
            say(f"== {label}: {args.reps} x {args.duration:.0f}s")
            base = start_baseline(tempfile.mkdtemp(dir=work), forms=forms)
            runs = []
            for i in range(args.reps):
                runs.append(measure(base, scripts["single"], args.duration, 0))
                say(f"   run {i + 1}: {runs[-1]['rps']:,.0f} req/s")
            base_rss = peak_rss_mb(base.pid)
            base.stop()
            if forms:
                base_rps = statistics.median(r["rps"] for r in runs)
            rows.append((label[len("baseline: "):], runs, base_rss, None, 1))

      if any(want(n) for n in ("single-s3", "batch-s3", "outage")):
        moto = MotoServer()
        say(f"   moto S3 on {moto.endpoint} (SigV4 checked)")
        s3_env = {"RAW_BUCKET": moto.bucket, "S3_ENDPOINT_URL": moto.endpoint,
                  "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": moto.access_key,
                  "AWS_SECRET_ACCESS_KEY": moto.secret_key}
      else:
        s3_env = None
      if True:
        single_max = None
        disk_env = {"ACK_MODE": "disk"}
        stored_env = {"ACK_MODE": "stored", "FLUSH_INTERVAL": "200ms"}
        # Parquet with the columns of the bench's events declared (issue 17:
        # >= 95 % of jsonl mode's requests/s and events/s).
        parquet_env = {"OUTPUT_FORMAT": "parquet",
                       "COLLECT_SCHEMA": os.path.join(HERE, "schemas", "bench-event.json")}
        # Issue 18: a tracking plan in quarantine mode.
        plan_dir = os.path.join(work, "plan")
        os.makedirs(plan_dir)
        shutil.copy(os.path.join(HERE, "schemas", "bench-plan-event.json"), plan_dir)
        with open(os.path.join(plan_dir, "plan.yaml"), "w") as f:
            f.write(BENCH_PLAN)
        plan_env = {"SCHEMAS": os.path.join(plan_dir, "plan.yaml")}
        medians = {}
        for name, script, per_request, extra in (
            ("single-local", "single", 1, {}),
            ("batch-local", "batch", 100, {}),
            ("single-s3", "single", 1, s3_env),
            ("batch-s3", "batch", 100, s3_env),
            ("single-disk", "single", 1, disk_env),
            ("batch-disk", "batch", 100, disk_env),
            ("single-stored", "single", 1, stored_env),
            ("single-parquet", "single", 1, parquet_env),
            ("batch-parquet", "batch", 100, parquet_env),
            ("single-quarantine", "single", 1, plan_env),
            ("batch-quarantine", "batch-invalid", 100, plan_env),
        ):
            if not want(name):
                continue
            say(f"== {name}: {args.reps} x {args.duration:.0f}s")
            directory = tempfile.mkdtemp(dir=work)
            prefix = f"raw-{name}"
            server = start_estat(directory, {"RAW_PREFIX": prefix, **extra})
            runs = []
            for i in range(args.reps):
                runs.append(measure(server, scripts[script], args.duration, per_request))
                r = runs[-1]
                say(f"   run {i + 1}: {r['rps']:,.0f} req/s, {r['eps']:,.0f} events/s, "
                    f"p99 {r['p99']} ms, 503s {r['rejected']:.0f}")
            rss = peak_rss_mb(server.pid)
            accepted = server.metrics().get("events_accepted_total", 0)
            result = drain_and_count(server, os.path.join(directory, "store"),
                                     moto if extra is s3_env else None, prefix)
            rows.append((name, runs, rss, result, per_request))
            medians[name] = (statistics.median(r["rps"] for r in runs),
                             statistics.median(r["eps"] for r in runs))
            if extra is plan_env:
                store = os.path.join(directory, "store")
                good, bad = count_lines(os.path.join(store, prefix)), \
                    count_lines(os.path.join(store, "bad"))
                medians[name + ":stored"] = (accepted, good, bad)
                say(f"   accepted {accepted:,.0f}; stored {good:,} good + {bad:,} bad; "
                    f"lost {accepted - good - bad:,.0f}")
            if name == "single-local":
                single_max = statistics.median(r["rps"] for r in runs)

        notes += quarantine_notes(medians)

        for half, extra, label in (("half-rate", {}, "half-rate (single, local)"),
                                   ("half-rate-disk", disk_env,
                                    "half-rate-disk (single, local, ACK_MODE=disk)")):
          if not want(half) or not single_max:
            continue
          say(f"== {half}: one event per POST at {single_max / 2:,.0f} req/s "
              f"(half of single-local's maximum)")
          directory = tempfile.mkdtemp(dir=work)
          server = start_estat(directory, {"RAW_PREFIX": "raw-half", **extra})
          interval_ms = 64 * 1000 / (single_max / 2)
          runs = []
          for i in range(args.reps):
            runs.append(measure(server, scripts["rate"], args.duration, 1,
                                env={"BENCH_INTERVAL_MS": f"{interval_ms:.3f}"}))
            r = runs[-1]
            say(f"   run {i + 1}: {r['rps']:,.0f} req/s, p50 {r['p50']} ms, p99 {r['p99']} ms")
          rss = peak_rss_mb(server.pid)
          result = drain_and_count(server, os.path.join(directory, "store"), None, "raw-half")
          rows.append((label, runs, rss, result, 1))

      if want("outage"):
        say(f"== outage: S3 answers 503 SlowDown for {args.outage:.0f}s under full load")
        proxy = FaultProxy(moto.port)
        directory = tempfile.mkdtemp(dir=work)
        server = start_estat(directory, {**s3_env, "S3_ENDPOINT_URL": proxy.endpoint,
                                         "RAW_PREFIX": "raw-outage"})
        try:
            before = server.metrics()
            proxy.set_mode("slowdown")
            rss_samples = []
            wrk = subprocess.Popen(
                ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{int(args.outage)}s",
                 "-s", scripts["single"], f"http://127.0.0.1:{server.port}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            t0 = time.monotonic()
            while wrk.poll() is None:
                rss_samples.append(rss_mb(server.pid))
                time.sleep(1)
                elapsed = time.monotonic() - t0
                if int(elapsed) % 10 == 0:
                    say(f"   {elapsed:.0f}s: RSS {rss_samples[-1]:.1f} MB")
            wrk.communicate(timeout=30)
            proxy.set_mode("pass")
            during = server.metrics()
            wait_until(lambda: server.metrics().get("dlq_files_current", 1) == 0, 120, 1,
                       "the DLQ to drain after the outage")
            after = server.metrics()
            outage = {
                "accepted": during["events_accepted_total"] - before.get("events_accepted_total", 0),
                "rejected": during["http_requests_rejected_queue_full_total"]
                - before.get("http_requests_rejected_queue_full_total", 0),
                "dlq_events": during["dlq_events_enqueued_total"],
                "recovered": after["dlq_events_recovered_total"],
                "stored": after["s3_events_stored_total"],
                "rss_first": rss_samples[0] if rss_samples else 0,
                "rss_max": max(rss_samples) if rss_samples else 0,
                "rss_last": rss_samples[-1] if rss_samples else 0,
                "peak": peak_rss_mb(server.pid),
            }
            say(f"   accepted {outage['accepted']:,.0f}, 503 {outage['rejected']:,.0f}, "
                f"RSS {outage['rss_first']:.1f} -> max {outage['rss_max']:.1f} MB, "
                f"dead-lettered {outage['dlq_events']:,.0f}, recovered {outage['recovered']:,.0f}")
        finally:
            server.stop()
            proxy.stop()
    finally:
        if moto is not None:
            moto.stop()

    lines = [
        "# Estat benchmark results",
        "",
        f"`make bench` (`python bench/run.py --duration {args.duration:.0f} --reps {args.reps} "
        f"--outage {args.outage:.0f}`), {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}. Server pinned to CPU {SERVER_CPU}, "
        f"wrk (64 keep-alive connections) and moto on CPU {LOAD_CPU}. "
        "Median of the runs, (min-max) when there were several. Full pipeline: "
        "gzip level 6, all limits, metrics, queue bound. "
        f"Server code: {_code_version()}. "
        "vs baseline: requests/s over the naive Klein app's.",
        "",
        "| scenario | requests/s | events/s | vs baseline | p50 ms | p99 ms | server CPU us/event "
        "| peak RSS MB | objects | 503s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs, rss, result, per_request in rows:
        rps = summary([r["rps"] for r in runs])
        eps = summary([r["eps"] for r in runs])
        ratio = (f"{statistics.median(r['rps'] for r in runs) / base_rps:.2f}x"
                 if base_rps else "-")
        lines.append(
            f"| {name} | {rps} | {eps} | {ratio} | {summary([r['p50'] for r in runs])} "
            f"| {summary([r['p99'] for r in runs])} | {summary([r['cpu_us_per_event'] for r in runs])} "
            f"| {rss:.0f} | {result['objects'] if result else '-'} "
            f"| {summary([r['rejected'] for r in runs]) if per_request else '-'} |")
    lines += [] if outage is None else [
        "",
        f"S3 outage ({args.outage:.0f}s of 503 SlowDown under full single-event load): "
        f"{outage['accepted']:,.0f} events accepted, {outage['rejected']:,.0f} requests shed "
        f"with 503, {outage['dlq_events']:,.0f} events dead-lettered to disk and "
        f"{outage['recovered']:,.0f} recovered once S3 was back; RSS {outage['rss_first']:.1f} MB "
        f"at the start of the outage, {outage['rss_max']:.1f} MB at most, "
        f"{outage['rss_last']:.1f} MB at the end (process peak {outage['peak']:.1f} MB).",
    ]
    lines += [""] + notes
    # The sections after this table ("## ...": compression, the "before"
    # run, the profile) are written by other commands; keep them.
    kept = ""
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        at = old.find("\n## ")
        if at >= 0:
            kept = old[at:]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n" + kept)
    say("")
    say("\n".join(lines))
    say(f"\nwritten to {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
