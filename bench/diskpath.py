#!/usr/bin/env python
"""
The reactor thread's CPU per one-event request in ACK_MODE=disk, without
sockets, reactor or threads: bench/hotpath.py's requests fed to --conns
connections of the real factory (httptools protocol -> IngestCore ->
WalAdmission -> WriteAheadLog), the writer's group commit run on the same
thread after every --group requests (a real write to a segment in /dev/shm,
the fdatasync stubbed), then the group handed to the log as the reactor
would get it.  What the writer thread and the sync cost is not in it: see
bench/run.py's single-disk for that.

    python bench/diskpath.py [--requests 50000] [--group 57] [--profile]

Compare with bench/hotpath.py (the same requests in ACK_MODE=memory).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hotpath import _Sink, best_time, event, posts  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402

from estat.http.protocol import FastHTTPFactory  # noqa: E402
from estat.ingest.core import IngestCore  # noqa: E402
from estat.metrics import Metrics  # noqa: E402
from estat.queue import EventQueue  # noqa: E402
from estat.wal.admission import WalAdmission  # noqa: E402
from estat.wal.log import WriteAheadLog  # noqa: E402
from estat.wal.writer import GroupCommitter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--group", type=int, default=57,
                        help="requests per group commit (single-disk's, from /metrics)")
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rng = random.Random(7)
    bodies = [event(rng, n) for n in range(2000)]
    requests = posts(bodies)
    clock = Clock()
    clock.advance(1764000000)
    metrics = Metrics(CollectorRegistry())
    queue = EventQueue(1_000_000)
    committers = []

    def committer(*a, **kw):
        kw["sync"] = lambda fd: None
        c = GroupCommitter(*a, **kw)
        c.preallocate = False
        c.start = lambda: None  # no thread: flush() below does its work
        committers.append(c)
        return c

    reported = []
    wal = WriteAheadLog(directory=tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm")
                                                   else None),
                        metrics=metrics, clock=clock,
                        call_from_thread=lambda f, *a: reported.append((f, a)),
                        run_in_thread=lambda f, *a: succeed(f(*a)), committer_factory=committer,
                        segment_size=1 << 40, max_bytes=1 << 50)
    wal.startService()
    writer = committers[0]
    writer._open(writer.segment)
    admission = WalAdmission(wal=wal, queue=queue, upload=lambda b: succeed(True),
                             key_maker=None, metrics=metrics)
    core = IngestCore(admission=admission, metrics=metrics, clock=clock)
    factory = FastHTTPFactory(routes={b"/collect": core.handle}, resource=Resource(),
                              clock=clock, max_body_size=524288, idle_timeout=75,
                              request_timeout=30)
    protocols = []
    for _ in range(args.conns):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(_Sink())
        protocols.append(protocol)

    def flush() -> None:
        # The writer thread's turn (as its _run takes a group), then the reactor's.
        if hasattr(writer, "_records"):
            if writer._records:
                records, callbacks, max_seq = writer._records, writer._callbacks, writer._max_seq
                writer._records, writer._callbacks, writer._max_seq = [], [], -1
                wal._on_group(writer._commit(records, callbacks, max_seq))
        else:  # before 824ae0b
            group, writer._queue = writer._queue, []
            if group:
                wal._on_group(writer.commit(group))
        for f, a in reported:
            f(*a)
        reported.clear()

    def run(n: int) -> float:
        started = time.process_time()
        count, group = len(protocols), args.group
        for i in range(n):
            protocols[i % count].dataReceived(requests[i % 2000])
            if i % group == group - 1:
                flush()
                if len(queue) > 50000:
                    queue.take(1_000_000)
                    wal._streams["collect"].ledger.entries.clear()
        flush()
        return time.process_time() - started

    run(500)
    best = best_time(run, args.requests, args.reps, args.profile)
    print(f"disk path: {best / args.requests * 1e6:.2f} us reactor-thread CPU per one-event "
          f"request (groups of {args.group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
