# -*- test-case-name: estat.test.test_e2e_tables -*-
"""
End to end: real query engines over what the real server stored.

A real C{twistd estat} (C{OUTPUT_FORMAT=parquet}, C{PARTITION_BY=event},
a schema file declaring typed fields) takes drifting traffic over HTTP
(mixed types, undeclared keys, a key differing from a declared one only by
case, misfits inside a struct and a list, partition values that need
percent-encoding, missing and non-string partition values), once on the
local directory store and once on a moto S3 server (whose objects are
then downloaded into a directory).  After SIGTERM, what it stored is read
by:

 - DuckDB, with the view C{estat-tables --engine duckdb} prints: counts
   per partition value (decoded), typed columns, misfits in C{_extra};
 - C{pyarrow.dataset}: every file has exactly the stream's Arrow schema;
 - Spark in local mode, with the DDL C{estat-tables --engine spark}
   prints: C{count(*)}, a group-by on a typed column, filters on the
   partition key.  Spark decodes a percent-encoded partition value one
   byte per character (ISO-8859-1), not as UTF-8: C{東京} reads as
   C{æ\\x9d±äº¬}; the test asserts exactly that and the
   C{decode(encode(event, 'ISO-8859-1'), 'UTF-8')} that undoes it.

Everything listens on and talks to 127.0.0.1.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from estat.test.harness import BUCKET, LOOPBACK, EstatProcess, MotoServer, stop_process

pytestmark = pytest.mark.e2e

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "count": {"type": "integer"},
        "price": {"type": "number"},
        "ok": {"type": "boolean"},
        "at": {"type": "string", "format": "date-time"},
        "page": {"type": "object", "properties": {"url": {"type": "string"},
                                                  "scrollY": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}

#: Partition values: plain, one with '/' and a space, one not ASCII.
VALUES = ["page view", "a/b c", "東京", "signup"]
TOKYO_AS_SPARK_READS_IT = "東京".encode("utf-8").decode("iso-8859-1")


def traffic(count: int = 60) -> list:
    """
    Drifting events, each with an undeclared C{id}.
    """
    events = []
    for i in range(count):
        e = {"id": f"e{i}"}
        kind = i % 6
        if kind < 4:
            e["event"] = VALUES[kind]
        elif kind == 5:
            e["event"] = i  # not a string: misfit, and no partition value
        e["count"] = i if i % 5 else f"#{i}"
        e["ok"] = (i % 3 == 0) if i % 7 else "yes"
        e["price"] = i * 0.25
        e["at"] = "2026-12-06T10:00:00Z" if i % 4 else "not a time"
        e["page"] = ({"url": f"/p{i}", "scrollY": i} if i % 2
                     else {"url": f"/p{i}", "scrollY": "far", "undeclared": True})
        e["tags"] = ["a", "b"] if i % 3 else ["a", 1]
        e["Count"] = -i  # differs from "count" only by case
        if i % 8 == 0:
            e[f"k{i}"] = {"nested": [i, str(i)]}
        events.append(e)
    return events


def partition_value(event: dict):
    value = event.get("event")
    return value if type(value) is str and value else None


# --- running the server -----------------------------------------------------------


def _write_schema(directory: str) -> str:
    path = os.path.join(directory, "schema.json")
    with open(path, "w") as f:
        json.dump(SCHEMA, f)
    return path


def _post_all(estat: EstatProcess, events: list) -> None:
    conn = estat.connection(timeout=10)
    try:
        for event in events:
            conn.request("POST", "/collect",
                         body=json.dumps(event, ensure_ascii=False).encode("utf-8"),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 202, (response.status, body)
    finally:
        conn.close()


def _run_server(directory: str, env: dict, events: list) -> EstatProcess:
    """
    Start the server, send C{events}, stop it with SIGTERM and wait for
    its clean exit (which seals and stores every batch).
    """
    env = {"OUTPUT_FORMAT": "parquet", "PARTITION_BY": "event",
           "COLLECT_SCHEMA": _write_schema(directory), "BATCH_SIZE": "7",
           "FLUSH_INTERVAL": "60s", "SHUTDOWN_TIMEOUT": "20s", **env}
    os.mkdir(os.path.join(directory, "estat"))
    estat = EstatProcess(env, directory=os.path.join(directory, "estat"))
    try:
        estat.wait_ready()
        _post_all(estat, events)
        estat.terminate()
        code = estat.wait(40)
        assert code == 0, f"estat exited {code}:\n{estat.log_tail()}"
    finally:
        stop_process(estat.proc)
    dlq = estat.dlq_dir
    assert not os.path.isdir(dlq) or not [n for n in os.listdir(dlq) if n.endswith(".gz")], \
        "nothing may be left in the dead-letter queue"
    return estat


def estat_tables(estat: EstatProcess, *args: str) -> str:
    """
    What C{estat-tables ARGS} prints with the server's environment and
    working directory.
    """
    done = subprocess.run([sys.executable, "-m", "estat.tables_tool", *args],
                          env=estat.env, cwd=estat.directory, capture_output=True,
                          timeout=60, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Stored:
    """
    What one server run stored: the events sent, the directory holding
    the stream's objects, the DDL estat-tables printed for it.
    """

    def __init__(self, name, events, root, location, duckdb_sql, spark_sql, schema_path):
        self.name = name
        self.schema_path = schema_path
        self.events = events
        self.root = root
        self.location = location
        self.duckdb_sql = duckdb_sql
        self.spark_sql = spark_sql


def _run_local(directory: str) -> Stored:
    events = traffic()
    estat = _run_server(directory, {}, events)
    root = os.path.join(estat.store_dir, "raw")
    duckdb_sql = estat_tables(estat, "--engine", "duckdb")
    spark_sql = estat_tables(estat, "--engine", "spark", "--table", "events_local")
    # The default location is the local store, as an absolute file URI.
    assert f"LOCATION 'file://{root}/';" in spark_sql, spark_sql
    return Stored("local", events, root, f"file://{root}/", duckdb_sql, spark_sql,
                  estat.env["COLLECT_SCHEMA"])


def _run_s3(directory: str) -> Stored:
    moto = MotoServer()
    try:
        prefix = f"tables-{uuid.uuid4().hex[:8]}"
        events = traffic()
        estat = _run_server(directory, {
            "RAW_BUCKET": BUCKET, "RAW_PREFIX": prefix, "S3_ENDPOINT_URL": moto.endpoint,
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key, "S3_TIMEOUT": "5s",
        }, events)
        download = os.path.join(directory, "download")
        objects = moto.objects(prefix + "/")
        assert objects, "the bucket holds the stream's objects"
        for key, body in objects.items():
            path = os.path.join(download, *key.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
    finally:
        moto.stop()
    root = os.path.join(download, prefix)
    # The default location is the bucket; the engines read the download.
    athena = estat_tables(estat, "--engine", "athena")
    assert f"LOCATION 's3://{BUCKET}/{prefix}/'" in athena, athena
    location = f"file://{root}/"
    duckdb_sql = estat_tables(estat, "--engine", "duckdb", "--location", location)
    spark_sql = estat_tables(estat, "--engine", "spark", "--location", location,
                             "--table", "events_s3")
    return Stored("s3", events, root, location, duckdb_sql, spark_sql,
                  estat.env["COLLECT_SCHEMA"])


@pytest.fixture(scope="module", params=["local", "s3"])
def stored(request):
    directory = tempfile.mkdtemp(prefix=f"estat-e2e-tables-{request.param}-")
    try:
        yield (_run_local if request.param == "local" else _run_s3)(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- DuckDB -------------------------------------------------------------------------


def test_duckdb(stored):
    """
    The printed view over the whole store: one row per event sent, counts
    per decoded partition value, typed columns, misfits in C{_extra}.
    """
    import duckdb

    db = duckdb.connect()
    try:
        db.execute(stored.duckdb_sql)
        sent = collections.Counter(partition_value(e) for e in stored.events)
        assert dict(db.sql("SELECT event, count(*) FROM estat_collect GROUP BY 1").fetchall()) \
            == dict(sent)
        types = {r[0]: r[1] for r in db.sql("DESCRIBE estat_collect").fetchall()}
        assert types["count"] == "BIGINT"
        assert types["price"] == "DOUBLE"
        assert types["ok"] == "BOOLEAN"
        assert types["at"] == "TIMESTAMP WITH TIME ZONE"
        assert types["tags"] == "VARCHAR[]"
        assert types["page"] == "STRUCT(url VARCHAR, scrollY BIGINT)"
        assert types["_extra"] == "VARCHAR"
        assert (types["event"], types["dt"], types["hour"]) == ("VARCHAR", "DATE", "INTEGER")
        rows = db.sql('SELECT event, "count", ok, price, page, tags, _extra, "at" '
                      "FROM estat_collect").fetchall()
    finally:
        db.close()
    assert len(rows) == len(stored.events)
    by_id = {json.loads(r[6])["id"]: r for r in rows}
    for e in stored.events:
        event, count, ok, price, page, tags, extra, at = by_id[e["id"]]
        extra = json.loads(extra)
        assert event == partition_value(e)
        assert extra["Count"] == e["Count"]
        if type(e["count"]) is int:
            assert (count, "count" in extra) == (e["count"], False)
        else:
            assert (count, extra["count"]) == (None, e["count"])
        if type(e["ok"]) is bool:
            assert ok is e["ok"]
        else:
            assert (ok, extra["ok"]) == (None, e["ok"])
        assert price == e["price"]
        assert page["url"] == e["page"]["url"]
        if type(e["page"]["scrollY"]) is int:
            assert page["scrollY"] == e["page"]["scrollY"]
        else:
            assert page["scrollY"] is None
            assert extra["page"] == {"scrollY": "far", "undeclared": True}
        if all(type(t) is str for t in e["tags"]):
            assert tags == e["tags"]
        else:
            assert (tags, extra["tags"]) == (None, e["tags"])
        if "event" in e and type(e["event"]) is not str:
            assert extra["event"] == e["event"]
        if e["at"] == "not a time":
            assert (at, extra["at"]) == (None, "not a time")
        else:
            assert at.isoformat() == "2026-12-06T10:00:00+00:00"
        for key in e:
            if key.startswith("k"):
                assert extra[key] == e[key]


# --- pyarrow.dataset ----------------------------------------------------------------


def test_pyarrow_dataset_one_schema(stored):
    """
    Every stored file has exactly the stream's Arrow schema (metadata
    included), whatever its events were.
    """
    import pyarrow.dataset as ds

    from estat.encode.parquet import arrow_schema
    from estat.schema.columns import collect_table

    expected = arrow_schema(collect_table(stored.schema_path))
    dataset = ds.dataset(stored.root, format="parquet", partitioning="hive",
                         exclude_invalid_files=False)
    fragments = list(dataset.get_fragments())
    assert len(fragments) > len(VALUES), "several files, several partitions"
    for fragment in fragments:
        assert fragment.physical_schema.equals(expected, check_metadata=True), \
            (fragment.path, fragment.physical_schema)
    assert dataset.count_rows() == len(stored.events)


# --- Spark ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("java is not installed (apt-get install openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    saved = os.environ.get("SPARK_LOCAL_IP")
    os.environ["SPARK_LOCAL_IP"] = LOOPBACK
    warehouse = tempfile.mkdtemp(prefix="estat-spark-")
    session = (SparkSession.builder.master("local[1]").appName("estat-e2e-tables")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", LOOPBACK)
               .config("spark.driver.bindAddress", LOOPBACK)
               .config("spark.sql.shuffle.partitions", "1")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.warehouse.dir", warehouse)
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        shutil.rmtree(warehouse, ignore_errors=True)
        if saved is None:
            os.environ.pop("SPARK_LOCAL_IP", None)
        else:
            os.environ["SPARK_LOCAL_IP"] = saved


def _statements(sql: str) -> list:
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]


def test_spark(spark, stored):
    """
    The printed Spark DDL, run as printed, then a count, a group-by on a
    typed column and filters on the partition key, each as sent.
    """
    statements = _statements(stored.spark_sql)
    assert statements[0].startswith("CREATE TABLE") and statements[-1].startswith("MSCK REPAIR")
    for statement in statements:
        spark.sql(statement)
    table = "events_" + stored.name
    sent = stored.events

    def one(sql):
        return spark.sql(sql).collect()[0][0]

    assert one(f"SELECT count(*) FROM {table}") == len(sent)
    by_ok = {r[0]: r[1] for r in spark.sql(f"SELECT ok, count(*) FROM {table} GROUP BY ok")
             .collect()}
    assert by_ok == dict(collections.Counter(e["ok"] if type(e["ok"]) is bool else None
                                             for e in sent))
    assert one(f"SELECT sum(`count`) FROM {table}") == sum(
        e["count"] for e in sent if type(e["count"]) is int)
    assert {r[0]: r[1] for r in spark.sql(f"DESCRIBE {table}").collect()
            if r[0] in ("count", "ok", "at", "tags", "event", "dt", "hour")} == {
        "count": "bigint", "ok": "boolean", "at": "timestamp", "tags": "array<string>",
        "event": "string", "dt": "date", "hour": "int"}
    sent_values = collections.Counter(partition_value(e) for e in sent)
    assert one(f"SELECT count(*) FROM {table} WHERE event = 'a/b c'") == sent_values["a/b c"]
    assert one(f"SELECT count(*) FROM {table} WHERE event = 'page view'") \
        == sent_values["page view"]
    assert one(f"SELECT count(*) FROM {table} WHERE event IS NULL") == sent_values[None]
    # Spark turns each %XX of a partition value into one character: UTF-8
    # bytes come back as ISO-8859-1 text.  This pins what it does.
    values = {r[0] for r in spark.sql(f"SELECT DISTINCT event FROM {table}").collect()}
    assert values == {"page view", "a/b c", "signup", None, TOKYO_AS_SPARK_READS_IT}, values
    assert one(f"SELECT count(*) FROM {table} WHERE event = '東京'") == 0
    assert one(f"SELECT count(*) FROM {table} "
               "WHERE decode(encode(event, 'ISO-8859-1'), 'UTF-8') = '東京'") == sent_values["東京"]
