"""
How to build Parquet columns: in Python from the parsed events (what
estat.encode.parquet does) against pyarrow's C++ JSON reader over the
batch's lines, on the bench's events with their schema declared.

    .venv/bin/python bench/encoders.py

pyarrow.json.read_json with an explicit schema builds the typed columns
only: it cannot say what a column does not hold (_extra), and one value of
the wrong type fails the whole read, so it meets the lossless rules only
with a Python pass over every event on top of it (orjson.loads alone is
about a quarter of the Python path).  The figures it prints are CPU time
per event (time.process_time) over 5,000-event batches.
"""

from __future__ import annotations

import os
import random
import sys
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estat.encode.jsonl import JsonlEncoder  # noqa: E402
from estat.encode.parquet import ParquetEncoder  # noqa: E402
from estat.encoder import Batch  # noqa: E402
from estat.schema.columns import collect_table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N = 5000
EVENTS = ["page_view", "click", "scroll", "signup", "purchase", "search"]
TITLES = ["Café crème – menu", "東京の天気", "Überraschung! 🎉", "naïve résumé", "Pricing — Estat"]


def event(n: int, rng: random.Random) -> dict:
    return {
        "event": rng.choice(EVENTS), "id": f"1-{n}-{rng.randint(1, 10**6)}",
        "user_id": f"u-{rng.randint(1, 10**6)}", "session_id": "s-%08x" % rng.randint(0, 2**31),
        "path": "/p/%d" % rng.randint(1, 50),
        "referrer": "https://ref%d.example.com/p/%d" % (rng.randint(1, 50), rng.randint(1, 10**4)),
        "ua": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "screen": {"w": rng.randint(320, 2320), "h": rng.randint(480, 1680)},
        "value": rng.randint(0, 9999) + rng.randint(0, 99) / 100, "items": rng.randint(0, 20),
        "tags": ["t%d" % rng.randint(1, 100), "t%d" % rng.randint(1, 100)],
        "client_ts": 1764000000000 + n, "title": rng.choice(TITLES),
        "props": {"plan": rng.choice(["free", "pro"]),
                  "ab": {"exp": "e%d" % rng.randint(1, 20), "arm": rng.randint(0, 3)}},
        "_estat": {"received_at": "2026-12-06T14:40:04.%03dZ" % (n % 1000), "ip": "203.0.113.7",
                   "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Firefox/133.0"},
    }


def cpu_per_event(f, reps: int = 5) -> float:
    f()
    start = time.process_time()
    for _ in range(reps):
        f()
    return (time.process_time() - start) / reps / N * 1e6


def main() -> None:
    import pyarrow as pa
    import pyarrow.json as pj

    rng = random.Random(1)
    lines = [(0.0, orjson.dumps(event(n, rng))) for n in range(N)]
    batch = Batch(key="k", poison_key="p", events=lines, first_event_at=0, sealed_at=0)
    parquet = ParquetEncoder(collect_table(os.path.join(HERE, "schemas", "bench-event.json")))
    jsonl = JsonlEncoder(6)
    declared = pa.schema([f for f in parquet.schema if f.name != "_extra"])
    data = b"\n".join(line for _, line in lines)
    options = pj.ParseOptions(explicit_schema=declared, unexpected_field_behavior="ignore")
    single = pj.ReadOptions(use_threads=False, block_size=1 << 22)
    rows = [
        ("gzip-6 JSON Lines (JsonlEncoder)", cpu_per_event(lambda: jsonl.encode(batch))),
        ("Parquet, columns built in Python (ParquetEncoder)",
         cpu_per_event(lambda: parquet.encode(batch))),
        ("  of which orjson.loads of each line",
         cpu_per_event(lambda: [orjson.loads(x) for _, x in lines])),
        ("pyarrow.json.read_json, typed columns only, 1 thread",
         cpu_per_event(lambda: pj.read_json(pa.BufferReader(data), read_options=single,
                                            parse_options=options))),
    ]
    bad = data + b'\n{"event":"x","items":"many"}'
    try:
        pj.read_json(pa.BufferReader(bad), read_options=single, parse_options=options)
        mismatch = "read"
    except pa.ArrowInvalid as e:
        mismatch = f"ArrowInvalid: {str(e)[:80]}"
    print("| encoder | CPU µs/event |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    print(f"\nread_json with one misfit value in the batch: {mismatch}")


if __name__ == "__main__":
    main()
