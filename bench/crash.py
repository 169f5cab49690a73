#!/usr/bin/env python
"""
Estat's crash harness (`make crash-soak`): SIGKILL the real `twistd estat`
at random moments, under load, several times, and check that in
ACK_MODE=disk and ACK_MODE=stored every event answered 2xx is stored
exactly once.

On 127.0.0.1 only: client threads post distinct events (each with a unique
id; single events and JSON arrays of 1-50) and note per id whether the
answer was a 2xx.  A client whose connection broke before its answer does
not count the events as acknowledged (they may be stored or not).  The
server runs on the local directory store, or on moto S3 (SigV4 checked)
through the fault proxy, which cycles through 500s, SlowDown, slow answers
and stored-but-dropped answers.  At random moments (spread over the run)
the server is killed with SIGKILL and a new one is started at once on the same WAL_DIR,
DLQ_DIR and store (with a new random INSTANCE_ID, as a replaced container
would have); the clients move to it.  At the end the load stops, the
proxy heals, the last server gets SIGTERM (it must exit 0), and if the
dead-letter queue or the log still hold anything a drain process runs on
them until they are empty.

Every stored object is read back.  PASS iff no acknowledged event is
missing, none is stored twice, no event answered 503 was stored, and the
final SIGTERM exited 0.

    python bench/crash.py [--mode disk|stored|both] [--store local|s3|both]
                          [--duration 60] [--kills 10] [--clients 8] [--rate 40]

`run_crash(mode, store, duration, kills, ...) -> dict` is the same run as a
function (the end-to-end test calls it with a short duration).
"""

from __future__ import annotations

import argparse
import collections
import gzip
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
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from estat.test.harness import BUCKET, EstatProcess, FaultProxy, MotoServer  # noqa: E402
from soak import ACKED, ERROR, REJECTED, Client, Target  # noqa: E402

__all__ = ["run_crash", "main"]

_ID = re.compile(rb'"id":"c(\d+)-(\d+)"')
FAULTS = ("pass", "500", "pass", "slowdown", "pass", "drop_after_store", "pass", "slow")
SHUTDOWN_TIMEOUT = 8.0
DESCRIPTION = ('Real `twistd estat` under load from client threads posting distinct events (single and arrays of 1-50), killed with SIGKILL at random moments and restarted at once on the same WAL_DIR, DLQ_DIR and store with a new instance id; SIGTERM at the end. s3: moto (SigV4 checked) behind the fault proxy cycling 500, SlowDown, slow answers and stored-but-dropped answers. *Lost*: acknowledged (2xx) but not stored; *duplicated*: an id stored more than once; a client whose connection broke before its answer did not count its events as acknowledged (some of them were stored anyway). Every object is read back.')


def _count(bodies, ids: dict) -> tuple[int, int]:
    """
    Count every client id in the gzip JSON Lines C{bodies} into
    C{ids[client][seq]}; return (objects, lines).
    """
    objects = lines = 0
    for body in bodies:
        objects += 1
        for line in gzip.decompress(body).split(b"\n"):
            if not line:
                continue
            lines += 1
            m = _ID.search(line)
            if m is None:
                continue
            counts, seq = ids[int(m.group(1))], int(m.group(2))
            if seq >= len(counts):
                counts.extend(bytes(seq + 1 - len(counts)))
            counts[seq] = min(255, counts[seq] + 1)
    return objects, lines


def _local_bodies(directory: str):
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".jsonl.gz"):
                with open(os.path.join(root, name), "rb") as f:
                    yield f.read()


def _left_in(directory: str, suffix: str) -> int:
    try:
        return sum(1 for n in os.listdir(directory) if n.endswith(suffix)
                   and not n.startswith(".tmp-"))
    except FileNotFoundError:
        return 0


class Cycler(threading.Thread):
    def __init__(self, proxy: FaultProxy, period: float, seed: int) -> None:
        super().__init__(name="crash-faults", daemon=True)
        self.proxy, self.period = proxy, period
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.modes = collections.Counter()

    def run(self) -> None:
        i = self.rng.randrange(len(FAULTS))
        while not self.done.wait(self.period):
            mode = FAULTS[i % len(FAULTS)]
            i += 1
            self.proxy.set_mode(mode)
            self.modes[mode] += 1
        self.proxy.set_mode("pass")


def run_crash(mode: str, store: str, duration: float = 60.0, kills: int = 10,
              clients: int = 8, rate: float = 40.0, seed: int | None = None,
              log=print, keep: bool = False) -> dict:
    """
    One run: C{mode} is C{"disk"} or C{"stored"}, C{store} C{"local"} or
    C{"s3"}.  Returns the tally; C{result["passed"]} is the verdict.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    workdir = tempfile.mkdtemp(prefix=f"estat-crash-{mode}-{store}-")
    shared = {
        "ACK_MODE": mode,
        "WAL_DIR": os.path.join(workdir, "wal"),
        "DLQ_DIR": os.path.join(workdir, "dlq"),
        "LOCAL_STORE_DIR": os.path.join(workdir, "store"),
        "BATCH_SIZE": "300",
        # stored: a small FLUSH_INTERVAL, as README recommends.
        "FLUSH_INTERVAL": "200ms" if mode == "stored" else "1s",
        "DLQ_RETRY_INTERVAL": "500ms",
        "SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
        "S3_TIMEOUT": "1s",
        "S3_APP_RETRIES": "1",
        "INSTANCE_ID": "",  # the default: host name plus random bits, new each start
    }
    moto = proxy = cycler = None
    processes: list = []
    workers: list = []
    stop_load = threading.Event()
    target = Target()
    began = time.monotonic()
    result = {"mode": mode, "store": store, "duration": duration, "kills": 0, "seed": seed,
              "clients": clients, "rate": rate, "workdir": workdir}

    def start(generation: int) -> EstatProcess:
        directory = os.path.join(workdir, f"estat-{generation}")
        os.makedirs(directory)
        process = EstatProcess(env, directory=directory)
        processes.append(process)
        process.wait_ready(30)
        target.set(process.port, generation)
        return process

    try:
        env = dict(shared)
        if store == "s3":
            moto = MotoServer()
            proxy = FaultProxy(moto.port, slow_seconds=1.5)
            env.update({"RAW_BUCKET": BUCKET, "S3_ENDPOINT_URL": proxy.endpoint,
                        "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": moto.access_key,
                        "AWS_SECRET_ACCESS_KEY": moto.secret_key})
        log(f"crash harness: ACK_MODE={mode}, {store} store, {duration:g}s, up to {kills} "
            f"SIGKILLs, {clients} clients at {rate:g} req/s, seed {seed}; {workdir}")
        current = start(0)
        workers = [Client(i, target, stop_load, rate, seed + i) for i in range(clients)]
        for w in workers:
            w.start()
        if proxy is not None:
            cycler = Cycler(proxy, 1.0, seed)
            cycler.start()
        t0 = time.monotonic()
        generation = 0
        # Load time counts only while a server is up: restarts are extra.
        up = 0.0
        spacing = duration / (kills + 1) if kills else duration
        while result["kills"] < kills:
            wait = rng.uniform(0.4, 1.0) * spacing * 1.5
            if up + wait >= duration:
                break
            time.sleep(wait)
            up += wait
            os.kill(current.pid, signal.SIGKILL)
            current.wait(10)
            current.stop()
            result["kills"] += 1
            generation += 1
            log(f"[{time.monotonic() - t0:5.1f}s] SIGKILL {result['kills']}; "
                f"acked so far {sum(w.acked for w in workers)}")
            current = start(generation)
        time.sleep(max(0.0, duration - up))
        stop_load.set()
        for w in workers:
            w.join(15)
        if cycler is not None:
            cycler.done.set()
            cycler.join(5)
        os.kill(current.pid, signal.SIGTERM)
        result["exit_code"] = current.wait(SHUTDOWN_TIMEOUT + 15)
        current.stop()
        log(f"[{time.monotonic() - t0:5.1f}s] SIGTERM: exit {result['exit_code']}")
        drains = 0
        while (_left_in(shared["DLQ_DIR"], ".dlq") or _left_in(shared["WAL_DIR"], ".wal") > 1) \
                and drains < 3:
            # What the last process left (a DLQ after S3 faults): drain it.
            drains += 1
            drainer = start(generation + drains)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                m = drainer.metrics()
                if m.get("dlq_files_current", 1) == 0 and m.get("batches_pending", 1) == 0:
                    break
                time.sleep(0.25)
            os.kill(drainer.pid, signal.SIGTERM)
            drainer.wait(SHUTDOWN_TIMEOUT + 15)
            drainer.stop()
        ids: dict = collections.defaultdict(bytearray)
        if store == "s3":
            objects, lines = _count(moto.objects("").values(), ids)
        else:
            objects, lines = _count(_local_bodies(shared["LOCAL_STORE_DIR"]), ids)
        result.update(_tally(workers, ids))
        result["client_error_types"] = dict(sum((w.errors for w in workers), collections.Counter()))
        result["request_outcomes"] = dict(sum((w.requests for w in workers), collections.Counter()))
        result.update({
            "objects": objects, "lines": lines, "drains": drains,
            "dlq_left": _left_in(shared["DLQ_DIR"], ".dlq"),
            "proxy_modes": dict(cycler.modes) if cycler else {},
            "elapsed": time.monotonic() - began,
            "set_aside": sum(p.log().count("set aside") for p in processes),
            "replayed": sum(len(re.findall(r"replaying \d+ events", p.log())) for p in processes),
        })
        result["passed"] = (result["lost"] == 0 and result["duplicated"] == 0
                            and result["stored_but_rejected"] == 0
                            and result["exit_code"] == 0 and result["acknowledged"] > 0)
        log(f"{'PASS' if result['passed'] else 'FAIL'}: {summary(result)}; requests "
            f"{result['request_outcomes']}, client errors {result['client_error_types']}")
        return result
    finally:
        stop_load.set()
        if cycler is not None:
            cycler.done.set()
        for w in workers:
            w.join(15)
        for p in processes:
            p.stop()
        if proxy is not None:
            proxy.stop()
        if moto is not None:
            moto.stop()
        if result.get("passed") and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir} (process logs in estat-*/estat.log)")


def _tally(workers: list, ids: dict) -> dict:
    sent = acked = rejected = errors = lost = duplicated = 0
    stored_not_acked = stored_rejected = 0
    lost_examples: list = []
    for c in workers:
        counts = ids.get(c.index, b"")
        for seq, code in enumerate(c.status):
            n = counts[seq] if seq < len(counts) else 0
            sent += 1
            if n > 1:
                duplicated += 1
            if code >= ACKED:
                acked += 1
                if n == 0:
                    lost += 1
                    if len(lost_examples) < 5:
                        lost_examples.append(f"c{c.index}-{seq}")
            elif code == REJECTED:
                rejected += 1
                stored_rejected += n > 0
            elif code == ERROR:
                errors += 1
                stored_not_acked += n > 0
    return {"sent": sent, "acknowledged": acked, "rejected": rejected, "client_errors": errors,
            "lost": lost, "duplicated": duplicated, "lost_examples": lost_examples,
            "stored_not_acknowledged": stored_not_acked, "stored_but_rejected": stored_rejected}


def summary(r: dict) -> str:
    return (f"ACK_MODE={r['mode']} {r['store']}: {r['kills']} SIGKILLs, sent {r['sent']:,}, "
            f"acknowledged {r['acknowledged']:,}, lost {r['lost']}, duplicated "
            f"{r['duplicated']}, 503 {r['rejected']:,} (stored {r['stored_but_rejected']}), "
            f"broken connections {r['client_errors']:,} events (stored anyway "
            f"{r['stored_not_acknowledged']:,}), {r['objects']:,} objects, exit {r['exit_code']}, "
            f"{r['elapsed']:.0f} s")


def markdown(results: list) -> str:
    rows = ["| mode | store | SIGKILLs | events sent | acknowledged (2xx) | lost | duplicated "
            "| 503 (stored) | broken connections (stored anyway) | objects | SIGTERM exit |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows.append(f"| {r['mode']} | {r['store']} | {r['kills']} | {r['sent']:,} | "
                    f"{r['acknowledged']:,} | **{r['lost']}** | **{r['duplicated']}** | "
                    f"{r['rejected']:,} ({r['stored_but_rejected']}) | {r['client_errors']:,} "
                    f"({r['stored_not_acknowledged']:,}) | {r['objects']:,} | {r['exit_code']} |")
    return "\n".join(rows)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("disk", "stored", "memory", "both"), default="both",
                        help="memory is the control: it loses what was in memory")
    parser.add_argument("--store", choices=("local", "s3", "both"), default="both")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s per client")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--output", default="", help="write the Markdown table here")
    args = parser.parse_args(argv)
    modes = ("disk", "stored") if args.mode == "both" else (args.mode,)
    stores = ("local", "s3") if args.store == "both" else (args.store,)
    results = []
    for mode in modes:
        for store in stores:
            results.append(run_crash(mode, store, args.duration, args.kills, args.clients,
                                     args.rate, args.seed, log=lambda t: print(t, flush=True),
                                     keep=args.keep))
    table = markdown(results)
    print()
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("# Estat crash harness\n\n`python bench/crash.py"
                    + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
                    + f"`, on {os.cpu_count()} CPUs.\n\n" + DESCRIPTION + "\n\n" + table + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
