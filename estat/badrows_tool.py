# -*- test-case-name: estat.test.test_badrows_tool -*-
"""
C{estat-badrows}: what was quarantined, by schema and error, and storing it
as good data once the plan or the client is fixed.

    estat-badrows list [--prefix bad] STORE_DIR
    estat-badrows resubmit [--dry-run] [--env-file F] [server options]

C{list} reads the bad rows under C{STORE_DIR/<prefix>/} of a local
directory store and prints, per stream and schema, how many events failed
and the commonest errors (pointer and keyword).

C{resubmit} reads the server's configuration exactly as C{twistd estat}
does (options, environment, C{.env}: the store, C{SCHEMAS}, C{OUTPUT_FORMAT},
the partitions), re-validates every bad row of the store against the
current plan and stores the events that now pass as the server would have
(same encoder, same partitions, under the stream's prefix).  For each bad
object, in this order:

 1. the good events go under a key derived from the bad object's key
    (C{RAW_PREFIX/.../dt=/hour=/<name>-resubmitted.jsonl.gz}), so a run
    stopped anywhere and run again overwrites instead of duplicating;
 2. the rows that still fail go to the bad object's next generation
    (C{<name>.r1.jsonl.gz}, then C{.r2}, ...), so the next fix of the plan
    gets a good key of its own;
 3. the bad object is deleted.

Until step 3 the bad row is kept; a generation whose previous one is still
there is left for a later run (the previous one is finished first).  An
object none of whose rows passes is not touched, so running it again
changes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import uuid
from collections import Counter

__all__ = ["main", "summarise", "read_bad_object", "sort_rows", "good_key",
           "next_generation", "previous_generations", "resubmit"]

SUFFIXES = (".jsonl.gz", ".parquet")
_GENERATION = re.compile(r"^(?P<stem>.*?)(?:\.r(?P<n>[0-9]+))?(?P<suffix>\.jsonl\.gz|\.parquet)$")
#: Names the messageIds given to resubmitted Segment messages that had
#: none (the server draws a random one; a re-run must draw the same).
_MESSAGE_IDS = uuid.UUID("4c7f3b1e-8a52-4d0e-9a43-0a1f6c2b9e11")


def read_bad_object(key: str, body: bytes) -> list:
    """
    The bad rows of one stored object (gzip JSON Lines, or Parquet).
    """
    if key.endswith(".parquet"):
        from .encode.badrows import read_bad_rows

        return read_bad_rows(body)
    # json, not orjson: integers beyond 64 bits stay integers.
    return [json.loads(line) for line in gzip.decompress(body).splitlines() if line.strip()]


def bad_rows(directory: str):
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(SUFFIXES) and not name.startswith("."):
                with open(os.path.join(root, name), "rb") as f:
                    yield from read_bad_object(name, f.read())


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


# --- keys -----------------------------------------------------------------------


def _parts(key: str):
    m = _GENERATION.match(key)
    if m is None:
        raise ValueError(f"{key!r} is not a bad-row object")
    return m.group("stem"), int(m.group("n") or 0), m.group("suffix")


def next_generation(key: str, suffix: str | None = None) -> str:
    """
    The key the rows of bad object C{key} that still fail are written to.
    """
    stem, n, own = _parts(key)
    return f"{stem}.r{n + 1}{suffix or own}"


def previous_generations(key: str) -> list:
    """
    The keys whose still-failing rows C{key} would have been written from
    (either format: C{OUTPUT_FORMAT} may have changed in between).
    """
    stem, n, _ = _parts(key)
    if n == 0:
        return []
    before = stem if n == 1 else f"{stem}.r{n - 1}"
    return [before + s for s in SUFFIXES]


def good_key(bad_key: str, bad_prefix: str, good_prefix: str, suffix: str) -> str:
    """
    Where the events of bad object C{bad_key} that now pass are stored:
    the stream's prefix, the bad object's C{dt}/C{hour} and name, marked
    C{-resubmitted} (no key the server makes ends so), before the
    partitions the encoder puts in front of C{dt}.
    """
    if not bad_key.startswith(bad_prefix + "/"):
        raise ValueError(f"{bad_key!r} is not under {bad_prefix!r}")
    parts = bad_key[len(bad_prefix) + 1:].split("/")
    at = next((i for i, p in enumerate(parts) if p.startswith("dt=")), None)
    if at is None:
        raise ValueError(f"{bad_key!r} has no dt= partition")
    stem, n, _ = _parts(parts[-1])
    name = f"{stem}{f'.r{n}' if n else ''}-resubmitted{suffix}"
    return "/".join([good_prefix] + parts[at:-1] + [name])


# --- re-validation --------------------------------------------------------------


def _segment_message(row: dict, payload: dict):
    kind = row.get("type") or payload.get("type")
    message = payload if "type" in payload or kind is None else dict(payload, type=kind)
    name = message.get("event") if kind == "track" else kind
    return kind, message, name


def sort_rows(plan, stream: str, rows: list, key: str, anonymize: bool = False) -> tuple:
    """
    Re-validate C{rows} (the bad rows of object C{key}) against C{plan}.

    @return: C{(good, bad)}: the queued events C{(received_at, line)} of the
        rows that now pass (or fail a schema in C{flag} mode: with their
        C{_estat.schema_errors}), each as the server would have stored it;
        and the rows that still fail, their C{schema} and C{errors} those
        of the current plan.
    """
    from .event import make_line
    from .ingest.segment_rules import Received, normalise, parse_time
    from .ingest.validation import errors_field

    good, bad = [], []
    for index, row in enumerate(rows):
        payload = row.get("payload")
        server = row.get("_estat") if type(row.get("_estat")) is dict else {}
        if stream == "segment" and type(payload) is dict:
            kind, message, name = _segment_message(row, payload)
            check = plan.check(stream, message, name)
        else:
            kind = None
            check = plan.check(stream, payload)
        if check is not None and check.total and check.mode != "flag":
            bad.append(dict(row, schema=check.schema, errors=errors_field(check),
                            errors_total=check.total))
            continue
        fields = dict(server)
        if check is not None and check.total:
            fields["schema_errors"] = errors_field(check)
        text = server.get("received_at")
        received_at = parse_time(text) or 0.0
        if stream == "segment" and kind is not None:
            received = Received(received_at=received_at, ip=server.get("ip"),
                                user_agent=server.get("user_agent"),
                                source=server.get("source"), anonymize=anonymize)
            ident = str(uuid.uuid5(_MESSAGE_IDS, f"{key}#{index}"))
            event = normalise(kind, payload, {}, received, text, new_id=lambda: ident)
        else:
            event = payload
        good.append((received_at, make_line(event, fields, None)))
    return good, bad


# --- the run --------------------------------------------------------------------


async def resubmit(store, uploader, run_in_thread, plan, streams: dict, bad_prefix: str,
                   dry_run: bool = False, out=sys.stderr, anonymize: bool = False) -> dict:
    """
    Re-submit every bad object of C{store} (see the module's docstring).

    @param streams: C{{stream: (good prefix, good encoder, key maker,
        bad encoder)}}, the encoders as the server builds them.
    @return: counts: C{objects} read, C{resubmitted} events stored as good,
        C{still_bad} events kept, C{untouched} objects, C{failed} objects
        (a store error: kept as they were), C{waiting} generations left
        for a later run.
    """
    from .encoder import Batch
    from .interfaces import StoreError

    result = Counter(objects=0, resubmitted=0, still_bad=0, untouched=0, failed=0,
                     waiting=0)
    for stream, (good_prefix, encoder, key_maker, bad_encoder) in streams.items():
        prefix = f"{bad_prefix}/{stream}"
        keys = [k for k in await store.keys(prefix + "/") if k.endswith(SUFFIXES)
                and not k.rsplit("/", 1)[-1].startswith(".")]
        present = set(keys)
        for key in keys:
            if any(k in present for k in previous_generations(key)):
                result["waiting"] += 1
                continue
            result["objects"] += 1
            try:
                body = await store.get(key)
                rows = await run_in_thread(read_bad_object, key, body)
                good, bad = sort_rows(plan, stream, rows, key, anonymize)
                if not good:
                    result["untouched"] += 1
                    result["still_bad"] += len(bad)
                    continue
                target = good_key(key, prefix, good_prefix, encoder.suffix)
                out.write(f"{key}: {len(good)} now pass -> {target}; "
                          f"{len(bad)} still fail\n")
                if dry_run:
                    result["resubmitted"] += len(good)
                    result["still_bad"] += len(bad)
                    continue
                first = min(t for t, _ in good)
                batch = Batch(key=target, poison_key=key_maker.poison_key(target),
                              events=good, first_event_at=first, sealed_at=first)
                objects = await run_in_thread(encoder.encode, batch)
                if not await _put_all(uploader, objects):
                    result["failed"] += 1
                    continue
                if bad:
                    from .encode.rows import dumps_json

                    rest = next_generation(key, bad_encoder.suffix)
                    lines = [(parse_time_or_zero(r), dumps_json(r).encode("utf-8"))
                             for r in bad]
                    remainder = Batch(key=rest, poison_key=key_maker.poison_key(rest),
                                      events=lines, first_event_at=first, sealed_at=first)
                    if not await _put_all(uploader, await run_in_thread(bad_encoder.encode,
                                                                        remainder)):
                        result["failed"] += 1
                        continue
                await store.delete(key)
            except (StoreError, ValueError, OSError) as e:
                out.write(f"{key}: {e}; kept as it is\n")
                result["failed"] += 1
                continue
            result["resubmitted"] += len(good)
            result["still_bad"] += len(bad)
    return dict(result)


def parse_time_or_zero(row: dict) -> float:
    from .ingest.segment_rules import parse_time

    server = row.get("_estat")
    return (parse_time(server.get("received_at")) if type(server) is dict else None) or 0.0


async def _put_all(uploader, objects) -> bool:
    for obj in objects:
        if not await uploader.put_with_retries(obj, uploader.retries):
            return False
    return True


def build_streams(config) -> tuple:
    """
    C{(plan, streams)} for L{resubmit}, from the server's configuration.

    @raise estat.config.ConfigError: no plan, or one that does not load.
    """
    from .config import ConfigError
    from .keys import KeyMaker
    from .tap import _plan, _tables, bad_encoding, stream_encoding

    plan = _plan(config)
    if plan is None:
        raise ConfigError("SCHEMAS is not set: there is no plan to re-validate against")
    collect_table, segment_table = _tables(config)
    streams = {}
    for stream, prefix, dlq, table in (
            ("collect", config.raw_prefix, config.dlq_prefix, collect_table),
            ("segment", config.segment_prefix, f"{config.dlq_prefix}/{config.segment_prefix}",
             segment_table)):
        key_maker = KeyMaker(prefix, dlq, "resubmit")
        encoder, _ = stream_encoding(config, table, key_maker)
        bad_prefix = f"{config.bad_prefix}/{stream}"
        bad_keys = KeyMaker(bad_prefix, f"{config.dlq_prefix}/{bad_prefix}", "resubmit")
        bad_encoder, _ = bad_encoding(config, stream, bad_keys, partitioned=False)
        streams[stream] = (prefix, encoder, key_maker, bad_encoder)
    return plan, streams


async def _run_resubmit(reactor, config, dry_run: bool, out=sys.stderr) -> dict:
    from functools import partial

    from prometheus_client import CollectorRegistry
    from twisted.internet.threads import deferToThreadPool

    from .metrics import Metrics
    from .store.local import LocalDirectoryStore
    from .uploader import Uploader

    run_in_thread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    if config.raw_bucket:
        from .store.s3 import S3Store

        store = S3Store.from_config(config, reactor=reactor, run_in_thread=run_in_thread)
    else:
        store = LocalDirectoryStore(root=config.local_store_dir, run_in_thread=run_in_thread)
    uploader = Uploader(store=store, dead_letters=None, metrics=Metrics(CollectorRegistry()),
                        clock=reactor, run_in_thread=run_in_thread,
                        retries=config.s3_app_retries)
    plan, streams = build_streams(config)
    out.write(f"re-validating the bad rows of {store.description} against {config.schemas}\n")
    try:
        return await resubmit(store, uploader, run_in_thread, plan, streams, config.bad_prefix,
                              dry_run=dry_run, out=out, anonymize=config.ip_anonymize)
    finally:
        pool = getattr(store, "pool", None)
        if pool is not None:
            await pool.closeCachedConnections()


def _resubmit_command(args, settings) -> int:
    from .config import ConfigError, load_config, read_dotenv

    options = {s.attribute: getattr(args, s.attribute) for s in settings}
    env_file = args.env_file or os.environ.get("ENV_FILE", ".env")
    try:
        config = load_config(options, os.environ, read_dotenv(env_file))
        build_streams(config)  # a bad plan is one line, before the reactor runs
    except ConfigError as e:
        print(f"estat-badrows: {e}", file=sys.stderr)
        return 2
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    outcome: dict = {}

    def run(reactor):
        d = Deferred.fromCoroutine(_run_resubmit(reactor, config, args.dry_run))
        d.addCallback(outcome.update)
        return d

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            return int(e.code)
    verb = "would store" if args.dry_run else "stored"
    print(f"{verb} {outcome.get('resubmitted', 0)} events as good; "
          f"{outcome.get('still_bad', 0)} still fail; objects read {outcome.get('objects', 0)}, "
          f"untouched {outcome.get('untouched', 0)}, failed {outcome.get('failed', 0)}, "
          f"waiting {outcome.get('waiting', 0)}", file=sys.stderr)
    return 1 if outcome.get("failed") else 0


def main(argv: list | None = None, out=sys.stdout) -> int:
    from .config import SETTINGS

    parser = argparse.ArgumentParser(prog="estat-badrows", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="quarantined events by schema and error")
    listing.add_argument("store", help="LOCAL_STORE_DIR")
    listing.add_argument("--prefix", default="bad", help="BAD_PREFIX [bad]")
    again = sub.add_parser("resubmit", help="store the bad rows that pass the current plan")
    again.add_argument("--dry-run", action="store_true", help="say what would be stored")
    again.add_argument("--env-file", default=None)
    for s in SETTINGS:
        again.add_argument(f"--{s.option}", dest=s.attribute, default=None, help=s.help)
    args = parser.parse_args(argv)
    if args.command == "resubmit":
        return _resubmit_command(args, SETTINGS)
    summary = summarise(bad_rows(os.path.join(args.store, args.prefix)))
    for (stream, schema), (events, errors) in sorted(summary.items()):
        out.write(f"{stream} {schema}: {events} events\n")
        for (pointer, keyword), count in errors.most_common(10):
            out.write(f"  {count:>8}  {keyword:<20} {pointer or '(the event)'}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
