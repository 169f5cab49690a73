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
   prints (a table C{<name>_files} over the files and the view C{<name>}):
   through the view, C{count(*)}, a group-by on a typed column, filters on
   the partition keys, each as sent.  Spark decodes a percent-encoded
   partition value one byte per character (ISO-8859-1), not as UTF-8:
   C{東京} reads as C{æ\\x9d±äº¬} in C{<name>_files}, and the view's
   C{decode(encode(event, 'ISO-8859-1'), 'UTF-8')} gives back C{東京}.
   EXPLAIN shows which partitions a filter reads: those on C{dt}, C{hour}
   and the decoded C{event} through the view are pruned.  Every byte of a
   partition value, 0x00-0xFF, reads back exactly through C{encode(...,
   'ISO-8859-1')}; a client's own value C{__HIVE_DEFAULT_PARTITION__}
   (stored as C{%5F_HIVE_DEFAULT_PARTITION__}) is one partition with the
   null one to Spark, which reads only one of the two.

Everything listens on and talks to 127.0.0.1.
"""

from __future__ import annotations

import collections
import json
import os
import re
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
    The printed Spark DDL, run as printed; then, through the view, a
    count, a group-by on a typed column and filters on the partition keys,
    each as sent.
    """
    statements = _statements(stored.spark_sql)
    assert [s.split("\n")[0].split(" (")[0] for s in statements] == [
        f"CREATE TABLE IF NOT EXISTS `events_{stored.name}_files`",
        f"MSCK REPAIR TABLE `events_{stored.name}_files`",
        f"CREATE OR REPLACE VIEW `events_{stored.name}` AS"], statements
    for statement in statements:
        spark.sql(statement)
    table = "events_" + stored.name
    files = table + "_files"
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
    # The view has every column of the table over the files, in order, of
    # the same type.
    assert spark.table(table).schema == spark.table(files).schema
    sent_values = collections.Counter(partition_value(e) for e in sent)
    # Through the view, every value is as sent, the non-ASCII one too.
    values = dict(spark.sql(f"SELECT event, count(*) FROM {table} GROUP BY event").collect())
    assert values == dict(sent_values), values
    for value in VALUES:
        assert one(f"SELECT count(*) FROM {table} WHERE event = '{value}'") \
            == sent_values[value], value
    assert one(f"SELECT count(*) FROM {table} WHERE event IS NULL") == sent_values[None]
    # The raw table holds what Spark itself reads: each %XX one character.
    raw = {r[0] for r in spark.sql(f"SELECT DISTINCT event FROM {files}").collect()}
    assert raw == {"page view", "a/b c", "signup", None, TOKYO_AS_SPARK_READS_IT}, raw
    assert one(f"SELECT count(*) FROM {files} WHERE event = '東京'") == 0

    # Which partitions a filter reads, as Spark's EXPLAIN says: the view's
    # filters on dt, hour and the decoded event prune as the raw table's do.
    partitions = {tuple(r) for r in
                  spark.sql(f"SELECT DISTINCT event, dt, hour FROM {files}").collect()}
    dt, hour = next(iter(partitions))[1:]
    in_hour = [p for p in partitions if p[1:] == (dt, hour)]
    tokyo = [p for p in partitions if p[0] == TOKYO_AS_SPARK_READS_IT]
    where_hour = f"dt = DATE'{dt}' AND hour = {hour}"
    assert one(f"SELECT count(*) FROM {table} WHERE {where_hour}") == one(
        f"SELECT count(*) FROM {files} WHERE {where_hour}") > 0
    assert one(f"SELECT count(*) FROM {table} WHERE dt < DATE'2000-01-01'") == 0
    assert one(f"SELECT count(*) FROM {table} WHERE {where_hour} AND event = '東京'") \
        == one(f"SELECT count(*) FROM {files} WHERE {where_hour} "
               f"AND event = '{TOKYO_AS_SPARK_READS_IT}'")
    assert _scan(spark, f"SELECT count(*) FROM {files}") == ("CatalogFileIndex", "1", "")
    assert _scan(spark, f"SELECT count(*) FROM {table} WHERE {where_hour}")[:2] \
        == ("InMemoryFileIndex", str(len(in_hour)))
    assert _scan(spark, f"SELECT count(*) FROM {table} WHERE dt < DATE'2000-01-01'")[:2] \
        == ("InMemoryFileIndex", "0")
    scan = _scan(spark, f"SELECT count(*) FROM {table} WHERE event = '東京'")
    assert scan[:2] == ("InMemoryFileIndex", str(len(tokyo))), scan
    assert "StringDecode.decode(" in scan[2], scan
    scan = _scan(spark, f"SELECT count(*) FROM {files} WHERE event = 'signup'")
    assert scan == ("InMemoryFileIndex", str(len([p for p in partitions if p[0] == "signup"])),
                    "isnotnull(event#), (event# = signup)"), scan


_SCAN = re.compile(r"FileScan .* Location: (\w+)\((\d+) paths\).*, PartitionFilters: \[(.*?)\]?, "
                   r"PushedFilters")


def _scan(spark, sql: str) -> tuple:
    """
    The file index of the one file scan of C{sql}'s plan, how many paths
    it reads (the table's root, unpruned, or one per partition selected)
    and its partition filters (expression ids dropped).
    """
    plan = spark.sql("EXPLAIN " + sql).collect()[0][0]
    scans = _SCAN.findall(plan)
    assert len(scans) == 1, plan
    index, paths, filters = scans[0]
    return index, paths, re.sub(r"#\d+", "#", filters)


def test_spark_partition_value_bytes(spark):
    """
    Spark reads each %XX of a partition value as the character U+00XX;
    encode(..., 'ISO-8859-1') gives back exactly the bytes of the path, for
    every byte 0x80-0xFF and every ASCII one, and the view gives back each
    value the server encodes (ASCII, '%', non-ASCII) as it was sent.
    """
    from urllib.parse import unquote_to_bytes

    import pyarrow as pa
    import pyarrow.parquet as pq

    from estat.config import Config
    from estat.pipeline.partitions import DEFAULT, encode_value
    from estat.tables_tool import layout_of, render

    directory = tempfile.mkdtemp(prefix="estat-spark-bytes-")
    try:
        schema = os.path.join(directory, "schema.json")
        with open(schema, "w") as f:
            json.dump({"type": "object", "properties": {"event": {"type": "string"}}}, f)
        sent = ["".join(map(chr, range(n, n + 32))) for n in range(0, 128, 32)] + [
            "page view", "a/b c", "50% off", "%25", "100%", "%", "東京", "é", "\U0001f600",
            "..", "__HIVE_DEFAULT_PARTITION__", None]
        raw_bytes = [bytes(range(n, n + 32)) for n in range(0x80, 0x100, 32)]
        names = [encode_value(v) for v in sent] + [
            "".join(f"%{b:02X}" for b in chunk) for chunk in raw_bytes]
        assert len(set(names)) == len(names) and names[len(sent) - 1] == DEFAULT
        for name in names:
            path = os.path.join(directory, "raw", f"event={name}", "dt=2026-12-06", "hour=10")
            os.makedirs(path)
            pq.write_table(pa.table({"_extra": [json.dumps(name)]}),
                           os.path.join(path, "0.parquet"))
        config = Config.defaults(collect_schema=schema, partition_by=("event",),
                                 output_format="parquet")
        sql = render(layout_of(config, "collect", location=f"file://{directory}/raw/",
                               name="bytes"), "spark")
        for statement in _statements(sql):
            spark.sql(statement)
        # _extra holds the directory name: what each partition value came from.
        rows = spark.sql("SELECT _extra, event, hex(encode(event, 'ISO-8859-1')) "
                         "FROM bytes_files").collect()
        # Spark unescapes event=%5F_HIVE_DEFAULT_PARTITION__ (a client's own
        # value) to the name it reads as null: the two directories are one
        # partition to its catalog, and only one of them is read.
        literal = encode_value("__HIVE_DEFAULT_PARTITION__")
        read = {json.loads(extra): (value, hexed) for extra, value, hexed in rows}
        assert len(rows) == len(names) - 1
        assert set(names) - set(read) in ({DEFAULT}, {literal})
        assert read.get(DEFAULT, read.get(literal)) == (None, None)
        for name, (value, hexed) in read.items():
            if name in (DEFAULT, literal):
                continue
            assert all(ord(c) < 0x100 for c in value), (name, value)
            assert bytes.fromhex(hexed) == unquote_to_bytes(name), (name, value, hexed)
        assert {name for name in read if name not in (DEFAULT, literal)} \
            == set(names) - {DEFAULT, literal}
        # Through the view, each value the server can store is as it was sent.
        valid = [n for n in names[:len(sent)] if n not in (DEFAULT, literal)]
        decoded = dict(spark.sql(
            "SELECT _extra, event FROM bytes WHERE _extra IN ("
            + ", ".join(f"'{json.dumps(n)}'" for n in valid) + ")").collect())
        assert {json.loads(k): v for k, v in decoded.items()} \
            == {encode_value(v): v for v in sent if encode_value(v) in valid}
        # A table under the view's name (an earlier estat-tables made one)
        # must be dropped first; dropping a table with a LOCATION leaves
        # its files.
        spark.sql("DROP VIEW bytes")
        spark.sql(f"CREATE TABLE bytes (x INT) USING parquet LOCATION 'file://{directory}/old/'")
        with pytest.raises(Exception, match="EXPECT_VIEW_NOT_TABLE"):
            spark.sql(_statements(sql)[-1])
        spark.sql("DROP TABLE bytes")
        spark.sql("DROP TABLE bytes_files")
        assert all(os.path.isfile(os.path.join(directory, "raw", f"event={name}",
                                               "dt=2026-12-06", "hour=10", "0.parquet"))
                   for name in names)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
