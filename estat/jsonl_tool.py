"""
C{estat-jsonl}: stored Parquet files back to the JSON Lines that
C{OUTPUT_FORMAT=jsonl} would have written for the same events (key order
aside).  Each file describes itself (L{estat.encode.parquet.read_events}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main", "lines_of"]


def _files(paths: list) -> list:
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, _, names in os.walk(path):
                found.extend(os.path.join(root, n) for n in names if n.endswith(".parquet"))
            out.extend(sorted(found, key=lambda p: os.path.relpath(p, path)))
        elif os.path.exists(path):
            out.append(path)
        else:
            raise SystemExit(f"estat-jsonl: {path}: no such file or directory")
    return out


def lines_of(data: bytes) -> list:
    """
    The JSON lines (bytes, no newline) of one stored Parquet file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .encode.parquet import read_events

    metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
    if b"estat.table" not in metadata:
        raise ValueError("no estat.table metadata")
    return [json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            for e in read_events(data)]


def main(argv=None, stdout=None, stderr=None) -> int:
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    parser = argparse.ArgumentParser(prog="estat-jsonl", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    parser.add_argument("-o", "--output")
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args(argv)
    try:
        files = _files(args.paths)
    except SystemExit as e:
        print(e, file=stderr)
        return 2
    lines = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            lines.extend(lines_of(data))
        except Exception as e:
            print(f"estat-jsonl: {path}: not an Estat Parquet file ({type(e).__name__})",
                  file=stderr)
            return 2
    body = b"".join(line + b"\n" for line in lines)
    if args.gzip:
        from .encoder import gzip_bytes

        body = gzip_bytes(body, 6)
    if args.output:
        with open(args.output, "wb") as f:
            f.write(body)
    else:
        stdout.write(body)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
