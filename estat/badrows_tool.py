# -*- test-case-name: estat.test.test_badrows_tool -*-
"""
C{estat-badrows}: what was quarantined, by schema and error.

    estat-badrows list [--prefix bad] STORE_DIR

reads the bad rows (gzip JSON Lines) under C{STORE_DIR/<prefix>/} of a local
directory store and prints, per stream and schema, how many events failed
and the commonest errors (pointer and keyword).  Re-submitting bad rows
after a fix is not written yet.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import Counter

__all__ = ["main", "summarise"]


def bad_rows(directory: str):
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".jsonl.gz"):
                with gzip.open(os.path.join(root, name), "rt", encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield json.loads(line)


def summarise(rows) -> dict:
    """
    C{{(stream, schema): (events, Counter of (pointer, keyword))}}.
    """
    out: dict = {}
    for row in rows:
        key = (row.get("stream"), row.get("schema"))
        events, errors = out.setdefault(key, [0, Counter()])
        out[key][0] = events + 1
        for error in row.get("errors", ()):
            errors[(error.get("pointer"), error.get("keyword"))] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv: list | None = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="estat-badrows", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="quarantined events by schema and error")
    listing.add_argument("store", help="LOCAL_STORE_DIR")
    listing.add_argument("--prefix", default="bad", help="BAD_PREFIX [bad]")
    args = parser.parse_args(argv)
    summary = summarise(bad_rows(os.path.join(args.store, args.prefix)))
    for (stream, schema), (events, errors) in sorted(summary.items()):
        out.write(f"{stream} {schema}: {events} events\n")
        for (pointer, keyword), count in errors.most_common(10):
            out.write(f"  {count:>8}  {keyword:<20} {pointer or '(the event)'}\n")
    return 0
