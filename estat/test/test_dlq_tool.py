# -*- test-case-name: estat.test.test_dlq_tool -*-
"""
Tests for C{estat-dlq}: status, export and replay of a dead-letter
directory, and its safety beside a server working on the same directory.

Replay runs the real command in a subprocess (it runs its own reactor),
against the local directory store and against a moto S3 server.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from estat.dlq import SUFFIX, Claim, encode_dlq_file
from estat.dlq_tool import dlq_files, export, main, status
from estat.encoder import encode_object

NOW = 1_800_000_000.0


def events(prefix: str, n: int) -> list:
    return [json.dumps({"id": f"{prefix}-{i}"}, separators=(",", ":")).encode() for i in range(n)]


class DLQDirectoryMixin:
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="estat-dlq-tool-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def add_file(self, created: float, key: str, lines: list) -> str:
        obj = encode_object(key, lines, 6)
        name = f"{int(created * 1e9):020d}-{os.urandom(4).hex()}{SUFFIX}"
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(encode_dlq_file(obj, created))
        return name


class StatusTests(DLQDirectoryMixin, SynchronousTestCase):
    def test_counts_files_bytes_events_and_ages(self):
        first = self.add_file(NOW - 3600, "raw/a.jsonl.gz", events("a", 3))
        self.add_file(NOW - 60, "raw/b.jsonl.gz", events("b", 5))
        # Unfinished writes are not files of the queue.
        open(os.path.join(self.directory, ".tmp-123-abc"), "wb").close()
        st = status(self.directory, now=NOW)
        self.assertEqual(st["files"], 2)
        self.assertEqual(st["events"], 8)
        self.assertEqual(st["bytes"], sum(
            os.path.getsize(os.path.join(self.directory, n)) for n in dlq_files(self.directory)))
        self.assertAlmostEqual(st["oldest_age_s"], 3600, places=3)
        self.assertAlmostEqual(st["newest_age_s"], 60, places=3)
        self.assertEqual(dlq_files(self.directory)[0], first)

    def test_corrupt_files_are_counted_not_fatal(self):
        self.add_file(NOW - 10, "raw/a.jsonl.gz", events("a", 2))
        name = self.add_file(NOW - 5, "raw/b.jsonl.gz", events("b", 2))
        path = os.path.join(self.directory, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3)
        st = status(self.directory, now=NOW)
        self.assertEqual((st["files"], st["events"], st["corrupt"]), (2, 2, 1))

    def test_empty_directory(self):
        st = status(self.directory, now=NOW)
        self.assertEqual((st["files"], st["events"], st["oldest_age_s"]), (0, 0, None))

    def test_command_prints_status(self):
        self.add_file(NOW - 10, "raw/a.jsonl.gz", events("a", 4))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["status", self.directory]), 0)
        self.assertIn("files       1", out.getvalue())
        self.assertIn("events      4", out.getvalue())

    def test_not_a_directory(self):
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["status", os.path.join(self.directory, "missing")]), 2)
        self.assertIn("is not a directory", err.getvalue())


class ExportTests(DLQDirectoryMixin, SynchronousTestCase):
    def test_exports_every_event_oldest_first(self):
        self.add_file(NOW - 5, "raw/b.jsonl.gz", events("b", 2))
        self.add_file(NOW - 50, "raw/a.jsonl.gz", events("a", 3))
        out = io.BytesIO()
        self.assertEqual(export(self.directory, out), 5)
        self.assertEqual(out.getvalue().splitlines(), events("a", 3) + events("b", 2))

    def test_command_writes_a_file(self):
        self.add_file(NOW - 5, "raw/a.jsonl.gz", events("a", 2))
        target = os.path.join(self.directory, "out.jsonl")
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main(["export", self.directory, target]), 0)
        with open(target, "rb") as f:
            self.assertEqual(f.read().splitlines(), events("a", 2))


def run_tool(*args: str, env: dict) -> subprocess.CompletedProcess:
    tool = os.path.join(os.path.dirname(sys.executable), "estat-dlq")
    return subprocess.run([tool, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def clean_env(**extra) -> dict:
    from estat.config import SETTINGS

    names = {s.env for s in SETTINGS} | {"ENV_FILE"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("AWS_")}
    env.update(extra)
    return env


class ReplayLocalTests(DLQDirectoryMixin, SynchronousTestCase):
    """
    C{estat-dlq replay} with the server's configuration: no bucket, so the
    local directory store.
    """

    def store_dir(self) -> str:
        return os.path.join(self.directory, "store")

    def test_replays_under_the_same_keys_and_deletes(self):
        self.add_file(NOW - 50, "raw/dt=2027-01-15/hour=08/x-1.jsonl.gz", events("a", 3))
        self.add_file(NOW - 5, "raw/dt=2027-01-15/hour=08/x-2.jsonl.gz", events("b", 2))
        result = run_tool("replay", self.directory,
                          env=clean_env(LOCAL_STORE_DIR=self.store_dir(), ENV_FILE="/nonexistent"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("stored 2 files (5 events)", result.stderr)
        self.assertEqual(dlq_files(self.directory), [])
        for name, prefix, n in (("x-1", "a", 3), ("x-2", "b", 2)):
            path = os.path.join(self.store_dir(), "raw", "dt=2027-01-15", "hour=08",
                                f"{name}.jsonl.gz")
            with open(path, "rb") as f:
                self.assertEqual(gzip.decompress(f.read()).splitlines(), events(prefix, n))

    def test_option_beats_environment(self):
        self.add_file(NOW - 5, "raw/a.jsonl.gz", events("a", 1))
        other = os.path.join(self.directory, "other-store")
        result = run_tool("replay", self.directory, "--local-store-dir", other,
                          env=clean_env(LOCAL_STORE_DIR=self.store_dir(), ENV_FILE="/nonexistent"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.exists(os.path.join(other, "raw", "a.jsonl.gz")))
        self.assertFalse(os.path.exists(self.store_dir()))

    def test_resumes_and_leaves_a_file_the_server_holds(self):
        """
        A file claimed by another process (the server's retry loop) is
        passed over, not uploaded at the same time; a second run finishes
        the job once it is released.
        """
        held = self.add_file(NOW - 50, "raw/held.jsonl.gz", events("h", 2))
        self.add_file(NOW - 5, "raw/free.jsonl.gz", events("f", 2))
        claim = Claim.take(os.path.join(self.directory, held))
        self.assertIsNotNone(claim)
        try:
            result = run_tool("replay", self.directory,
                              env=clean_env(LOCAL_STORE_DIR=self.store_dir(),
                                            ENV_FILE="/nonexistent"))
        finally:
            claim.release()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("busy 1", result.stderr)
        self.assertEqual(dlq_files(self.directory), [held])
        self.assertFalse(os.path.exists(os.path.join(self.store_dir(), "raw", "held.jsonl.gz")))
        again = run_tool("replay", self.directory,
                         env=clean_env(LOCAL_STORE_DIR=self.store_dir(), ENV_FILE="/nonexistent"))
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(dlq_files(self.directory), [])
        self.assertTrue(os.path.exists(os.path.join(self.store_dir(), "raw", "held.jsonl.gz")))

    def test_failed_upload_keeps_the_file_and_exits_non_zero(self):
        self.add_file(NOW - 5, "raw/a.jsonl.gz", events("a", 1))
        # The store directory cannot be created: its parent is a file.
        blocker = os.path.join(self.directory, "blocker")
        open(blocker, "wb").close()
        result = run_tool("replay", self.directory, "--s3-app-retries", "0",
                          env=clean_env(LOCAL_STORE_DIR=os.path.join(blocker, "store"),
                                        ENV_FILE="/nonexistent"))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("failed 1", result.stderr)
        self.assertEqual(len(dlq_files(self.directory)), 1)

    def test_bad_setting_is_one_line(self):
        result = run_tool("replay", self.directory,
                          env=clean_env(BATCH_SIZE="abc", ENV_FILE="/nonexistent"))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)
        self.assertIn("BATCH_SIZE", result.stderr)


class ReplayS3Tests(DLQDirectoryMixin, SynchronousTestCase):
    """
    Replay into a real S3 API (moto, SigV4 checked), twice over: the second
    run finds nothing, and the bucket holds each object once.
    """

    def test_replay_into_s3(self):
        from estat.test.harness import MotoServer

        moto = MotoServer()
        self.addCleanup(moto.stop)
        self.add_file(NOW - 50, "raw/dt=2027-01-15/hour=08/x-1.jsonl.gz", events("a", 3))
        self.add_file(NOW - 5, "raw/dt=2027-01-15/hour=08/x-2.jsonl.gz", events("b", 2))
        env = clean_env(RAW_BUCKET=moto.bucket, S3_ENDPOINT_URL=moto.endpoint,
                        AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID=moto.access_key,
                        AWS_SECRET_ACCESS_KEY=moto.secret_key, ENV_FILE="/nonexistent",
                        AWS_EC2_METADATA_DISABLED="true",
                        AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
        result = run_tool("replay", self.directory, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(run_tool("replay", self.directory, env=env).returncode, 0)
        self.assertEqual(moto.keys("raw/"), ["raw/dt=2027-01-15/hour=08/x-1.jsonl.gz",
                                            "raw/dt=2027-01-15/hour=08/x-2.jsonl.gz"])
        self.assertEqual([json.dumps(e, separators=(",", ":")).encode()
                          for e in moto.events("raw/")], events("a", 3) + events("b", 2))
        self.assertEqual(dlq_files(self.directory), [])
