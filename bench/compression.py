#!/usr/bin/env python
"""
gzip CPU and size per library and level, on the benchmark's batches.

Batches are JSON Lines made the way the server makes them (estat's own
make_line, so the server fields are in every line) from varied events of
300-500 bytes with non-ASCII text and nested objects, the same shape as
bench/run.py's wrk generator.  Each library and level compresses a
5,000-event batch (BATCH_SIZE's default) and a set of 100-event batches.

CPU is time.process_time over enough calls to fill --min-cpu seconds, the
median of --runs runs; the machine is shared, so the spread is printed too.
"vs zlib 6" is the compressed size over stdlib zlib level 6's on the same
batch (below 100.0 % is smaller).

A second table checks that each compressor lets go of the GIL: while a
worker thread compresses the 5,000-event batch, the main thread (standing
for the reactor) ticks and the longest gap between two ticks is reported,
with sys.setswitchinterval(0.001) as the server sets it.

    python bench/compression.py [--runs 7] [--min-cpu 0.2] [--out bench/RESULTS.md]

The table replaces the "## Compression" section of --out (the rest of the
file is kept); --out - prints only.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import zlib  # noqa: E402

import orjson  # noqa: E402

import estat.encoder  # noqa: E402
from estat.event import format_received_at, make_line  # noqa: E402
from sections import write_section  # noqa: E402

try:
    from zlib_ng import zlib_ng
except ImportError:  # pragma: no cover
    zlib_ng = None
try:
    import deflate
except ImportError:  # pragma: no cover
    deflate = None
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover
    isal_zlib = None

SECTION = "## Compression"

PATHS = ["/", "/pricing", "/docs/getting-started", "/blog/2026/11/launch-week", "/signup",
         "/account/settings", "/products/42?ref=home", "/search?q=twisted+python",
         "/ko/블로그/출시-주간", "/ja/ドキュメント/はじめに"]
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "okhttp/4.12.0", "python-requests/2.32.3"]
EVENTS = ["page_view", "click", "scroll", "signup", "purchase", "search"]
TITLES = ["가격 안내", "시작하기 — 빠른 설치", "출시 주간: 새로운 기능 🎉", "계정 설정",
          "ドキュメント: はじめに", "Préférences du compte", "Größentabelle & Versand",
          "Поиск по сайту", "ข้อเสนอพิเศษ", "Café ☕ menu", "Pricing", "Getting started"]
LANGS = ["ko-KR", "en-US", "ja-JP", "fr-FR", "de-DE", "ru-RU", "th-TH"]
SEARCHES = ["twisted 파이썬", "naïve café", "東京 ホテル", "s3 gzip", "größe", "배송 조회"]


VARIANTS = {
    # A choice must not hang on one shape of data: two more, sizes only.
    "wrk": "as bench/run.py's wrk events, the user agent in the body and no User-Agent header",
    "sdk": "the user agent both in the body and in the header",
}


def make_events(count: int, seed: int = 1, variant: str = "") -> list:
    """
    C{count} JSON lines as the server stores them (server fields included).
    """
    rnd = random.Random(seed)
    thread_id = rnd.randint(1, 10**9)
    t0 = 1764000000.0
    lines = []
    for n in range(1, count + 1):
        ua = rnd.choice(UAS)
        event = {
            "event": rnd.choice(EVENTS),
            "id": f"{thread_id}-{n}-{rnd.randint(1, 10**6)}",
            "user_id": f"u-{rnd.randint(1, 10**6)}",
            "session_id": f"s-{rnd.randint(0, 0x7fffffff):08x}",
            "path": rnd.choice(PATHS),
            "referrer": f"https://ref{rnd.randint(1, 50)}.example.com/p/{rnd.randint(1, 10**4)}",
            "screen": {"w": 320 + rnd.randint(1, 2000), "h": 480 + rnd.randint(1, 1200)},
            "page": {"title": rnd.choice(TITLES), "lang": rnd.choice(LANGS),
                     "section": {"depth": rnd.randint(0, 4), "visible": rnd.random() < 0.8}},
            "value": round(rnd.uniform(0, 10000), 2),
            "items": rnd.randint(0, 20),
            "tags": [f"t{rnd.randint(1, 100)}" for _ in range(rnd.randint(1, 4))],
            "client_ts": 1764000000000 + n,
        }
        if rnd.random() < 0.3:
            event["props"] = {"query": rnd.choice(SEARCHES), "results": rnd.randint(0, 500),
                              "filters": {"sort": rnd.choice(["relevance", "newest"]),
                                          "page": rnd.randint(1, 9)}}
        if variant in ("wrk", "sdk"):
            event = dict(event)  # a copy, so the keys can be reordered
            items = list(event.items())
            at = [k for k, _ in items].index("referrer") + 1
            event = dict(items[:at] + [("ua", ua)] + items[at:])
        if variant == "wrk":
            ua = None
        raw = orjson.dumps(event)
        received = t0 + n * 0.0002
        server = {
            "received_at": format_received_at(received),
            "ip": f"203.0.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}",
            "user_agent": ua,
        }
        line = make_line(event, server, raw)
        assert type(line) is bytes
        lines.append(line)
    return lines


def join(lines: list) -> bytes:
    return b"\n".join(lines) + b"\n"


def compressors() -> list:
    """
    (library, level, function) for every library present.
    """
    out = [("zlib", level, (lambda data, lv=level: zlib.compress(data, lv, wbits=31)))
           for level in range(1, 10)]
    if zlib_ng is not None:
        out += [("zlib-ng", level, (lambda data, lv=level: zlib_ng.compress(data, lv, wbits=31)))
                for level in range(1, 10)]
    if deflate is not None:
        # bytes(): gzip_compress returns a bytearray; the server stores bytes.
        out += [("libdeflate", level,
                 (lambda data, lv=level: bytes(deflate.gzip_compress(data, lv))))
                for level in range(1, 13)]
    if isal_zlib is not None:
        out += [("isal", level, (lambda data, lv=level: isal_zlib.compress(data, lv, wbits=31)))
                for level in range(0, 4)]
    return out


def cpu_per_call(fn, inputs: list, runs: int, min_cpu: float) -> tuple:
    """
    Median (and min, max) CPU seconds to compress all of C{inputs} once.
    """
    start = time.process_time()
    for data in inputs:
        fn(data)
    once = max(time.process_time() - start, 1e-6)
    reps = max(1, int(min_cpu / once + 0.5))
    results = []
    for _ in range(runs):
        start = time.process_time()
        for _ in range(reps):
            for data in inputs:
                fn(data)
        results.append((time.process_time() - start) / reps)
    return statistics.median(results), min(results), max(results)


def gil_stall(fn, data: bytes, calls: int) -> tuple:
    """
    While a worker thread runs C{fn(data)} C{calls} times, the main thread
    behaves like an idle reactor: it sleeps 1 ms at a time and notes how
    late it wakes (it needs the GIL to go on).  Returns the worker's wall
    time, the latest wake-up and the 99th percentile.
    """
    done = threading.Event()

    def work():
        for _ in range(calls):
            fn(data)
        done.set()

    worker = threading.Thread(target=work)
    late = []
    start = time.perf_counter()
    worker.start()
    while not done.is_set():
        before = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - before - 0.001)
    worker.join()
    wall = time.perf_counter() - start
    late.sort()
    return wall, late[-1], late[int(len(late) * 0.99)]


def instructions_worker(library: str, level: int, paths: list) -> None:
    """
    Under valgrind: compress each file in C{paths} once (level -1: only
    read them, the baseline).
    """
    datas = [open(p, "rb").read() for p in paths]
    if level < 0:
        return
    [fn] = [f for lib, lv, f in compressors() if (lib, lv) == (library, level)]
    for data in datas:
        fn(data)


def count_instructions(library: str, level: int, paths: list) -> int:
    """
    User-space instructions (valgrind callgrind's Ir) of one worker run.
    """
    import subprocess
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         os.path.abspath(__file__), "--instructions-worker", library, str(level), *paths],
        capture_output=True, text=True, check=True)
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(out.stderr[-2000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--min-cpu", type=float, default=0.2,
                        help="CPU seconds per run (calls are repeated to fill it)")
    parser.add_argument("--small", type=int, default=20, help="how many 100-event batches")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per MB under valgrind (slow; no noise)")
    parser.add_argument("--instructions-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instructions_worker:
        library, level, *paths = args.instructions_worker
        instructions_worker(library, int(level), paths)
        return 0

    events = make_events(5000)
    big = join(events)
    small = [join(events[i:i + 100]) for i in range(0, 100 * args.small, 100)]
    small_bytes = sum(map(len, small))
    sizes = [len(e) for e in events]
    print(f"5,000-event batch: {len(big):,} bytes, lines {min(sizes)}-{max(sizes)} bytes "
          f"(mean {statistics.mean(sizes):.0f}); {len(small)} x 100-event batches: "
          f"{small_bytes:,} bytes", flush=True)

    if args.instructions:
        import tempfile
        work = tempfile.mkdtemp(prefix="estat-compression-")
        big_path = os.path.join(work, "big.jsonl")
        small_paths = [os.path.join(work, f"small-{i:02d}.jsonl") for i in range(len(small))]
        for path, data in [(big_path, big), *zip(small_paths, small)]:
            with open(path, "wb") as f:
                f.write(data)
        baselines = {}

    variants = {name: join(make_events(5000, variant=name)) for name in VARIANTS}
    ref_variants = {name: len(zlib.compress(data, 6, wbits=31)) for name, data in variants.items()}
    ref_big = len(zlib.compress(big, 6, wbits=31))
    ref_small = sum(len(zlib.compress(s, 6, wbits=31)) for s in small)
    rows = []
    for library, level, fn in compressors():
        out = fn(big)
        assert zlib.decompress(out, 31) == big, (library, level)
        assert out[:4] == b"\x1f\x8b\x08\x00" and out[4:8] == b"\0\0\0\0", (library, level)
        size_big = len(out)
        size_small = sum(len(fn(s)) for s in small)
        cpu_big = cpu_per_call(fn, [big], args.runs, args.min_cpu)
        cpu_small = cpu_per_call(fn, small, args.runs, args.min_cpu)
        row = {
            "library": library, "level": level,
            "big_ms_mb": [c * 1e3 / (len(big) / 1e6) for c in cpu_big],
            "big_us_event": cpu_big[0] * 1e6 / 5000,
            "big_ratio": len(big) / size_big, "big_vs": 100.0 * size_big / ref_big,
            "small_ms_mb": [c * 1e3 / (small_bytes / 1e6) for c in cpu_small],
            "small_vs": 100.0 * size_small / ref_small,
            "variants_vs": [100.0 * len(fn(data)) / ref_variants[name]
                            for name, data in variants.items()],
        }
        if args.instructions and library == "libdeflate" and level > 9:
            row["big_ir"] = row["small_ir"] = None  # minutes under valgrind, and not offered
        elif args.instructions:
            if library not in baselines:
                baselines[library] = (count_instructions(library, -1, [big_path]),
                                      count_instructions(library, -1, small_paths))
            base_big, base_small = baselines[library]
            row["big_ir"] = (count_instructions(library, level, [big_path]) - base_big) \
                / (len(big) / 1e6)
            row["small_ir"] = (count_instructions(library, level, small_paths) - base_small) \
                / (small_bytes / 1e6)
        rows.append(row)
        if row.get("big_ir"):
            print(f"{library:>10} {level:>2}  instructions/byte: 5000 {row['big_ir'] / 1e6:.1f}, "
                  f"100 {row['small_ir'] / 1e6:.1f}", flush=True)
        print(f"{library:>10} {level:>2}  5000: {row['big_ms_mb'][0]:7.2f} ms/MB "
              f"{row['big_vs']:6.1f} %   100: {row['small_ms_mb'][0]:7.2f} ms/MB "
              f"{row['small_vs']:6.1f} %", flush=True)

    # The GIL check: each library at the level GZIP_LEVEL=6 maps to, and a
    # control that holds the GIL for about as long (orjson serialising the
    # batch's events eight times over, in one call).
    sys.setswitchinterval(0.001)
    objs = [orjson.loads(e) for e in events] * 8
    levels = getattr(estat.encoder, "LEVELS", {6: 6})
    checks = [
        ("zlib 6", lambda d: zlib.compress(d, 6, wbits=31)),
        ("zlib-ng 6", (lambda d: zlib_ng.compress(d, 6, wbits=31)) if zlib_ng else None),
        (f"libdeflate {levels[6]}", (lambda d: deflate.gzip_compress(d, levels[6]))
         if deflate else None),
        ("isal 3", (lambda d: isal_zlib.compress(d, 3, wbits=31)) if isal_zlib else None),
        ("control: orjson.dumps, holds the GIL", lambda d: orjson.dumps(objs)),
    ]
    gil_rows = []
    for name, fn in checks:
        if fn is None:
            continue
        trials = [gil_stall(fn, big, 3) for _ in range(3)]
        per_call = statistics.median(t[0] for t in trials) / 3
        latest = statistics.median(t[1] for t in trials)
        p99 = statistics.median(t[2] for t in trials)
        gil_rows.append((name, per_call, latest, p99))
        print(f"GIL {name}: one call {per_call * 1e3:.1f} ms wall, 1 ms timer up to "
              f"{latest * 1e3:.2f} ms late, p99 {p99 * 1e3:.2f} ms", flush=True)

    text = render(rows, gil_rows, args, len(big), small_bytes, len(small), sizes)
    print()
    print(text)
    if args.out != "-":
        write_section(args.out, text, SECTION)
    return 0


def spread(values) -> str:
    median, low, high = values
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


def render(rows, gil_rows, args, big_len, small_bytes, small_count, sizes) -> str:
    levels = getattr(estat.encoder, "LEVELS", {})
    library = getattr(estat.encoder, "LIBRARY", "?")
    lines = [
        SECTION,
        "",
        f"`python bench/compression.py --runs {args.runs} --min-cpu {args.min_cpu} "
        f"--small {args.small}{' --instructions' if args.instructions else ''}` "
        f"(`make bench` runs it without --instructions), {time.strftime('%Y-%m-%d')}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs shared with other work. "
        f"Batches as the server stores them (make_line, server fields included): one "
        f"5,000-event batch of {big_len / 1e6:.2f} MB (lines {min(sizes)}-{max(sizes)} bytes, "
        f"mean {statistics.mean(sizes):.0f}, non-ASCII text, nested objects) and "
        f"{small_count} 100-event batches ({small_bytes / 1e6:.2f} MB). CPU is process time "
        f"per MB of input, the median (min-max) of {args.runs} runs; \"vs zlib 6\" is the "
        "compressed size over stdlib zlib level 6's (below 100 % is smaller). "
        "Every output is one gzip member with MTIME 0 that zlib decompresses back. "
        "Variants (sizes only, 5,000 events): "
        + "; ".join(f"{name}: {text}" for name, text in VARIANTS.items()) + "."
        + (" \"M instr/MB\" is millions of user-space instructions per MB of input counted "
           "by valgrind (callgrind), which the shared machine's load does not disturb; it "
           "is not time (instructions per cycle differ between libraries, and valgrind "
           "may report fewer SIMD features than the CPU has)." if args.instructions else ""),
        "",
    ]
    ir = args.instructions
    head = ["library", "level", "5,000 events: CPU ms/MB", "µs/event"]
    head += ["M instr/MB"] if ir else []
    head += ["ratio", "vs zlib 6", "100 events: CPU ms/MB"]
    head += ["M instr/MB"] if ir else []
    head += ["vs zlib 6"] + [f"vs zlib 6, variant {name}" for name in VARIANTS]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def count(value) -> str:
        return "-" if value is None else f"{value / 1e6:.1f}"

    for r in rows:
        cells = [r["library"], str(r["level"]), spread(r["big_ms_mb"]), f"{r['big_us_event']:.2f}"]
        cells += [count(r["big_ir"])] if ir else []
        cells += [f"{r['big_ratio']:.2f}", f"{r['big_vs']:.1f} %", spread(r["small_ms_mb"])]
        cells += [count(r["small_ir"])] if ir else []
        cells += [f"{r['small_vs']:.1f} %"] + [f"{v:.1f} %" for v in r["variants_vs"]]
        lines.append("| " + " | ".join(cells) + " |")
    mapping = ", ".join(f"{g}→{levels[g]}" for g in sorted(levels))
    fit = sorted((r for r in rows if max(r["big_vs"], r["small_vs"], *r["variants_vs"]) <= 100.0),
                 key=lambda r: r["big_ms_mb"][0])
    near = [r for r in rows if r["big_vs"] <= 100.0 and r["small_vs"] <= 100.0 and r not in fit]

    def candidate(r) -> str:
        text = f"{r['library']} {r['level']} {r['big_ms_mb'][0]:.2f} ms/MB"
        if r.get("big_ir"):
            text += f" ({r['big_ir'] / 1e6:.1f} M instr/MB)"
        return text + f" at {r['big_vs']:.1f} %"

    lines += [
        "",
        "At or below zlib 6's size on both batch sizes and both variants, cheapest first "
        "(5,000-event batch): " + "; ".join(candidate(r) for r in fit[:5]) + "."
        + (" At or below it on the main batches but over it on a variant: "
           + "; ".join(f"{r['library']} {r['level']} (up to {max(r['variants_vs']):.1f} %)"
                       for r in near) + "." if near else ""),
        "",
        f"Estat compresses with {library}; `GZIP_LEVEL` maps to its levels as {mapping}.",
        "",
        "GIL: while a worker thread compresses the 5,000-event batch three times, the main "
        "thread stands for an idle reactor: it sleeps 1 ms at a time and needs the GIL to "
        "wake. `sys.setswitchinterval(0.001)` as in the server; median of 3 trials. Work "
        "that lets go of the GIL leaves the timer about as late as the machine's scheduling "
        "does; work that holds it (the control, orjson serialising the events eight times "
        "over in one call) makes it as late as one call.",
        "",
        "| work in the thread | one call, ms wall | 1 ms timer, latest wake-up, ms late "
        "| p99, ms late |",
        "| --- | --- | --- | --- |",
    ]
    for name, per_call, latest, p99 in gil_rows:
        lines.append(f"| {name} | {per_call * 1e3:.1f} | {latest * 1e3:.2f} | {p99 * 1e3:.2f} |")
    return "\n".join(lines) + "\n"



if __name__ == "__main__":
    sys.exit(main())
