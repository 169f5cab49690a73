# -*- test-case-name: estat.test.test_tables_tool -*-
"""
Tests for L{estat.tables_tool} (C{estat-tables}): each engine's text for a
schema with every column kind, with and without dynamic partitions, for
Parquet and JSON Lines, for /collect and Segment; and the DuckDB view run
by DuckDB over small stores written by the server's own encoders.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import tempfile
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from estat.config import Config
from estat.encoder import Batch
from estat.keys import KeyMaker
from estat.schema.columns import collect_table, segment_table
from estat.tables_tool import (
    TablesError,
    default_location,
    duckdb_ddl,
    glue_table_input,
    hive_type,
    layout_of,
    main,
    render,
)

#: One property of every kind the column rules know, a mixed-case name at
#: the top and inside a struct, and names that need quoting.
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "userId": {"type": "string"},
        "count": {"type": "integer"},
        "price": {"type": "number"},
        "ok": {"type": "boolean"},
        "at": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "page": {"type": "object", "properties": {
            "url": {"type": "string"},
            "scrollY": {"type": "integer"},
            "utm source": {"type": "string"},
            "size": {"type": "object", "properties": {"w": {"type": "integer"}}},
        }},
        "tags": {"type": "array", "items": {"type": "string"}},
        "scores": {"type": "array", "items": {"type": "number"}},
        "blob": {},
    },
}

#: What each column must be in Athena and Glue.
ATHENA_COLUMNS = [
    ("event", "string"),
    ("userId", "string"),
    ("count", "bigint"),
    ("price", "double"),
    ("ok", "boolean"),
    ("at", "timestamp"),
    ("day", "date"),
    ("page", "struct<url:string,scrollY:bigint,`utm source`:string,size:struct<w:bigint>>"),
    ("tags", "array<string>"),
    ("scores", "array<double>"),
    ("blob", "string"),
    ("_estat", "struct<received_at:timestamp,ip:string,user_agent:string,source:string>"),
]
SPARK_COLUMNS = [
    ("event", "STRING"),
    ("userId", "STRING"),
    ("count", "BIGINT"),
    ("price", "DOUBLE"),
    ("ok", "BOOLEAN"),
    ("at", "TIMESTAMP"),
    ("day", "DATE"),
    ("page", "STRUCT<`url`: STRING, `scrollY`: BIGINT, `utm source`: STRING, "
             "`size`: STRUCT<`w`: BIGINT>>"),
    ("tags", "ARRAY<STRING>"),
    ("scores", "ARRAY<DOUBLE>"),
    ("blob", "STRING"),
    ("_estat", "STRUCT<`received_at`: TIMESTAMP, `ip`: STRING, `user_agent`: STRING, "
               "`source`: STRING>"),
]

RECEIVED = datetime.datetime(2026, 12, 6, 14, 40, 4, 123000, tzinfo=datetime.timezone.utc)


def _tmpdir(case) -> str:
    path = tempfile.mkdtemp(prefix="estat-tables-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _schema_file(case, schema=SCHEMA) -> str:
    path = os.path.join(_tmpdir(case), "schema.json")
    with open(path, "w") as f:
        json.dump(schema, f)
    return path


def _columns(text: str, start: str) -> list:
    """
    C{(name, type)} of the column lines after the line starting with
    C{start} up to the closing parenthesis.
    """
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(start))
    out = []
    for line in lines[i + 1:]:
        if line.startswith(")"):
            break
        m = re.match(r"^  `([^`]+)` (.+?),?$", line)
        assert m, line
        out.append((m.group(1), m.group(2)))
    return out


def _properties(text: str, start: str) -> dict:
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(start))
    out = {}
    for line in lines[i + 1:]:
        if line.startswith(")"):
            break
        m = re.match(r"^  '([^']+)' = '([^']*)',?$", line)
        assert m, line
        out[m.group(1)] = m.group(2)
    return out


def _code(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("--"))


class AthenaTests(SynchronousTestCase):

    def layout(self, **config):
        config.setdefault("collect_schema", _schema_file(self))
        config.setdefault("output_format", "parquet")
        config.setdefault("raw_bucket", "bkt")
        return layout_of(Config.defaults(**config), "collect")

    def test_parquet_columns(self):
        """
        Every declared column with its Athena type, then C{_estat} and
        C{_extra}; partitions dt (string) and hour (int); Parquet storage.
        """
        text = render(self.layout(), "athena")
        self.assertEqual(_columns(text, "CREATE EXTERNAL TABLE"),
                         ATHENA_COLUMNS + [("_extra", "string")])
        self.assertEqual(_columns(text, "PARTITIONED BY"), [("dt", "string"), ("hour", "int")])
        self.assertIn("CREATE EXTERNAL TABLE IF NOT EXISTS `estat_collect` (", text)
        self.assertIn("\nSTORED AS PARQUET\n", text)
        self.assertIn("\nLOCATION 's3://bkt/raw/'\n", text)
        self.assertNotIn("SERDE", text)

    def test_projection(self):
        """
        dt is a projected date range up to NOW, hour a 2-digit integer
        0-23, and the template is the key layout.
        """
        props = _properties(render(self.layout(), "athena"), "TBLPROPERTIES")
        self.assertEqual(props, {
            "projection.enabled": "true",
            "projection.dt.type": "date",
            "projection.dt.range": "NOW-3YEARS,NOW",
            "projection.dt.format": "yyyy-MM-dd",
            "projection.dt.interval": "1",
            "projection.dt.interval.unit": "DAYS",
            "projection.hour.type": "integer",
            "projection.hour.range": "0,23",
            "projection.hour.digits": "2",
            "storage.location.template": "s3://bkt/raw/dt=${dt}/hour=${hour}/",
        })

    def test_dynamic_partition_named_like_a_column(self):
        """
        PARTITION_BY=event: event leaves the column list, is the first
        partition key (injected), and a comment says why.
        """
        text = render(self.layout(partition_by=("event",)), "athena")
        columns = _columns(text, "CREATE EXTERNAL TABLE")
        self.assertNotIn("event", [n for n, _ in columns])
        self.assertEqual(columns, ATHENA_COLUMNS[1:] + [("_extra", "string")])
        self.assertEqual(_columns(text, "PARTITIONED BY"),
                         [("event", "string"), ("dt", "string"), ("hour", "int")])
        props = _properties(text, "TBLPROPERTIES")
        self.assertEqual(props["projection.event.type"], "injected")
        self.assertEqual(props["storage.location.template"],
                         "s3://bkt/raw/event=${event}/dt=${dt}/hour=${hour}/")
        comments = " ".join(line[3:].strip() for line in text.splitlines()
                            if line.startswith("--"))
        self.assertIn("'event' is a column of the files and a partition key", comments)
        self.assertIn("__HIVE_DEFAULT_PARTITION__", comments)

    def test_source_partition(self):
        """
        PARTITION_BY=source,event: both injected, in that order, and no
        column is dropped for source (it is inside _estat).
        """
        text = render(self.layout(partition_by=("source", "event")), "athena")
        self.assertEqual([n for n, _ in _columns(text, "PARTITIONED BY")],
                         ["source", "event", "dt", "hour"])
        props = _properties(text, "TBLPROPERTIES")
        self.assertEqual(props["projection.source.type"], "injected")
        self.assertEqual(props["storage.location.template"],
                         "s3://bkt/raw/source=${source}/event=${event}/dt=${dt}/hour=${hour}/")

    def test_jsonl(self):
        """
        JSON Lines: the OpenX SerDe, case-sensitive, each mixed-case name
        (top level and nested) mapped from its lowercase form; no _extra
        (the line is the event); gzip in the table properties.
        """
        text = render(self.layout(output_format="jsonl"), "athena")
        self.assertEqual(_columns(text, "CREATE EXTERNAL TABLE"), ATHENA_COLUMNS)
        self.assertIn("ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'", text)
        self.assertEqual(_properties(text, "WITH SERDEPROPERTIES"), {
            "case.insensitive": "false",
            "mapping.userid": "userId",
            "mapping.scrolly": "scrollY",
        })
        props = _properties(text, "TBLPROPERTIES")
        self.assertEqual(props["compressionType"], "gzip")
        self.assertEqual(props["classification"], "json")
        self.assertIn("STORED AS INPUTFORMAT 'org.apache.hadoop.mapred.TextInputFormat'", text)
        self.assertNotIn("PARQUET", _code(text))

    def test_segment_parquet(self):
        """
        Segment: the built-in warehouse columns, the derived context_*
        columns, the json columns as strings.
        """
        config = Config.defaults(output_format="parquet", raw_bucket="bkt",
                                 segment_partition_by=("type",))
        text = render(layout_of(config, "segment"), "athena")
        columns = dict(_columns(text, "CREATE EXTERNAL TABLE"))
        expected = {c.name: hive_type(c) for c in segment_table().columns if c.name != "type"}
        expected["_extra"] = "string"
        self.assertEqual(columns, expected)
        self.assertEqual(columns["receivedAt"], "timestamp")
        self.assertEqual(columns["context_ip"], "string")
        self.assertEqual(columns["properties"], "string")
        self.assertIn("\nLOCATION 's3://bkt/segment/'\n", text)
        self.assertEqual(_properties(text, "TBLPROPERTIES")["storage.location.template"],
                         "s3://bkt/segment/type=${type}/dt=${dt}/hour=${hour}/")

    def test_segment_jsonl(self):
        """
        Segment in JSON Lines: no derived copies (the line has context.ip,
        not context_ip), mappings for the camelCase names.
        """
        config = Config.defaults(output_format="jsonl", raw_bucket="bkt")
        text = render(layout_of(config, "segment"), "athena")
        names = [n for n, _ in _columns(text, "CREATE EXTERNAL TABLE")]
        self.assertNotIn("context_ip", names)
        self.assertNotIn("_extra", names)
        self.assertIn("context", names)
        serde = _properties(text, "WITH SERDEPROPERTIES")
        self.assertEqual(serde["mapping.messageid"], "messageId")
        self.assertEqual(serde["mapping.originaltimestamp"], "originalTimestamp")
        self.assertNotIn("mapping.type", serde)

    def test_collect_without_schema(self):
        """
        No COLLECT_SCHEMA: _estat and _extra (the whole event).
        """
        text = render(layout_of(Config.defaults(output_format="parquet"), "collect"), "athena")
        self.assertEqual([n for n, _ in _columns(text, "CREATE EXTERNAL TABLE")],
                         ["_estat", "_extra"])


class GlueTests(SynchronousTestCase):

    def test_parquet(self):
        """
        The TableInput has the columns, partition keys and projection of
        the Athena DDL, and the Parquet SerDe.
        """
        config = Config.defaults(collect_schema=_schema_file(self), output_format="parquet",
                                 raw_bucket="bkt", partition_by=("event",))
        layout = layout_of(config, "collect", name="events")
        table = json.loads(render(layout, "glue"))
        athena = render(layout, "athena")
        self.assertEqual(table["Name"], "events")
        self.assertEqual(table["TableType"], "EXTERNAL_TABLE")
        self.assertEqual([(c["Name"], c["Type"]) for c in table["StorageDescriptor"]["Columns"]],
                         _columns(athena, "CREATE EXTERNAL TABLE"))
        self.assertEqual([(c["Name"], c["Type"]) for c in table["PartitionKeys"]],
                         _columns(athena, "PARTITIONED BY"))
        params = table["Parameters"]
        for key, value in _properties(athena, "TBLPROPERTIES").items():
            self.assertEqual(params[key], value, key)
        self.assertEqual(params["classification"], "parquet")
        self.assertEqual(params["EXTERNAL"], "TRUE")
        sd = table["StorageDescriptor"]
        self.assertEqual(sd["Location"], "s3://bkt/raw/")
        self.assertEqual(sd["SerdeInfo"]["SerializationLibrary"],
                         "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe")
        self.assertIn("'event' is a column of the files", table["Description"])

    def test_jsonl(self):
        config = Config.defaults(collect_schema=_schema_file(self), output_format="jsonl",
                                 raw_bucket="bkt")
        table = glue_table_input(layout_of(config, "collect"))
        serde = table["StorageDescriptor"]["SerdeInfo"]
        self.assertEqual(serde["SerializationLibrary"], "org.openx.data.jsonserde.JsonSerDe")
        self.assertEqual(serde["Parameters"], {"case.insensitive": "false",
                                               "mapping.userid": "userId",
                                               "mapping.scrolly": "scrollY"})
        self.assertEqual(table["Parameters"]["compressionType"], "gzip")
        self.assertEqual(table["Parameters"]["classification"], "json")
        self.assertNotIn("_extra", [c["Name"] for c in table["StorageDescriptor"]["Columns"]])


class SparkTests(SynchronousTestCase):

    def layout(self, **config):
        config.setdefault("collect_schema", _schema_file(self))
        config.setdefault("output_format", "parquet")
        return layout_of(Config.defaults(**config), "collect", location="file:///data/raw")

    def view(self, text: str) -> tuple:
        """
        The view's name, its select list and the table it reads.
        """
        code = _code(text)
        view = code[code.index("CREATE OR REPLACE VIEW "):]
        head, rest = view.split(" AS\nSELECT\n", 1)
        selected, source = rest.rsplit("\nFROM ", 1)
        self.assertTrue(code.endswith(";") and source.endswith(";"), code)
        return (head[len("CREATE OR REPLACE VIEW "):], selected.split(",\n"),
                source[:-1])

    def test_parquet(self):
        text = render(self.layout(), "spark")
        self.assertEqual(_columns(text, "CREATE TABLE"),
                         SPARK_COLUMNS + [("_extra", "STRING"), ("dt", "DATE"), ("hour", "INT")])
        code = _code(text)
        self.assertIn("CREATE TABLE IF NOT EXISTS `estat_collect_files` (\n", code)
        self.assertIn("\nUSING parquet\nPARTITIONED BY (`dt`, `hour`)\n"
                      "LOCATION 'file:///data/raw/';\nMSCK REPAIR TABLE `estat_collect_files`;\n"
                      "CREATE OR REPLACE VIEW", code)
        # No key to decode: the view is every column as it is.
        name, selected, source = self.view(text)
        self.assertEqual((name, source), ("`estat_collect`", "`estat_collect_files`"))
        self.assertEqual(selected, [f"  `{n}`" for n, _ in _columns(text, "CREATE TABLE")])

    def test_partition_named_like_a_column(self):
        text = render(self.layout(partition_by=("event",), output_format="jsonl"), "spark")
        columns = _columns(text, "CREATE TABLE")
        self.assertEqual([n for n, _ in columns].count("event"), 1)
        self.assertEqual(columns[-3:], [("event", "STRING"), ("dt", "DATE"), ("hour", "INT")])
        self.assertEqual(columns[:-3], SPARK_COLUMNS[1:])
        self.assertIn("USING json\nPARTITIONED BY (`event`, `dt`, `hour`)", text)
        # The view decodes the key as UTF-8; dt and hour stay as they are.
        _, selected, _ = self.view(text)
        self.assertEqual(selected, [f"  `{n}`" for n, _ in columns[:-3]] + [
            "  decode(encode(`event`, 'ISO-8859-1'), 'UTF-8') AS `event`", "  `dt`", "  `hour`"])

    def test_two_keys(self):
        text = render(self.layout(partition_by=("event", "userId")), "spark")
        columns = _columns(text, "CREATE TABLE")
        self.assertEqual(columns[-4:], [("event", "STRING"), ("userId", "STRING"),
                                        ("dt", "DATE"), ("hour", "INT")])
        self.assertIn("PARTITIONED BY (`event`, `userId`, `dt`, `hour`)", text)
        _, selected, _ = self.view(text)
        self.assertEqual(selected[-4:], [
            "  decode(encode(`event`, 'ISO-8859-1'), 'UTF-8') AS `event`",
            "  decode(encode(`userId`, 'ISO-8859-1'), 'UTF-8') AS `userId`",
            "  `dt`", "  `hour`"])
        self.assertEqual(selected[:-4], [f"  `{n}`" for n, _ in columns[:-4]])
        self.assertIn("event, userId here are the value as sent", text.replace("\n--   ", " "))

    def test_database(self):
        layout = layout_of(Config.defaults(), "segment", location="s3://b/segment/",
                           name="tracks", database="analytics")
        text = render(layout, "spark")
        self.assertIn("CREATE TABLE IF NOT EXISTS `analytics`.`tracks_files` (", text)
        self.assertIn("MSCK REPAIR TABLE `analytics`.`tracks_files`;", text)
        name, _, source = self.view(text)
        self.assertEqual((name, source), ("`analytics`.`tracks`", "`analytics`.`tracks_files`"))


def _event(n: int, **fields) -> dict:
    received = (RECEIVED + datetime.timedelta(seconds=n)).isoformat(timespec="milliseconds")
    fields["_estat"] = {"received_at": received.replace("+00:00", "Z"), "ip": "10.0.0.1",
                        "user_agent": "test", "source": "web"}
    return fields


def write_store(root: str, config: Config, table, events: list, prefix: str = "raw") -> list:
    """
    Store C{events} under C{root} as the server would (its encoder for
    C{config}, split by partition): return the keys written.
    """
    import orjson

    from estat.tap import stream_encoding

    key_maker = KeyMaker(prefix, "raw_dlq", "test")
    encoder, _ = stream_encoding(config, table, key_maker)
    first = RECEIVED.timestamp()
    key = key_maker.batch_key(first, first + 1, unique="0" * 16)
    batch = Batch(key=key, poison_key=key_maker.poison_key(key),
                  events=[(first, orjson.dumps(e)) for e in events],
                  first_event_at=first, sealed_at=first + 1)
    keys = []
    for obj in encoder.encode(batch):
        assert not obj.key.startswith("raw_dlq"), obj.key
        path = os.path.join(root, *obj.key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(obj.body)
        keys.append(obj.key)
    return keys


#: Drifting events: typed values, misfits, undeclared keys, partition
#: values that need percent-encoding, one without the partition field.
EVENTS = (
    [_event(n, event="page view", userId=f"u{n}", count=n, price=n / 2, ok=n % 2 == 0,
            at="2026-12-06T14:00:00Z", day="2026-12-06", page={"url": "/", "scrollY": n},
            tags=["a", "b"], scores=[1.5], blob={"k": [n]}) for n in range(3)]
    + [_event(3, event="a/b c", count="not a number", extra_key=1)]
    + [_event(4, event="東京", count=4), _event(5, event="東京", count=5)]
    + [_event(6, count=6)]
)
#: What DuckDB must read back: event value -> count.
EXPECTED_COUNTS = {"page view": 3, "a/b c": 1, "東京": 2, None: 1}


class DuckDBTests(SynchronousTestCase):
    """
    The printed view, run by DuckDB over stores the server's encoders
    wrote.
    """

    def setUp(self):
        import duckdb

        self.root = _tmpdir(self)
        self.schema = _schema_file(self)
        self.db = duckdb.connect()
        self.addCleanup(self.db.close)

    def view(self, **config) -> tuple:
        config = Config.defaults(collect_schema=self.schema, local_store_dir=self.root,
                                 ack_mode="disk", **config)
        keys = write_store(self.root, config, collect_table(self.schema), EVENTS)
        text = render(layout_of(config, "collect"), "duckdb")
        self.db.execute(text)
        return keys, text

    def counts(self) -> dict:
        return dict(self.db.sql("SELECT event, count(*) FROM estat_collect GROUP BY 1").fetchall())

    def types(self) -> dict:
        return {row[0]: row[1] for row in self.db.sql("DESCRIBE estat_collect").fetchall()}

    def test_parquet_partitioned(self):
        """
        PARTITION_BY=event: one object per value, read back decoded, the
        missing one as null; typed columns typed; the misfit in _extra.
        """
        keys, text = self.view(output_format="parquet", partition_by=("event",))
        self.assertIn(f"read_parquet('{self.root}/raw/**/*.parquet', hive_partitioning = true, "
                      "union_by_name = false", text)
        self.assertEqual(sorted(k.split("/")[1] for k in keys),
                         sorted(["event=" + quote("a/b c", safe=""),
                                 "event=" + quote("東京", safe=""),
                                 "event=page%20view", "event=__HIVE_DEFAULT_PARTITION__"]))
        self.assertEqual(self.counts(), EXPECTED_COUNTS)
        types = self.types()
        self.assertEqual(types["count"], "BIGINT")
        self.assertEqual(types["at"], "TIMESTAMP WITH TIME ZONE")
        self.assertEqual(types["day"], "DATE")
        self.assertEqual(types["tags"], "VARCHAR[]")
        self.assertEqual(types["dt"], "DATE")
        self.assertEqual(types["hour"], "INTEGER")
        self.assertEqual(types["event"], "VARCHAR")
        self.assertEqual(list(types).count("event"), 1)
        row = self.db.sql("SELECT count, _extra FROM estat_collect WHERE event = 'a/b c'").fetchall()
        self.assertEqual(len(row), 1)
        self.assertIsNone(row[0][0])
        self.assertEqual(json.loads(row[0][1]), {"count": "not a number", "extra_key": 1})
        self.assertEqual(self.db.sql("SELECT sum(count), sum(page.scrollY), min(dt), min(hour) "
                                     "FROM estat_collect").fetchall(),
                         [(18, 3, datetime.date(2026, 12, 6), 14)])

    def test_parquet_unpartitioned(self):
        keys, _ = self.view(output_format="parquet")
        self.assertEqual(len(keys), 1)
        self.assertEqual(self.counts(), EXPECTED_COUNTS)
        self.assertNotIn("source", self.types())

    def test_jsonl_partitioned(self):
        """
        JSON Lines: the declared columns typed by the view, the partition
        value from the path.
        """
        keys, text = self.view(output_format="jsonl", partition_by=("event",))
        self.assertIn("read_json(", text)
        self.assertTrue(all(k.endswith(".jsonl.gz") for k in keys))
        self.assertEqual(self.counts(), EXPECTED_COUNTS)
        types = self.types()
        self.assertEqual(types["count"], "BIGINT")
        self.assertEqual(types["at"], "TIMESTAMP WITH TIME ZONE")
        self.assertEqual(types["page"], 'STRUCT(url VARCHAR, scrollY BIGINT, "utm source" VARCHAR, '
                                        "size STRUCT(w BIGINT))")
        self.assertEqual(self.db.sql("SELECT sum(count) FROM estat_collect WHERE event = '東京'")
                         .fetchall(), [(9,)])
        # A value that does not fit its column is null, the rest of its row read.
        self.assertEqual(self.db.sql("SELECT \"count\", _estat.source FROM estat_collect "
                                     "WHERE event = 'a/b c'").fetchall(), [(None, "web")])

    def test_jsonl_unpartitioned(self):
        self.view(output_format="jsonl")
        self.assertEqual(self.counts(), EXPECTED_COUNTS)
        self.assertEqual(self.db.sql("SELECT _estat.source, count(*) FROM estat_collect "
                                     "GROUP BY 1").fetchall(), [("web", len(EVENTS))])

    def test_segment(self):
        """
        A Segment stream's view: the warehouse columns, typed.
        """
        config = Config.defaults(local_store_dir=self.root, output_format="parquet",
                                 ack_mode="disk", segment_partition_by=("type",))
        messages = [_event(n, type="track", event="Signed Up", messageId=f"m{n}",
                           timestamp="2026-12-06T14:00:00.000Z",
                           context={"ip": "1.2.3.4", "page": {"path": "/x"}})
                    for n in range(3)] + [_event(9, type="identify", userId=7)]
        write_store(self.root, config, segment_table(), messages, prefix="segment")
        self.db.execute(render(layout_of(config, "segment"), "duckdb"))
        self.assertEqual(dict(self.db.sql("SELECT type, count(*) FROM estat_segment GROUP BY 1")
                              .fetchall()), {"track": 3, "identify": 1})
        types = self.types_of("estat_segment")
        self.assertEqual(types["timestamp"], "TIMESTAMP WITH TIME ZONE")
        self.assertEqual(self.db.sql("SELECT DISTINCT context_ip, context_page_path FROM "
                                     "estat_segment WHERE type = 'track'").fetchall(),
                         [("1.2.3.4", "/x")])
        self.assertEqual(self.db.sql("SELECT _extra FROM estat_segment WHERE type = 'identify'")
                         .fetchall(), [('{"userId":7}',)])

    def types_of(self, view: str) -> dict:
        return {row[0]: row[1] for row in self.db.sql(f"DESCRIBE {view}").fetchall()}


class CommandTests(SynchronousTestCase):

    def run_main(self, argv, environ=None):
        out, err = io.StringIO(), io.StringIO()
        code = main(argv, stdout=out, stderr=err, environ=environ or {})
        return code, out.getvalue(), err.getvalue()

    def test_dotenv(self):
        """
        The command reads the .env file (ENV_FILE) as twistd estat does;
        the environment wins over it.
        """
        directory = _tmpdir(self)
        env_file = os.path.join(directory, "estat.env")
        with open(env_file, "w") as f:
            f.write(f"OUTPUT_FORMAT=parquet\nCOLLECT_SCHEMA={_schema_file(self)}\n"
                    "PARTITION_BY=event\nRAW_BUCKET=from-dotenv\nRAW_PREFIX=events\n")
        code, out, err = self.run_main(["--engine", "athena"],
                                       {"ENV_FILE": env_file, "RAW_PREFIX": "from-env"})
        self.assertEqual((code, err), (0, ""))
        self.assertIn("LOCATION 's3://from-dotenv/from-env/'", out)
        self.assertIn("'projection.event.type' = 'injected'", out)
        self.assertIn("STORED AS PARQUET", out)

    def test_local_store_location(self):
        directory = _tmpdir(self)
        code, out, _ = self.run_main(["--engine", "spark", "--stream", "segment"],
                                     {"LOCAL_STORE_DIR": directory, "ENV_FILE": "/nonexistent"})
        self.assertEqual(code, 0)
        self.assertIn(f"LOCATION 'file://{directory}/segment/';", out)

    def test_relative_local_store(self):
        config = Config.defaults(local_store_dir="./data")
        self.assertEqual(default_location(config, "collect"),
                         "file://" + os.path.abspath("data") + "/raw/")

    def test_options(self):
        code, out, _ = self.run_main(["--engine", "duckdb", "--location", "s3://b/x",
                                      "--table", "ev", "--output-format", "parquet"],
                                     {"ENV_FILE": "/nonexistent"})
        self.assertEqual(code, 0)
        self.assertIn('CREATE OR REPLACE VIEW "ev" AS', out)
        self.assertIn("read_parquet('s3://b/x/**/*.parquet'", out)
        self.assertIn("httpfs", out)

    def test_bad_partition_key(self):
        """
        A partition key the server would refuse is refused the same way.
        """
        code, out, err = self.run_main(["--engine", "athena"],
                                       {"PARTITION_BY": "nosuch", "ENV_FILE": "/nonexistent"})
        self.assertEqual((code, out), (2, ""))
        self.assertIn("invalid PARTITION_BY='nosuch'", err)

    def test_source_clash(self):
        schema = {"type": "object", "properties": {"source": {"type": "string"}}}
        config = Config.defaults(collect_schema=_schema_file(self, schema),
                                 partition_by=("source",))
        self.assertRaises(TablesError, layout_of, config, "collect")

    def test_duckdb_location_of_local_store(self):
        layout = layout_of(Config.defaults(local_store_dir="/srv/estat"), "collect")
        self.assertIn("read_json('/srv/estat/raw/**/*.jsonl.gz'", duckdb_ddl(layout))


class DocsTests(SynchronousTestCase):
    """
    docs/querying.md shows each engine's text exactly as the command
    prints it now.
    """

    ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    SCHEMA_PATH = "docs/examples/page-event.json"
    BASE = {"OUTPUT_FORMAT": "parquet", "PARTITION_BY": "event", "ENV_FILE": "/nonexistent"}
    EXAMPLES = [
        ({"LOCAL_STORE_DIR": "/srv/estat-data"}, ["--engine", "duckdb"]),
        ({"RAW_BUCKET": "my-estat-bucket"}, ["--engine", "athena", "--database", "analytics"]),
        ({"RAW_BUCKET": "my-estat-bucket"}, ["--engine", "glue"]),
        ({"LOCAL_STORE_DIR": "/srv/estat-data"}, ["--engine", "spark"]),
        ({"RAW_BUCKET": "my-estat-bucket", "OUTPUT_FORMAT": "jsonl", "PARTITION_BY": ""},
         ["--engine", "athena"]),
        ({"RAW_BUCKET": "my-estat-bucket", "SEGMENT_PARTITION_BY": "type"},
         ["--engine", "athena", "--stream", "segment"]),
        ({"LOCAL_STORE_DIR": "/srv/estat-data", "SEGMENT_PARTITION_BY": "type"},
         ["--engine", "duckdb", "--stream", "segment"]),
    ]

    def test_examples_are_current(self):
        with open(os.path.join(self.ROOT, "docs", "querying.md"), encoding="utf-8") as f:
            doc = f.read()
        schema = os.path.join(self.ROOT, self.SCHEMA_PATH)
        for env, argv in self.EXAMPLES:
            environ = {**self.BASE, "COLLECT_SCHEMA": schema, **env}
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(main(argv, stdout=out, stderr=err, environ=environ), 0,
                             err.getvalue())
            text = out.getvalue().replace(schema, self.SCHEMA_PATH).rstrip("\n")
            self.assertIn("\n" + text + "\n```", doc,
                          f"docs/querying.md does not show {argv} {env} as printed")


class BadRowsTableTests(SynchronousTestCase):
    """
    C{--bad}: the table of a stream's bad rows, for each engine, and the
    DuckDB view run over bad rows the server's own encoders wrote.
    """

    ERRORS = "array<struct<pointer:string,keyword:string,message:string>>"

    def layout(self, stream="collect", **config):
        config.setdefault("output_format", "parquet")
        config.setdefault("raw_bucket", "bkt")
        return layout_of(Config.defaults(**config), stream, bad=True)

    def test_athena(self):
        text = render(self.layout(partition_by=("source",)), "athena")
        self.assertIn("CREATE EXTERNAL TABLE IF NOT EXISTS `estat_bad_collect` (", text)
        self.assertEqual(_columns(text, "CREATE EXTERNAL TABLE"), [
            ("bad_row", "string"), ("stream", "string"), ("schema", "string"),
            ("errors", self.ERRORS), ("errors_total", "bigint"), ("payload", "string"),
            ("type", "string"),
            ("_estat", "struct<received_at:timestamp,ip:string,user_agent:string,"
                       "source:string>")])
        self.assertEqual(_columns(text, "PARTITIONED BY"),
                         [("source", "string"), ("dt", "string"), ("hour", "int")])
        self.assertIn("\nLOCATION 's3://bkt/bad/collect/'\n", text)
        self.assertIn("STORED AS PARQUET", text)

    def test_glue_and_spark(self):
        layout = self.layout("segment", output_format="jsonl", segment_partition_by=("type",),
                             bad_prefix="quarantine")
        glue = glue_table_input(layout)
        self.assertEqual(glue["Name"], "estat_bad_segment")
        self.assertEqual(glue["StorageDescriptor"]["Location"], "s3://bkt/quarantine/segment/")
        columns = {c["Name"]: c["Type"] for c in glue["StorageDescriptor"]["Columns"]}
        self.assertEqual(columns["errors"], self.ERRORS)
        self.assertNotIn("type", columns)  # the partition key supplies it
        self.assertNotIn("_extra", columns)
        spark = render(layout, "spark")
        self.assertIn("`errors` ARRAY<STRUCT<`pointer`: STRING, `keyword`: STRING, "
                      "`message`: STRING>>", spark)
        self.assertIn("USING json", spark)

    def test_duckdb_reads_what_the_server_writes(self):
        import duckdb
        import orjson

        from estat.tap import bad_encoding

        row = {"bad_row": "schema_violation", "stream": "collect", "schema": "event.json",
               "errors": [{"pointer": "/price", "keyword": "type", "message": "m"}],
               "errors_total": 1, "payload": {"event": "buy", "price": "1"},
               "_estat": {"received_at": "2026-12-06T14:00:00.000Z", "ip": "127.0.0.1",
                          "user_agent": "t", "source": None}}
        for output_format in ("parquet", "jsonl"):
            root = _tmpdir(self)
            config = Config.defaults(output_format=output_format, local_store_dir=root,
                                     partition_by=("source",), ack_mode="disk")
            keys = KeyMaker("bad/collect", "raw_dlq/bad/collect", "t")
            encoder, _ = bad_encoding(config, "collect", keys)
            key = keys.batch_key(1796565600.0, 1796565600.0, "0" * 16)
            for obj in encoder.encode(Batch(key=key, poison_key=keys.poison_key(key),
                                            events=[(0.0, orjson.dumps(row))] * 2,
                                            first_event_at=0.0, sealed_at=0.0)):
                path = os.path.join(root, *obj.key.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(obj.body)
            db = duckdb.connect()
            self.addCleanup(db.close)
            db.execute(render(layout_of(config, "collect", bad=True), "duckdb"))
            result = db.sql("SELECT count(*), min(errors[1].keyword), "
                            "min(json_extract_string(payload, '$.price')), min(source), "
                            "min(hour) FROM estat_bad_collect").fetchall()
            self.assertEqual(result, [(2, "type", "1", None, 14)], output_format)

    def test_command(self):
        code = main(["--engine", "athena", "--bad", "--stream", "segment"],
                    stdout=io.StringIO(), stderr=io.StringIO(),
                    environ={"ENV_FILE": "/nonexistent", "RAW_BUCKET": "b"})
        self.assertEqual(code, 0)
