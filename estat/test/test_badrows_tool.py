# -*- test-case-name: estat.test.test_badrows_tool -*-
from __future__ import annotations

import gzip
import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from estat.badrows_tool import main


class ListTests(SynchronousTestCase):
    def test_list_by_schema_and_error(self) -> None:
        store = self.mktemp()
        path = os.path.join(store, "bad", "collect", "dt=2026-12-01", "hour=08")
        os.makedirs(path)
        rows = [{"stream": "collect", "schema": "event.json",
                 "errors": [{"pointer": "/price", "keyword": "type", "message": "m"}]}] * 3 + \
               [{"stream": "collect", "schema": "event.json",
                 "errors": [{"pointer": "", "keyword": "required", "message": "m"}]}]
        with gzip.open(os.path.join(path, "x.jsonl.gz"), "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        out = io.StringIO()
        self.assertEqual(main(["list", store], out=out), 0)
        self.assertEqual(out.getvalue().splitlines(), [
            "collect event.json: 4 events",
            "         3  type                 /price",
            "         1  required             (the event)",
        ])


# --- resubmit -------------------------------------------------------------------

import orjson  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from estat.badrows_tool import (  # noqa: E402
    good_key, next_generation, previous_generations, read_bad_object, resubmit, sort_rows)
from estat.encode.jsonl import JsonlEncoder  # noqa: E402
from estat.interfaces import IObjectBrowser, StoreError  # noqa: E402
from estat.keys import KeyMaker  # noqa: E402
from estat.metrics import Metrics  # noqa: E402
from estat.schema.plan import load_plan  # noqa: E402
from estat.store.local import LocalDirectoryStore  # noqa: E402
from estat.testing import MemoryObjectStore, read_lines, run_synchronously  # noqa: E402
from zope.interface.verify import verifyObject  # noqa: E402

BAD_KEY = "bad/collect/dt=2026-12-01/hour=08/e2e-20261201T080000000Z-0123456789abcdef.jsonl.gz"
SERVER = {"received_at": "2026-12-01T08:00:00.000Z", "ip": "127.0.0.1", "user_agent": "t",
          "source": None}


def write_plan(directory: str, strict: bool) -> str:
    os.makedirs(directory, exist_ok=True)
    schema = {"type": "object", "properties": {"price": {"type": "number"}},
              "required": ["price"] if strict else []}
    with open(os.path.join(directory, "event.json"), "w") as f:
        json.dump(schema, f)
    order = {"type": "object", "properties": {"properties": {
        "type": "object", "required": ["total"] if strict else []}}}
    with open(os.path.join(directory, "order.json"), "w") as f:
        json.dump(order, f)
    path = os.path.join(directory, "plan.yaml")
    with open(path, "w") as f:
        f.write("collect: {mode: quarantine, default: event.json}\n"
                "segment: {mode: quarantine, schemas: {Order Completed: order.json}}\n")
    return path


def bad_line(payload, stream="collect", **extra) -> dict:
    return {"bad_row": "schema_violation", "stream": stream, "schema": "event.json",
            "errors": [{"pointer": "", "keyword": "required", "message": "m"}],
            "errors_total": 1, "payload": payload, **extra, "_estat": dict(SERVER)}


def gz(rows) -> bytes:
    return gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows), mtime=0)


class KeyTests(SynchronousTestCase):
    def test_generations(self) -> None:
        self.assertEqual(next_generation(BAD_KEY), BAD_KEY.replace(".jsonl.gz", ".r1.jsonl.gz"))
        r1 = next_generation(BAD_KEY)
        self.assertEqual(next_generation(r1, ".parquet"), BAD_KEY.replace(".jsonl.gz", ".r2.parquet"))
        self.assertEqual(previous_generations(BAD_KEY), [])
        self.assertEqual(previous_generations(r1), [BAD_KEY, BAD_KEY[:-len(".jsonl.gz")] + ".parquet"])

    def test_good_key_keeps_dt_hour_and_name(self) -> None:
        self.assertEqual(
            good_key(BAD_KEY, "bad/collect", "raw", ".jsonl.gz"),
            "raw/dt=2026-12-01/hour=08/e2e-20261201T080000000Z-0123456789abcdef"
            "-resubmitted.jsonl.gz")
        partitioned = "bad/collect/source=web/dt=2026-12-01/hour=08/x.r2.parquet"
        self.assertEqual(good_key(partitioned, "bad/collect", "raw", ".parquet"),
                         "raw/dt=2026-12-01/hour=08/x.r2-resubmitted.parquet")


class SortRowsTests(SynchronousTestCase):
    def test_collect_rows_pass_or_stay(self) -> None:
        plan = load_plan(write_plan(self.mktemp(), strict=True))
        rows = [bad_line({"price": 3}), bad_line({"price": "3"})]
        good, bad = sort_rows(plan, "collect", rows, BAD_KEY)
        self.assertEqual([orjson.loads(line) for _, line in good],
                         [{"price": 3, "_estat": SERVER}])
        self.assertEqual([b["payload"] for b in bad], [{"price": "3"}])
        self.assertEqual(bad[0]["errors"][0]["keyword"], "type")
        self.assertEqual(good[0][0], 1796112000.0)

    def test_segment_message_is_normalised_with_a_stable_id(self) -> None:
        plan = load_plan(write_plan(self.mktemp(), strict=False))
        row = bad_line({"event": "Order Completed", "userId": "u", "properties": {}},
                       stream="segment", type="track")
        runs = [sort_rows(plan, "segment", [json.loads(json.dumps(row))], BAD_KEY)
                for _ in range(2)]
        self.assertEqual(runs[0], runs[1])
        message = orjson.loads(runs[0][0][0][1])
        self.assertEqual(message["type"], "track")
        self.assertEqual(message["receivedAt"], SERVER["received_at"])
        self.assertEqual(message["context"]["ip"], "127.0.0.1")
        self.assertTrue(message["messageId"])
        self.assertEqual(message["_estat"], SERVER)


class ResubmitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryObjectStore()
        self.plan_dir = self.mktemp()
        self.store.objects[BAD_KEY] = gz([bad_line({"n": 1}), bad_line({"n": 2, "price": "x"}),
                                          bad_line({"n": 3, "price": 1})])

    def streams(self):
        keys = KeyMaker("raw", "raw_dlq", "resubmit")
        bad_keys = KeyMaker("bad/collect", "raw_dlq/bad/collect", "resubmit")
        return {"collect": ("raw", JsonlEncoder(6, "collect"), keys,
                            JsonlEncoder(6, "bad_collect")),
                "segment": ("segment", JsonlEncoder(6, "segment"),
                            KeyMaker("segment", "raw_dlq/segment", "r"),
                            JsonlEncoder(6, "bad_segment"))}, bad_keys

    def resubmit(self, strict: bool = False) -> dict:
        plan = load_plan(write_plan(self.plan_dir, strict))
        uploader_store = self.store
        from estat.uploader import Uploader

        uploader = Uploader(store=uploader_store, dead_letters=None,
                            metrics=Metrics(CollectorRegistry()), clock=Clock(),
                            run_in_thread=run_synchronously, retries=0)
        streams, _ = self.streams()
        return self.successResultOf(Deferred.fromCoroutine(resubmit(
            self.store, uploader, run_synchronously, plan, streams, "bad", out=io.StringIO())))

    def payloads(self, prefix: str) -> list:
        return sorted((orjson.loads(line) for key in sorted(self.store.objects)
                       if key.startswith(prefix) for line in read_lines(self.store.objects[key])),
                      key=lambda e: e.get("n", e.get("payload", {}).get("n")))

    def test_unchanged_plan_touches_nothing(self) -> None:
        self.store.objects[BAD_KEY] = gz([bad_line({"n": 1}), bad_line({"n": 2, "price": "x"})])
        before = dict(self.store.objects)
        self.assertEqual(self.resubmit(strict=True)["untouched"], 1)
        self.assertEqual(self.store.objects, before)

    def test_fixed_plan_stores_once_and_keeps_the_rest(self) -> None:
        result = self.resubmit()
        self.assertEqual((result["resubmitted"], result["still_bad"]), (2, 1))
        good = self.payloads("raw/")
        self.assertEqual([e["n"] for e in good], [1, 3])
        self.assertEqual(sorted(self.store.objects), [
            next_generation(BAD_KEY),
            good_key(BAD_KEY, "bad/collect", "raw", ".jsonl.gz")])
        self.assertEqual([r["payload"]["n"] for r in self.payloads("bad/")], [2])
        # Running it again changes nothing.
        after = dict(self.store.objects)
        self.assertEqual(self.resubmit()["untouched"], 1)
        self.assertEqual(self.store.objects, after)

    def test_stopped_after_the_good_copy_resumes_without_duplicates(self) -> None:
        # The good copy is stored, then the store refuses the remainder.
        real_put = self.store.put

        def put(key, body, md5):
            if key.startswith("bad/"):
                from twisted.internet.defer import fail

                return fail(StoreError("InternalError", retryable=False))
            return real_put(key, body, md5)

        self.store.put = put
        self.assertEqual(self.resubmit()["failed"], 1)
        self.assertIn(BAD_KEY, self.store.objects)
        del self.store.put
        self.assertEqual(self.resubmit()["resubmitted"], 2)
        self.assertEqual([e["n"] for e in self.payloads("raw/")], [1, 3])
        self.assertEqual([r["payload"]["n"] for r in self.payloads("bad/")], [2])

    def test_a_generation_waits_for_the_previous_one(self) -> None:
        # Stopped after the remainder was written, before the delete.
        self.resubmit()
        rest = next_generation(BAD_KEY)
        self.store.objects[BAD_KEY] = gz([bad_line({"n": 1}), bad_line({"n": 2, "price": "x"}),
                                          bad_line({"n": 3, "price": 1})])
        result = self.resubmit()
        self.assertEqual(result["waiting"], 1)
        self.assertEqual(sorted(self.store.objects), sorted([
            rest, good_key(BAD_KEY, "bad/collect", "raw", ".jsonl.gz")]))
        self.assertEqual([e["n"] for e in self.payloads("raw/")], [1, 3])


class BrowserTests(SynchronousTestCase):
    def check(self, store) -> None:
        verifyObject(IObjectBrowser, store)
        for key in ("bad/a/1.jsonl.gz", "bad/b/2.jsonl.gz", "raw/3.jsonl.gz"):
            self.successResultOf(store.put(key, key.encode(), ""))
        self.assertEqual(self.successResultOf(store.keys("bad/")),
                         ["bad/a/1.jsonl.gz", "bad/b/2.jsonl.gz"])
        self.assertEqual(self.successResultOf(store.get("raw/3.jsonl.gz")), b"raw/3.jsonl.gz")
        self.successResultOf(store.delete("bad/a/1.jsonl.gz"))
        self.successResultOf(store.delete("bad/a/1.jsonl.gz"))
        self.assertEqual(self.successResultOf(store.keys("bad/")), ["bad/b/2.jsonl.gz"])
        self.assertEqual(self.failureResultOf(store.get("bad/a/1.jsonl.gz"), StoreError)
                         .value.code, "NoSuchKey")

    def test_local(self) -> None:
        self.check(LocalDirectoryStore(root=self.mktemp(), run_in_thread=run_synchronously))

    def test_memory(self) -> None:
        self.check(MemoryObjectStore())

    def test_read_bad_object(self) -> None:
        body = gzip.compress(b'{"a":%d}\n' % 2 ** 70)
        self.assertEqual(read_bad_object("x.jsonl.gz", body), [{"a": 2 ** 70}])


class ParquetListTests(SynchronousTestCase):
    def test_list_reads_parquet_bad_rows(self) -> None:
        from estat.encode.badrows import BadRowEncoder
        from estat.encoder import Batch

        store = self.mktemp()
        path = os.path.join(store, "bad", "collect", "event=a", "dt=2026-12-01", "hour=08")
        os.makedirs(path)
        rows = [bad_line({"n": i}) for i in range(2)]
        body = BadRowEncoder("collect").encode(Batch(
            key="k.parquet", poison_key="p", first_event_at=0.0, sealed_at=0.0,
            events=[(0.0, orjson.dumps(r)) for r in rows]))[0].body
        with open(os.path.join(path, "x.parquet"), "wb") as f:
            f.write(body)
        out = io.StringIO()
        self.assertEqual(main(["list", store], out=out), 0)
        self.assertEqual(out.getvalue().splitlines(), [
            "collect event.json: 2 events", "         2  required             (the event)"])
