#!/usr/bin/env python
"""
Dead-letter queue benchmark: does one retry step cost the same whatever
the backlog (the bounded scan), and how fast does a backlog drain into S3?

1. Scan: DLQ directories of 100, 1,000 and 50,000 small files (in a
   temporary directory, removed afterwards).  One retry step,
   C{DiskDeadLetterQueue.retry_oldest}, with a synchronous thread runner
   and a C{deliver} that fails (so nothing is deleted), timed several
   times; the medians and their ratios.  A step reads at most
   C{scan_limit} (1,000) entries, so from 1,000 files on its cost is
   flat (ratio close to 1); below that it reads fewer.  A full
   C{os.listdir} + sort is timed beside it for comparison.

2. Drain (only if moto is installed): 10,000 dead-letter files uploaded
   into a moto S3 server on 127.0.0.1 by the real retry loop, C{S3Store}
   and C{Uploader.put_with_retries}, on the real reactor with its thread
   pool: files/s and events/s.

    .venv/bin/python bench/dlq_scan.py [--sizes 100,1000,50000]
        [--drain 10000] [--runs 15] [--drain-timeout 135] [--own-moto]

Every process started here is ended by its PID; loopback only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from estat.dlq import DiskDeadLetterQueue, encode_dlq_file  # noqa: E402
from estat.encoder import encode_object  # noqa: E402
from estat.metrics import Metrics  # noqa: E402
from estat.testing import run_synchronously  # noqa: E402

START = 1700000000.0
EVENTS_PER_FILE = 10


def event_lines(n: int) -> list[bytes]:
    return [b'{"event":"page_view","n":%d,"i":%d,"path":"/docs/%d",'
            b'"_estat":{"received_at":"2023-11-14T22:13:20.000Z"}}' % (n, i, n % 97)
            for i in range(EVENTS_PER_FILE)]


def fill(directory: str, count: int) -> int:
    """
    Write C{count} valid dead-letter files straight to C{directory}
    (without the queue's fsyncs: this is set-up, not what is measured).
    Returns the number of events written.
    """
    os.makedirs(directory, exist_ok=True)
    for n in range(count):
        created = START + n * 0.001
        obj = encode_object(f"raw/dt=2023-11-14/hour=22/bench-{n:06d}.jsonl.gz",
                            event_lines(n), 1)
        name = f"{int(created * 1e9):020d}-{n:08x}.dlq"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(encode_dlq_file(obj, created))
    return count * EVENTS_PER_FILE


def time_retry_step(directory: str, runs: int) -> tuple[float, float, str]:
    """
    The median and minimum seconds of one C{retry_oldest} step, and its
    outcome.
    """
    clock = Clock()
    clock.advance(START + 3600)
    times = []
    outcome = None
    for _ in range(runs + 1):  # the first run warms the page cache
        queue = DiskDeadLetterQueue(
            directory=directory, metrics=Metrics(CollectorRegistry()), clock=clock,
            run_in_thread=run_synchronously, deliver=lambda obj: succeed(False))
        started = time.perf_counter()
        d = Deferred.fromCoroutine(queue.retry_oldest())
        elapsed = time.perf_counter() - started
        results = []
        d.addBoth(results.append)
        outcome = results[0]
        if outcome != "failed":
            raise SystemExit(f"retry step in {directory} gave {outcome!r}, expected 'failed'")
        times.append(elapsed)
    times = times[1:]
    return statistics.median(times), min(times), outcome


def time_full_listing(directory: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        sorted(os.listdir(directory))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def scan_benchmark(sizes: list[int], runs: int) -> list[dict]:
    base = tempfile.mkdtemp(prefix="estat-bench-dlq-")
    rows = []
    try:
        for size in sizes:
            directory = os.path.join(base, f"dlq-{size}")
            started = time.perf_counter()
            fill(directory, size)
            setup = time.perf_counter() - started
            median, fastest, _ = time_retry_step(directory, runs)
            rows.append({"files": size, "median": median, "min": fastest,
                         "listing": time_full_listing(directory, runs),
                         "remaining": len(os.listdir(directory)), "setup": setup})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


# --- the drain into moto ------------------------------------------------------


class OwnMoto:
    """
    A moto server started here when C{estat.test.harness} is not there:
    no auth, one bucket.
    """

    def __init__(self, bucket: str = "estat-bench") -> None:
        import socket

        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = self.secret_key = "bench"
        self.directory = tempfile.mkdtemp(prefix="estat-bench-moto-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        self._log = open(os.path.join(self.directory, "moto.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=self.directory)
        try:
            deadline = time.monotonic() + 30
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto exited with {self.proc.returncode}")
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("moto did not start in 30 s")
                    time.sleep(0.1)
            self.client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id="bench", aws_secret_access_key="bench")
            self.client.create_bucket(Bucket=bucket)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_moto(use_harness: bool = True):
    try:
        if not use_harness:
            raise ImportError("not asked for")
        from estat.test.harness import REGION, MotoServer
    except ImportError:
        return OwnMoto(), "us-east-1", "moto started here, no auth"
    return MotoServer(), REGION, "moto from estat.test.harness, SigV4 checked"


def count_keys(client, bucket: str) -> int:
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        count += len(page.get("Contents", ()))
    return count


async def drain(reactor, moto, region: str, directory: str, files: int, timeout: float) -> dict:
    from functools import partial

    from botocore.credentials import Credentials
    from twisted.internet.threads import deferToThreadPool

    from estat.config import Config
    from estat.store.s3 import S3Store
    from estat.uploader import Uploader

    run_in_thread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    metrics = Metrics(CollectorRegistry())
    credentials = Credentials(moto.access_key, moto.secret_key)
    store = S3Store.from_config(
        Config.defaults(raw_bucket=moto.bucket, aws_region=region,
                        s3_endpoint_url=moto.endpoint, s3_timeout=10.0),
        reactor=reactor, run_in_thread=run_in_thread, credentials=lambda: credentials)
    await store.check()
    dead_letters = DiskDeadLetterQueue(
        directory=directory, metrics=metrics, clock=reactor, run_in_thread=run_in_thread,
        max_age=10 * 365 * 86400.0, interval=0.5, max_backoff=1.0)
    uploader = Uploader(store=store, dead_letters=dead_letters, metrics=metrics,
                        clock=reactor, run_in_thread=run_in_thread, retries=0)
    dead_letters.deliver = lambda obj: Deferred.fromCoroutine(uploader.put_with_retries(obj, 0))

    started = reactor.seconds()
    dead_letters.startService()
    deadline = started + timeout
    while True:
        await sleep(reactor, 0.05)
        recovered = metrics.registry.get_sample_value("dlq_events_recovered_total") or 0
        if recovered >= files * EVENTS_PER_FILE or reactor.seconds() > deadline:
            break
    elapsed = reactor.seconds() - started
    await dead_letters.stopService()
    await store.pool.closeCachedConnections()
    errors = metrics.registry.get_sample_value("s3_put_errors_total") or 0
    return {"seconds": elapsed, "events": recovered, "files": recovered / EVENTS_PER_FILE,
            "errors": errors, "left": dead_letters.files}


def sleep(reactor, seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def drain_benchmark(files: int, timeout: float, use_harness: bool = True) -> dict | None:
    if importlib.util.find_spec("moto") is None:
        return None
    from twisted.internet import reactor

    base = tempfile.mkdtemp(prefix="estat-bench-drain-")
    moto = None
    try:
        directory = os.path.join(base, "dlq")
        fill(directory, files)
        moto, region, label = start_moto(use_harness)
        result = {}

        def done(r):
            result.update(r)

        def failed(f):
            result["error"] = f.getTraceback()

        d = Deferred.fromCoroutine(drain(reactor, moto, region, directory, files, timeout))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())
        reactor.run()
        if "error" in result:
            raise SystemExit("drain failed:\n" + result["error"])
        if "seconds" not in result:
            raise SystemExit("drain interrupted")
        result["stored"] = count_keys(moto.client, moto.bucket)
        result["label"] = label
        return result
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,50000",
                        help="DLQ sizes for the scan part, comma-separated")
    parser.add_argument("--drain", type=int, default=10_000, help="0: skip the moto part")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--drain-timeout", type=float, default=135.0,
                        help="stop measuring the drain after this many seconds")
    parser.add_argument("--own-moto", action="store_true",
                        help="start moto here without auth, not estat.test.harness's")
    args = parser.parse_args()

    wall = time.perf_counter()
    sizes = sorted(int(n) for n in args.sizes.split(","))
    rows = scan_benchmark(sizes, args.runs)
    large = rows[-1]
    print("## One DLQ retry step (scan <= 1,000 entries, read, failed deliver)\n")
    print("| files in DLQ | retry step, median | min | full listdir+sort, median | set-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['files']:,} | {row['median'] * 1e3:.2f} ms | {row['min'] * 1e3:.2f} ms "
              f"| {row['listing'] * 1e3:.2f} ms | {row['setup']:.1f} s |")
    print()
    for row in rows[:-1]:
        print(f"- ratio {large['files']:,} / {row['files']:,} files: "
              f"{large['median'] / row['median']:.2f}x for the retry step "
              f"({large['min'] / row['min']:.2f}x by the fastest run; "
              f"full listing: {large['listing'] / row['listing']:.0f}x)")
    print(f"\nmedian of {args.runs} runs each; nothing deleted "
          f"({large['remaining']:,} files left in the largest)\n")

    if args.drain:
        result = drain_benchmark(args.drain, args.drain_timeout, not args.own_moto)
        if result is None:
            print("moto is not installed: drain benchmark skipped")
        else:
            rate = result["files"] / result["seconds"]
            print(f"## Draining {args.drain:,} DLQ files into S3 ({result['label']})\n")
            print("| files stored | events | seconds | files/s | events/s "
                  "| put errors | keys in bucket |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            print(f"| {result['files']:,.0f} | {result['events']:,.0f} "
                  f"| {result['seconds']:.1f} | {rate:,.0f} "
                  f"| {result['events'] / result['seconds']:,.0f} "
                  f"| {result['errors']:,.0f} | {result['stored']:,} |")
            if result["files"] < args.drain:
                print(f"\n(stopped after {args.drain_timeout:.0f} s with "
                      f"{args.drain - result['files']:,.0f} files left)")
            print()
    print(f"total run time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
