#!/usr/bin/env python
"""
The per-request CPU of the HTTP edge and the ingest core, without sockets,
reactor or other processes: N varied one-event POSTs (300-500 bytes, non-ASCII
text, nested objects) fed to one connection of the real factory (httptools
protocol -> IngestCore -> QueueAdmission -> EventQueue), with the real
metrics.  A stable figure to compare hot-path changes on a busy machine,
where wrk figures swing with whatever else runs.

    python bench/hotpath.py [--requests 50000] [--profile]
    python bench/hotpath.py --instructions   # per request, under valgrind

--instructions counts user-space instructions (callgrind's Ir) per request:
two runs of this script under valgrind that differ only in how many requests
they send, so start-up and imports cancel out; once for the whole path and
once with --stub (the protocol alone), the core being the difference.
Immune to what else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402

from estat.http.protocol import FastHTTPFactory  # noqa: E402
from estat.ingest.admission import WaitingQueueAdmission  # noqa: E402
from estat.ingest.core import IngestCore, QueueAdmission  # noqa: E402
from estat.metrics import Metrics  # noqa: E402
from estat.queue import EventQueue  # noqa: E402

TITLES = ["Café crème – menu", "東京の天気", "Überraschung! 🎉", "naïve résumé", "plain title"]


def event(rng: random.Random, n: int) -> bytes:
    return orjson.dumps({
        "event": rng.choice(["page_view", "click", "scroll", "signup", "purchase"]),
        "id": f"{n}-{rng.randrange(10**9)}", "user_id": f"u-{rng.randrange(10**6)}",
        "title": rng.choice(TITLES), "path": rng.choice(["/", "/pricing", "/docs/start"]),
        "screen": {"w": rng.randrange(320, 2400), "h": rng.randrange(480, 1600)},
        "props": {"plan": rng.choice(["free", "pro"]), "items": [rng.randrange(100)] * 3},
        "value": round(rng.random() * 100, 2), "client_ts": 1764000000000 + n,
    })


class _Sink:
    """
    A transport that keeps nothing: what a socket costs is not measured.
    """

    disconnecting = False
    connected = True

    def write(self, data):
        pass

    def getPeer(self):
        return IPv4Address("TCP", "192.0.2.1", 5000)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def setTcpNoDelay(self, enabled):
        pass

    def loseConnection(self):
        pass

    def registerProducer(self, producer, streaming):
        pass


def posts(bodies: list) -> list:
    """
    One keep-alive C{POST /collect} per body, as wrk sends them.
    """
    return [b"POST /collect HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in bodies]


def best_time(run, requests: int, reps: int, profile: bool) -> float:
    """
    The least CPU seconds of C{reps} calls of C{run(requests)}, after one
    under cProfile (its 25 costliest functions printed) if C{profile}.
    """
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        run(requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return min(run(requests) for _ in range(reps))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dedup", action="store_true",
                        help="with the DEDUP_WINDOW hook (events without messageId)")
    parser.add_argument("--batch", type=int, default=1, help="events per POST (a JSON array)")
    parser.add_argument("--plan", default="",
                        help="a tracking plan (SCHEMAS) for the core, its bad rows on a queue")
    parser.add_argument("--stub", action="store_true",
                        help="a handler that answers at once: the protocol alone")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per request under valgrind: whole path and protocol")
    parser.add_argument("--only-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instructions:
        return instructions(args)
    rng = random.Random(7)
    bodies = [event(rng, n) for n in range(2000)]
    if args.batch > 1:
        bodies = [b"[" + b",".join(bodies[i:i + args.batch]) + b"]"
                  for i in range(0, 2000, args.batch)] * args.batch
    requests = posts(bodies)
    clock = Clock()
    clock.advance(1764000000)
    metrics = Metrics(CollectorRegistry())
    queue = EventQueue(1_000_000)
    dedup = None
    if args.dedup:
        from estat.dedup import DedupWindow

        dedup = DedupWindow(clock, window=600.0, max_ids=100_000)
    # The server's admission in ACK_MODE=memory (estat.tap).
    admission = WaitingQueueAdmission(queue, clock=clock, metrics=metrics, max_wait=1.0,
                                      max_waiting_events=4000, retry_after=1)
    core = IngestCore(admission=admission, metrics=metrics, clock=clock, dedup=dedup)
    if args.plan:
        from estat.ingest.validation import EventValidation
        from estat.schema.plan import load_plan

        core.validation = EventValidation(load_plan(args.plan), metrics)
        core.bad_admission = QueueAdmission(EventQueue(1_000_000))
    handler = core.handle
    if args.stub:
        from estat.ingest.core import Answer

        answer = Answer(202, ((b"content-type", b"application/json"),), b'{"accepted":1}')

        def stub(request, respond):
            return answer

        handler = stub
    factory = FastHTTPFactory(routes={b"/collect": handler}, resource=Resource(),
                              clock=clock, max_body_size=524288, idle_timeout=75,
                              request_timeout=30)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(_Sink())

    def run(n: int) -> float:
        started = time.process_time()
        for i in range(n):
            protocol.dataReceived(requests[i % 2000])
            if len(queue) > 50000:
                queue.take(1_000_000)
        return time.process_time() - started

    run(200)
    if args.only_run:
        run(args.requests)
        return 0
    best = best_time(run, args.requests, args.reps, args.profile)
    per_request = best / args.requests * 1e6
    print(f"hot path: {per_request:.2f} us CPU per {args.batch}-event request, "
          f"{per_request / args.batch:.2f} us per event "
          f"({args.requests * args.batch / best:,.0f} events/s of pure Python work), "
          f"{sum(map(len, bodies)) / len(bodies):.0f}-byte bodies")
    return 0


def build_name() -> str:
    from estat._compiled import describe

    return describe()


def count(argv: list) -> int:
    """
    Callgrind's instruction count of one run of this script with ``argv``.
    """
    import subprocess

    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         os.path.abspath(__file__), "--only-run", *argv],
        capture_output=True, text=True, check=True)
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(out.stderr[-2000:])


def instructions(args) -> int:
    extra = []
    if args.batch > 1:
        extra += ["--batch", str(args.batch)]
    if args.dedup:
        extra.append("--dedup")
    if args.plan:
        extra += ["--plan", args.plan]
    low, high = 2000, 12000
    per = {}
    for name, flags in (("whole path", []), ("protocol alone (--stub)", ["--stub"])):
        a = count(["--requests", str(low), *extra, *flags])
        b = count(["--requests", str(high), *extra, *flags])
        per[name] = (b - a) / (high - low)
    whole, protocol = per["whole path"], per["protocol alone (--stub)"]
    build = build_name()
    print(f"instructions per {args.batch}-event request ({build}): {whole:,.0f} "
          f"(protocol {protocol:,.0f}, ingest core and queue {whole - protocol:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
