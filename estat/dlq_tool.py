# -*- test-case-name: estat.test.test_dlq_tool -*-
"""
C{estat-dlq}: the dead-letter queue, for the person on call.

    estat-dlq status DIR          files, bytes, events, oldest and newest age
    estat-dlq replay DIR [opts]   upload everything now, same keys, resumable
    estat-dlq export DIR OUT      the events as plain JSON Lines ('-': stdout)

C{replay} reads the server's configuration exactly as C{twistd estat} does
(options, environment, C{.env}) and uploads each file under its original
key, so nothing is duplicated; a file is deleted once stored, so a stopped
replay resumes where it stopped.  It is safe while the server runs on the
same directory: both claim a file (an C{flock}) before uploading it, and
files are only ever read whole, after their atomic rename.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from functools import partial

from .dlq import QUARANTINE, SUFFIX, Claim, CorruptFile, dlq_file_created, read_dlq_file
from .fsutil import TEMP_PREFIX

__all__ = ["main", "dlq_files", "status"]


def dlq_files(directory: str) -> list[str]:
    """
    The dead-letter files of C{directory}, oldest first (a full listing:
    fine for a command run by hand, never done by the server's loop).
    """
    names = [e.name for e in os.scandir(directory)
             if e.name.endswith(SUFFIX) and not e.name.startswith(TEMP_PREFIX) and e.is_file()]
    return sorted(names)


def status(directory: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    files = dlq_files(directory)
    total_bytes = events = corrupt = 0
    for name in files:
        path = os.path.join(directory, name)
        try:
            total_bytes += os.path.getsize(path)
            events += read_dlq_file(path).count
        except FileNotFoundError:
            continue
        except CorruptFile:
            corrupt += 1
    quarantined = 0
    qdir = os.path.join(directory, QUARANTINE)
    if os.path.isdir(qdir):
        quarantined = len(os.listdir(qdir))
    return {
        "files": len(files),
        "bytes": total_bytes,
        "events": events,
        "corrupt": corrupt,
        "quarantined": quarantined,
        "oldest_age_s": now - dlq_file_created(files[0]) if files else None,
        "newest_age_s": now - dlq_file_created(files[-1]) if files else None,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def export(directory: str, out) -> int:
    """
    Write every event of every file, oldest first, as JSON Lines.
    """
    count = 0
    for name in dlq_files(directory):
        try:
            obj = read_dlq_file(os.path.join(directory, name))
        except (FileNotFoundError, CorruptFile) as e:
            print(f"estat-dlq: skipping {name}: {e}", file=sys.stderr)
            continue
        if obj.key.endswith(".parquet"):
            # OUTPUT_FORMAT=parquet: the JSON Lines jsonl mode would have
            # stored for the same events (pyarrow, only for such entries).
            from .encode.parquet import read_events
            from .encode.rows import dumps_json

            data = b"".join(dumps_json(e).encode("utf-8") + b"\n"
                            for e in read_events(obj.body))
        else:
            data = gzip.decompress(obj.body)
        out.write(data)
        count += data.count(b"\n")
    return count


class Progress:
    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + line[:100].ljust(100))
        elif self.done == self.total or self.done % 100 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


async def _replay(reactor, directory: str, config, out=sys.stderr) -> dict:
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
    # Only put_with_retries is used: a file that still fails stays in place.
    uploader = Uploader(store=store, dead_letters=None,
                        metrics=Metrics(CollectorRegistry()), clock=reactor,
                        run_in_thread=run_in_thread, retries=config.s3_app_retries)
    names = dlq_files(directory)
    print(f"replaying {len(names)} files from {directory} to {store.description}", file=out)
    progress = Progress(len(names), out)
    result = {"stored": 0, "events": 0, "failed": 0, "busy": 0, "corrupt": 0}
    for name in names:
        claim = await run_in_thread(Claim.take, os.path.join(directory, name))
        if claim is None:
            result["busy"] += 1
            progress.step(f"{name}: taken by the server or gone")
            continue
        try:
            try:
                obj = await run_in_thread(claim.read)
            except CorruptFile as e:
                result["corrupt"] += 1
                progress.step(f"{name}: corrupt ({e}), left in place")
                continue
            if await uploader.put_with_retries(obj, config.s3_app_retries):
                await run_in_thread(claim.remove)
                result["stored"] += 1
                result["events"] += obj.count
                progress.step(obj.key)
            else:
                result["failed"] += 1
                progress.step(f"{name}: upload failed, kept")
        finally:
            claim.release()
    progress.finish()
    return result


def _load_config(argv_options: dict):
    from .config import load_config, read_dotenv

    env_file = argv_options.pop("env_file", None) or os.environ.get("ENV_FILE", ".env")
    return load_config(argv_options, os.environ, read_dotenv(env_file))


def main(argv: list[str] | None = None) -> int:
    from .config import SETTINGS, ConfigError

    parser = argparse.ArgumentParser(prog="estat-dlq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="files, bytes, events, oldest and newest age")
    p_status.add_argument("dir")
    p_replay = sub.add_parser("replay", help="upload everything now with the server's configuration")
    p_replay.add_argument("dir")
    p_replay.add_argument("--env-file", default=None)
    for s in SETTINGS:
        p_replay.add_argument(f"--{s.option}", dest=s.attribute, default=None, help=s.help)
    p_export = sub.add_parser("export", help="write the events as plain JSON Lines")
    p_export.add_argument("dir")
    p_export.add_argument("out", help="output file, or - for stdout")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.dir):
        print(f"estat-dlq: {args.dir} is not a directory", file=sys.stderr)
        return 2
    if args.command == "status":
        st = status(args.dir)
        print(f"directory   {os.path.abspath(args.dir)}")
        print(f"files       {st['files']}")
        print(f"bytes       {st['bytes']}")
        print(f"events      {st['events']}")
        print(f"oldest      {_age(st['oldest_age_s'])} ago")
        print(f"newest      {_age(st['newest_age_s'])} ago")
        if st["corrupt"] or st["quarantined"]:
            print(f"corrupt     {st['corrupt']} (quarantined: {st['quarantined']})")
        return 0
    if args.command == "export":
        if args.out == "-":
            count = export(args.dir, sys.stdout.buffer)
            sys.stdout.flush()
        else:
            with open(args.out, "wb") as f:
                count = export(args.dir, f)
        print(f"exported {count} events", file=sys.stderr)
        return 0

    options = {s.attribute: getattr(args, s.attribute) for s in SETTINGS}
    options["env_file"] = args.env_file
    try:
        config = _load_config(options)
    except ConfigError as e:
        print(f"estat-dlq: {e}", file=sys.stderr)
        return 2
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    outcome = {}

    def run(reactor):
        d = Deferred.fromCoroutine(_replay(reactor, args.dir, config))
        d.addCallback(outcome.update)
        return d

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            return int(e.code)
    print(f"stored {outcome.get('stored', 0)} files ({outcome.get('events', 0)} events); "
          f"failed {outcome.get('failed', 0)}, busy {outcome.get('busy', 0)}, "
          f"corrupt {outcome.get('corrupt', 0)}", file=sys.stderr)
    return 1 if outcome.get("failed") or outcome.get("corrupt") else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
