#!/usr/bin/env python
"""
Issue 17's storage and query targets: OUTPUT_FORMAT=parquet against gzip
JSON Lines, on the benchmark's events.

Events have bench/run.py's wrk shape (the same fields, value ranges and
non-ASCII titles) and bench/schemas/bench-event.json declares their
columns.  Lines are made as the server makes them (estat.event.make_line,
so every line carries its C{_estat} server fields), put in batches of
BATCH_SIZE=5000, and each batch is encoded by both encoders
(estat.encode.jsonl.JsonlEncoder(6), estat.encode.parquet.ParquetEncoder
with the default zstd:3) into a temporary Hive layout
C{raw/dt=YYYY-MM-DD/hour=HH/NNNNN.{parquet,jsonl.gz}}.

Measured:
  - stored bytes per event, both stores;
  - the bytes a query of C{event} and C{received_at} reads: the two column
    chunks' total_compressed_size from the footers, against the file sizes;
  - DuckDB C{SELECT event, count(*) ... GROUP BY 1} over each store
    (read_parquet vs read_json_auto format newline_delimited), best of 3,
    wall clock, threads=1 and threads=2;
  - encoder CPU per event (time.process_time around encode, every batch);
  - per-codec rows for Parquet on the first --codec-batches batches.

    python bench/tables.py [--events 1000000] [--out bench/RESULTS.md]

With --out, the section "## Tables (Parquet vs JSON Lines)" of that file is
replaced (or appended); the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import duckdb  # noqa: E402
import pyarrow  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from estat.encode.jsonl import JsonlEncoder  # noqa: E402
from estat.encode.parquet import ParquetEncoder  # noqa: E402
from estat.encoder import Batch  # noqa: E402
from estat.event import format_received_at, make_line  # noqa: E402
from estat.schema.columns import collect_table  # noqa: E402
from sections import write_section  # noqa: E402

SECTION = "## Tables (Parquet vs JSON Lines)"
SCHEMA = os.path.join(HERE, "schemas", "bench-event.json")
BATCH_SIZE = 5000

# bench/run.py's LUA_COMMON, in Python.
PATHS = ["/", "/pricing", "/docs/getting-started", "/blog/2026/11/launch-week",
         "/signup", "/account/settings", "/products/42?ref=home", "/search?q=twisted+python"]
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "okhttp/4.12.0", "python-requests/2.32.3"]
EVENTS = ["page_view", "click", "scroll", "signup", "purchase", "search"]
TITLES = ["Café crème – menu", "東京の天気", "Überraschung! 🎉", "naïve résumé",
          "Pricing — Estat"]

#: Received times: from 2026-12-06T00:00Z, one event every 0.1728 s, so a
#: million events span two days (48 hour partitions).
T0 = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc).timestamp()
STEP = 0.1728

CODECS = [("zstd", 1), ("zstd", 3), ("zstd", 9), ("snappy", None), ("gzip", 6)]


class Events:
    """
    bench/run.py's event() generator: one wrk thread's stream of events.
    """

    def __init__(self, seed: int = 1) -> None:
        self.rnd = random.Random(seed)
        self.thread_id = self.rnd.randint(1, 10**9)
        self.n = 0

    def batch(self, count: int) -> list:
        """
        The next C{count} events as queued lines C{(received_at, line)}.
        """
        r = self.rnd.randint
        choice = self.rnd.choice
        out = []
        for _ in range(count):
            self.n += 1
            n = self.n
            ua = choice(UAS)
            event = {
                "event": choice(EVENTS),
                "id": f"{self.thread_id}-{n}-{r(1, 10**6)}",
                "user_id": f"u-{r(1, 10**6)}",
                "session_id": f"s-{r(0, 0x7fffffff):08x}",
                "path": choice(PATHS),
                "referrer": f"https://ref{r(1, 50)}.example.com/p/{r(1, 10**4)}",
                "ua": ua,
                "screen": {"w": 320 + r(1, 2000), "h": 480 + r(1, 1200)},
                "value": float(f"{r(0, 9999)}.{r(0, 99):02d}"),
                "items": r(0, 20),
                "tags": [f"t{r(1, 100)}", f"t{r(1, 100)}"],
                "client_ts": 1764000000000 + n,
                "title": choice(TITLES),
                "props": {"plan": "free" if r(1, 2) == 1 else "pro",
                          "ab": {"exp": f"e{r(1, 20)}", "arm": r(0, 3)}},
            }
            received = T0 + n * STEP
            server = {"received_at": format_received_at(received),
                      "ip": f"203.0.{r(0, 255)}.{r(1, 254)}",
                      # wrk sends no User-Agent header
                      "user_agent": None}
            line = make_line(event, server, None)
            assert type(line) is bytes
            out.append((received, line))
        return out


def partition(received: float) -> str:
    t = datetime.datetime.fromtimestamp(received, datetime.timezone.utc)
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


def make_batch(index: int, events: list) -> Batch:
    key = f"raw/{partition(events[0][0])}/{index:05d}"
    return Batch(key=key, poison_key="dlq/" + key, events=events,
                 first_event_at=events[0][0], sealed_at=events[-1][0])


def encode(encoder, batch: Batch) -> tuple:
    """
    (body, CPU seconds) of one batch; every event must be encoded.
    """
    t = time.process_time()
    objects = encoder.encode(batch)
    cpu = time.process_time() - t
    assert len(objects) == 1 and objects[0].count == batch.count, objects
    return objects[0].body, cpu


def build(root: str, count: int, table, codec_batches: int) -> dict:
    """
    Write both stores under C{root}; return sizes and CPU.
    """
    jsonl = JsonlEncoder(6)
    parquet = ParquetEncoder(table, ("zstd", None), 6)
    others = {c: ParquetEncoder(table, c, 6) for c in CODECS if c != ("zstd", 3)}
    stats = {"events": 0, "jsonl_bytes": 0, "parquet_bytes": 0, "jsonl_cpu": 0.0,
             "parquet_cpu": 0.0, "read_bytes": 0, "batches": 0,
             "codec": {c: [0, 0, 0.0] for c in CODECS}}  # events, bytes, cpu
    gen = Events(seed=1)
    index = 0
    while stats["events"] < count:
        events = gen.batch(min(BATCH_SIZE, count - stats["events"]))
        batch = make_batch(index, events)
        jbody, jcpu = encode(jsonl, batch)
        pbody, pcpu = encode(parquet, batch)
        for suffix, body in ((".jsonl.gz", jbody), (".parquet", pbody)):
            store = "jsonl" if suffix == ".jsonl.gz" else "parquet"
            path = os.path.join(root, store, batch.key + suffix)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
        stats["read_bytes"] += query_columns_bytes(os.path.join(root, "parquet",
                                                                batch.key + ".parquet"))
        stats["events"] += batch.count
        stats["batches"] += 1
        stats["jsonl_bytes"] += len(jbody)
        stats["parquet_bytes"] += len(pbody)
        stats["jsonl_cpu"] += jcpu
        stats["parquet_cpu"] += pcpu
        if index < codec_batches:
            row = stats["codec"][("zstd", 3)]
            row[0] += batch.count
            row[1] += len(pbody)
            row[2] += pcpu
            for codec, encoder in others.items():
                body, cpu = encode(encoder, batch)
                row = stats["codec"][codec]
                row[0] += batch.count
                row[1] += len(body)
                row[2] += cpu
        index += 1
    return stats


def query_columns_bytes(path: str) -> int:
    """
    The compressed bytes of the C{event} and C{_estat.received_at} column
    chunks, from the file's footer.
    """
    meta = pq.ParquetFile(path).metadata
    total = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for i in range(rg.num_columns):
            col = rg.column(i)
            if col.path_in_schema in ("event", "_estat.received_at"):
                total += col.total_compressed_size
    return total


PARQUET_SQL = ("SELECT event, count(*) FROM read_parquet('{glob}', hive_partitioning=true) "
               "GROUP BY 1 ORDER BY 1")
JSONL_SQL = ("SELECT event, count(*) FROM read_json_auto('{glob}', "
             "format='newline_delimited', hive_partitioning=true) GROUP BY 1 ORDER BY 1")


def best_of(sql: str, threads: int, runs: int) -> tuple:
    con = duckdb.connect()
    con.execute(f"SET threads={threads}")
    times = []
    result = None
    for _ in range(runs):
        t = time.perf_counter()
        result = con.execute(sql).fetchall()
        times.append(time.perf_counter() - t)
    con.close()
    return min(times), result


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {nproc()}), {model}"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--out", default=None, help="RESULTS.md to update")
    parser.add_argument("--runs", type=int, default=3, help="DuckDB runs, best kept")
    parser.add_argument("--codec-batches", type=int, default=10,
                        help="batches each Parquet codec encodes")
    parser.add_argument("--keep", default=None, help="write the stores here and keep them")
    args = parser.parse_args()

    started = time.perf_counter()
    table = collect_table(SCHEMA)
    root = args.keep or tempfile.mkdtemp(prefix="estat-tables-")
    try:
        stats = build(root, args.events, table, args.codec_batches)
        built = time.perf_counter() - started
        print(f"built {stats['events']:,} events in {stats['batches']} batches "
              f"in {built:.0f} s", file=sys.stderr)
        queries = {}
        results = {}
        for store, sql, glob in (
                ("parquet", PARQUET_SQL, "raw/dt=*/hour=*/*.parquet"),
                ("jsonl", JSONL_SQL, "raw/dt=*/hour=*/*.jsonl.gz")):
            sql = sql.format(glob=os.path.join(root, store, glob))
            for threads in (1, 2):
                queries[store, threads], results[store, threads] = best_of(
                    sql, threads, args.runs)
                print(f"{store} threads={threads}: {queries[store, threads]:.3f} s",
                      file=sys.stderr)
        for key, result in results.items():
            assert sum(c for _, c in result) == stats["events"], (key, result)
            assert result == results["parquet", 1], (key, result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started

    text = render(stats, queries, args, total)
    print(text)
    if args.out:
        write_section(args.out, text, SECTION)
    return 0


def render(stats, queries, args, total) -> str:
    n = stats["events"]
    jb, pb = stats["jsonl_bytes"] / n, stats["parquet_bytes"] / n
    ju, pu = stats["jsonl_cpu"] / n * 1e6, stats["parquet_cpu"] / n * 1e6
    share = stats["read_bytes"] / stats["parquet_bytes"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [
        ("stored bytes per event, parquet vs gzip-6 JSONL", f"{jb:.1f} B", f"{pb:.1f} B",
         "≤ 1.0x", f"{pb / jb:.2f}x, {met(pb / jb <= 1.0)}"),
        ("bytes a query of `event` and `received_at` reads (column chunks / file)",
         "whole file (100 %)",
         f"{stats['read_bytes'] / n:.2f} B/event of {pb:.1f} ({share * 100:.2f} %)",
         "≤ 5 % of the file", met(share <= 0.05)),
    ]
    for threads in (1, 2):
        j, p = queries["jsonl", threads], queries["parquet", threads]
        rows.append((f"DuckDB `SELECT event, count(*) … GROUP BY 1`, {n:,} events, "
                     f"threads={threads} (best of {args.runs})",
                     f"{j:.3f} s", f"{p:.3f} s", "≥ 10x faster",
                     f"{j / p:.1f}x, {met(j / p >= 10)}"))
    rows.append(("encoder-thread CPU per event (process_time, "
                 f"{stats['batches']} batches of {BATCH_SIZE})",
                 f"{ju:.2f} µs", f"{pu:.2f} µs", "≤ 1.5x",
                 f"{pu / ju:.2f}x, {met(pu / ju <= 1.5)}"))

    out = [SECTION, ""]
    out.append(f"`python bench/tables.py --events {n} --out {args.out or '-'}`, "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
               f"{machine()}, DuckDB {duckdb.__version__}, pyarrow {pyarrow.__version__}; "
               f"{total:.0f} s in all.")
    out.append("")
    out.append("Figures are from a shared machine (2 cores used by other engineers at the "
               "same time): CPU and wall-clock figures can be inflated by their load; "
               "sizes are exact.")
    out.append("")
    out.append(f"Events of bench/run.py's wrk shape (the same fields and non-ASCII titles), "
               f"made into lines by estat's make_line (with `_estat`), columns from "
               f"bench/schemas/bench-event.json; batches of {BATCH_SIZE} events encoded by "
               f"JsonlEncoder(6) and ParquetEncoder (zstd:3) into a Hive layout "
               f"`raw/dt=YYYY-MM-DD/hour=HH/` ({stats['batches']} files each, 48 hours). "
               f"DuckDB reads the Parquet store with read_parquet and the JSON Lines store "
               f"with read_json_auto(format='newline_delimited'), hive_partitioning on; "
               f"best of {args.runs} runs on one connection per store and thread count, "
               f"wall clock, files warm in the page cache. Encoder CPU is "
               f"time.process_time around each encode (all of the process's threads).")
    out.append("")
    out.append("| measure | jsonl | parquet | target | met? |")
    out.append("| --- | --- | --- | --- | --- |")
    for row in rows:
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    first = stats["codec"][CODECS[0]][0]
    out.append(f"Parquet codecs (PARQUET_COMPRESSION), on the first {first:,} events "
               f"(the same batches for each; gzip-6 JSON Lines on all events: "
               f"{jb:.1f} B/event, {ju:.2f} µs/event):")
    out.append("")
    out.append("| codec | bytes/event | vs gzip-6 JSONL | encoder µs/event |")
    out.append("| --- | --- | --- | --- |")
    for codec in CODECS:
        events, size, cpu = stats["codec"][codec]
        name = f"{codec[0]}:{codec[1]}" if codec[1] is not None else codec[0]
        if codec == ("zstd", 3):
            name += " (default)"
        out.append(f"| {name} | {size / events:.1f} | {size / events / jb * 100:.1f} % | "
                   f"{cpu / events * 1e6:.2f} |")
    out.append("")
    return "\n".join(out)



if __name__ == "__main__":
    sys.exit(main())
