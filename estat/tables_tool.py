# -*- test-case-name: estat.test.test_tables_tool -*-
"""
C{estat-tables}: the DDL that makes a stream's stored objects a table in a
query engine.

    estat-tables --engine athena|glue|spark|duckdb [--stream collect|segment]
                 [--bad] [--location URI] [--table NAME] [--database NAME]

It reads the configuration exactly as C{twistd estat} does (options,
environment, C{.env}) and derives everything from it and from the stream's
L{estat.schema.columns.Table}: the columns (C{COLLECT_SCHEMA},
C{SEGMENT_SCHEMA}), the format (C{OUTPUT_FORMAT}), the partition keys
(C{PARTITION_BY}, C{SEGMENT_PARTITION_BY}, then C{dt} and C{hour}) and the
location (C{RAW_BUCKET}/C{RAW_PREFIX} or C{SEGMENT_PREFIX}, or the local
directory store).  It never holds a second copy of the columns, and it only
prints: it never touches the store or the network.

C{--bad} prints the table of the stream's bad rows (quarantined events,
under C{BAD_PREFIX/<stream>/}): the fixed columns of
L{estat.schema.badrows}, with the stream's format and partition keys.

Athena and Glue get partition projection (no crawler, no C{MSCK REPAIR});
Spark gets a path-based partitioned table C{<table>_files}, the C{MSCK
REPAIR TABLE} it needs to see new partitions, and the view C{<table>} that
decodes the partition values as UTF-8 (Spark itself does not); DuckDB gets
a view with C{hive_partitioning}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

import attr

from .pipeline.partitions import DEFAULT, MAX_VALUE_BYTES, OTHER
from .schema.columns import EXTRA_COLUMN, Column, Table

__all__ = ["ENGINES", "TableLayout", "layout_of", "render", "athena_ddl", "glue_table_input",
           "spark_ddl", "duckdb_ddl", "main"]

ENGINES = ("athena", "glue", "spark", "duckdb")
STREAMS = ("collect", "segment")

#: Athena's relative date range start when C{--since} names none.
DEFAULT_SINCE = "NOW-3YEARS"

PARQUET_SERDE = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
PARQUET_INPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
PARQUET_OUTPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat"
JSON_SERDE = "org.openx.data.jsonserde.JsonSerDe"
TEXT_INPUT = "org.apache.hadoop.mapred.TextInputFormat"
TEXT_OUTPUT = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat"

_HIVE_SCALARS = {"string": "string", "int64": "bigint", "double": "double", "bool": "boolean",
                 "timestamp": "timestamp", "date": "date", "json": "string"}
_DUCKDB_SCALARS = {"string": "VARCHAR", "int64": "BIGINT", "double": "DOUBLE",
                   "bool": "BOOLEAN", "timestamp": "TIMESTAMPTZ", "date": "DATE",
                   "json": "JSON"}
_SIMPLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class TablesError(ValueError):
    """
    The configuration cannot be turned into a table; the message says why.
    """


@attr.s(frozen=True, slots=True)
class TableLayout:
    """
    Everything an engine's DDL is made of.

    @ivar table: the stream's columns.
    @ivar output_format: C{parquet} or C{jsonl}.
    @ivar location: where the stream's objects are, a URI ending in C{/}.
    @ivar partition_keys: the dynamic keys (C{PARTITION_BY}), before C{dt}
        and C{hour}.
    @ivar name: the table's name.
    @ivar database: the database (schema) it goes in, or C{None}.
    @ivar since: the first day of Athena's projected C{dt} range.
    """

    table: Table = attr.ib()
    output_format: str = attr.ib()
    location: str = attr.ib()
    partition_keys: tuple = attr.ib(default=())
    name: str = attr.ib(default="")
    database: str | None = attr.ib(default=None)
    since: str = attr.ib(default=DEFAULT_SINCE)

    @property
    def stream(self) -> str:
        return self.table.stream

    @property
    def bad(self) -> bool:
        return self.table.stream.startswith("bad_")

    @property
    def file_columns(self) -> list:
        """
        The columns the stored files hold: every column of the table and
        C{_extra} in Parquet; in JSON Lines the event as sent, so no
        C{_extra} and no derived copies (Segment's C{context_ip} is
        C{context.ip} there).
        """
        if self.output_format == "parquet" and not self.bad:
            return list(self.table.columns) + [Column(EXTRA_COLUMN, "json")]
        return [c for c in self.table.columns if not c.derived]

    @property
    def shadowed(self) -> list:
        """
        File columns named like a partition key: the path supplies them.
        """
        keys = set(self.partition_keys)
        return [c for c in self.file_columns if c.name in keys]

    @property
    def data_columns(self) -> list:
        """
        The columns an Athena, Glue or Spark table lists (a partition key
        cannot be repeated as a column).
        """
        keys = set(self.partition_keys)
        return [c for c in self.file_columns if c.name not in keys]

    @property
    def all_keys(self) -> tuple:
        return tuple(self.partition_keys) + ("dt", "hour")

    @property
    def suffix(self) -> str:
        return ".parquet" if self.output_format == "parquet" else ".jsonl.gz"

    @property
    def qualified(self) -> str:
        return ".".join(_backtick(n) for n in (self.database, self.name) if n)

    @property
    def qualified_files(self) -> str:
        """
        Spark's table over the stored files, C{<name>_files}, under which
        the view C{<name>} decodes the partition keys.
        """
        return ".".join(_backtick(n) for n in (self.database, f"{self.name}_files") if n)


def default_location(config, stream: str, bad: bool = False) -> str:
    """
    Where C{stream}'s objects (or, C{bad}, its bad rows) are stored:
    C{s3://RAW_BUCKET/PREFIX/} with the S3 store,
    C{file:///absolute/LOCAL_STORE_DIR/PREFIX/} with the local directory
    store.
    """
    prefix = config.raw_prefix if stream == "collect" else config.segment_prefix
    if bad:
        prefix = f"{config.bad_prefix}/{stream}"
    if config.raw_bucket:
        return f"s3://{config.raw_bucket}/{prefix}/"
    root = os.path.abspath(config.local_store_dir).rstrip(os.sep)
    return "file://" + root.replace(os.sep, "/") + f"/{prefix}/"


def layout_of(config, stream: str = "collect", location: str | None = None,
              name: str | None = None, database: str | None = None,
              since: str = DEFAULT_SINCE, bad: bool = False) -> TableLayout:
    """
    The L{TableLayout} of C{stream} under C{config} (an
    L{estat.config.Config}), with the tables loaded and the partition keys
    checked exactly as the server does at start-up.

    @raise estat.config.ConfigError: a schema or partition key the server
        would refuse.
    @raise TablesError: a table no engine can hold.
    """
    from .tap import _tables

    collect, segment = _tables(config)
    table = collect if stream == "collect" else segment
    keys = config.partition_by if stream == "collect" else config.segment_partition_by
    if bad:
        from .schema.badrows import bad_row_table

        table = bad_row_table(stream)
    if "source" in keys and any(c.name == "source" for c in table.columns):
        setting = "PARTITION_BY" if stream == "collect" else "SEGMENT_PARTITION_BY"
        raise TablesError(
            f"{setting} has 'source' (the write key's name) and the {stream} schema declares "
            "a column 'source' too: a table cannot hold both under one name")
    location = location or default_location(config, stream, bad)
    if not location.endswith("/"):
        location += "/"
    default_name = f"estat_bad_{stream}" if bad else f"estat_{stream}"
    return TableLayout(table=table, output_format=config.output_format, location=location,
                       partition_keys=tuple(keys), name=name or default_name,
                       database=database, since=since)


# --- types ---------------------------------------------------------------------


def _backtick(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _field_name(name: str) -> str:
    # Inside struct<...>: plain names as they are, others quoted.
    return name if _SIMPLE_NAME.match(name) else _backtick(name)


def hive_type(column: Column) -> str:
    """
    The Athena / Glue (Hive) type of a column.
    """
    if column.kind == "struct":
        return "struct<" + ",".join(f"{_field_name(f.name)}:{hive_type(f)}"
                                    for f in column.fields) + ">"
    if column.kind == "list":
        if column.item == "struct":
            return f"array<{hive_type(Column('element', 'struct', fields=column.fields))}>"
        return f"array<{_HIVE_SCALARS[column.item]}>"
    return _HIVE_SCALARS[column.kind]


def spark_type(column: Column) -> str:
    """
    The Spark SQL type of a column.
    """
    if column.kind == "struct":
        return "STRUCT<" + ", ".join(f"{_backtick(f.name)}: {spark_type(f)}"
                                     for f in column.fields) + ">"
    if column.kind == "list":
        if column.item == "struct":
            return f"ARRAY<{spark_type(Column('element', 'struct', fields=column.fields))}>"
        return f"ARRAY<{_HIVE_SCALARS[column.item].upper()}>"
    return _HIVE_SCALARS[column.kind].upper()


def _duckdb_quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def duckdb_type(column: Column) -> str:
    """
    The DuckDB type of a column (for C{read_json}'s C{columns}).
    """
    if column.kind == "struct":
        return "STRUCT(" + ", ".join(f"{_duckdb_quote(f.name)} {duckdb_type(f)}"
                                     for f in column.fields) + ")"
    if column.kind == "list":
        if column.item == "struct":
            return f"{duckdb_type(Column('element', 'struct', fields=column.fields))}[]"
        return f"{_DUCKDB_SCALARS[column.item]}[]"
    return _DUCKDB_SCALARS[column.kind]


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- what every engine's text says --------------------------------------------------


def _comment(text: str) -> list:
    """
    C{text} as SQL comment lines of at most 100 characters.
    """
    return textwrap.wrap(text, width=100, initial_indent="-- ", subsequent_indent="--   ",
                         break_long_words=False, break_on_hyphens=False)


def _comments(notes: list) -> list:
    return [line for note in notes for line in _comment(note)]


def _columns_source(table: Table) -> str:
    if table.stream.startswith("bad_"):
        return "the bad-row table (estat/schema/badrows.py)"
    if table.schema_id == "builtin":
        return "the built-in columns (no schema file)"
    return table.schema_id


def _header(layout: TableLayout, engine: str) -> list:
    keys = ", ".join(layout.all_keys)
    lines = [
        f"-- estat-tables --engine {engine}: the {layout.stream} stream, "
        f"OUTPUT_FORMAT={layout.output_format}",
        f"-- columns from {_columns_source(layout.table)}; partitions {keys}",
    ]
    return lines


def _shadow_notes(layout: TableLayout) -> list:
    """
    SQL comments on data columns that a partition key of the same name
    replaces.
    """
    notes = []
    for column in layout.shadowed:
        notes.append(
            f"{column.name!r} is a column of the files and a partition key; a table cannot "
            f"repeat it, so it is not in the column list and its value comes from the path "
            f"({column.name}=...). The two agree except that the path cuts a value to "
            f"{MAX_VALUE_BYTES} bytes, a missing or non-string value is {DEFAULT} (null), and "
            f"events past MAX_PARTITIONS are under {OTHER}.")
    return notes


def _jsonl_notes(layout: TableLayout) -> list:
    if layout.output_format != "jsonl":
        return []
    if layout.bad:
        return ["JSON Lines: each line is one bad row; payload holds the event as sent (a JSON "
                "object: read it with json_extract or the engine's JSON functions)."]
    notes = ["JSON Lines: each line is the event as sent; undeclared fields are not columns, "
             "and a value that does not fit its declared type reads as null or fails the row."]
    derived = [c.name for c in layout.table.columns if c.derived]
    if derived:
        notes.append(f"{', '.join(derived)}: Parquet-only copies; in JSON Lines read them "
                     "from the json column they are copied from (context).")
    return notes


def _injected_notes(layout: TableLayout) -> list:
    if not layout.partition_keys:
        return []
    keys = ", ".join(layout.partition_keys)
    return [f"{keys}: 'injected' projection: every query must say {layout.partition_keys[0]} = "
            "'...' (or IN (...)); compare with the value as it is in the key (percent-encoded "
            f"UTF-8 outside A-Z a-z 0-9 - _ ., {DEFAULT} for none)."]


def _location_template(layout: TableLayout) -> str:
    return layout.location + "".join(f"{k}=${{{k}}}/" for k in layout.all_keys)


def projection_parameters(layout: TableLayout) -> dict:
    """
    Athena's partition projection table properties, in order.
    """
    params = {"projection.enabled": "true"}
    for key in layout.partition_keys:
        params[f"projection.{key}.type"] = "injected"
    params.update({
        "projection.dt.type": "date",
        "projection.dt.range": f"{layout.since},NOW",
        "projection.dt.format": "yyyy-MM-dd",
        "projection.dt.interval": "1",
        "projection.dt.interval.unit": "DAYS",
        "projection.hour.type": "integer",
        "projection.hour.range": "0,23",
        "projection.hour.digits": "2",
        "storage.location.template": _location_template(layout),
    })
    return params


def _partition_key_types(layout: TableLayout) -> list:
    """
    C{(name, Hive type)} of the partition keys: dynamic keys and C{dt} are
    strings (Athena projects C{dt} as C{yyyy-MM-dd} text), C{hour} an int.
    """
    return [(k, "string") for k in layout.partition_keys] + [("dt", "string"), ("hour", "int")]


def json_mappings(layout: TableLayout) -> tuple:
    """
    The OpenX SerDe's C{mapping.<lowercase>} properties: Athena lowercases
    every column and struct field name, and with C{case.insensitive} false
    the SerDe looks keys up as they are spelled, so each name that is not
    already lowercase is mapped back to its spelling.  Returns
    C{(mappings, conflicts)}: a lowercase name spelled two ways in
    different places cannot be mapped to both.
    """
    spellings: dict = {}

    def walk(columns):
        for column in columns:
            if column.name != column.name.lower():
                spellings.setdefault(column.name.lower(), [])
                if column.name not in spellings[column.name.lower()]:
                    spellings[column.name.lower()].append(column.name)
            if column.kind == "struct":
                walk(column.fields)

    walk(layout.data_columns)
    mappings = {k: v[0] for k, v in spellings.items()}
    conflicts = {k: v for k, v in spellings.items() if len(v) > 1}
    return mappings, conflicts


def serde_parameters(layout: TableLayout) -> dict:
    if layout.output_format == "parquet":
        return {"serialization.format": "1"}
    mappings, _ = json_mappings(layout)
    params = {"case.insensitive": "false"}
    params.update({f"mapping.{k}": v for k, v in mappings.items()})
    return params


def _mapping_notes(layout: TableLayout) -> list:
    if layout.output_format != "jsonl":
        return []
    _, conflicts = json_mappings(layout)
    return [f"{k!r} is spelled {' and '.join(map(repr, v))} in different places; the SerDe "
            f"maps it to {v[0]!r} only" for k, v in conflicts.items()]


# --- Athena -----------------------------------------------------------------------


def _properties(params: dict, indent: str = "  ") -> str:
    return ",\n".join(f"{indent}{_sql_string(k)} = {_sql_string(v)}" for k, v in params.items())


def athena_ddl(layout: TableLayout) -> str:
    """
    Athena C{CREATE EXTERNAL TABLE} with partition projection.
    """
    lines = _header(layout, "athena")
    lines += _comments(_shadow_notes(layout) + _jsonl_notes(layout) + _mapping_notes(layout)
                       + _injected_notes(layout))
    lines.append(f"CREATE EXTERNAL TABLE IF NOT EXISTS {layout.qualified} (")
    lines.append(",\n".join(f"  {_backtick(c.name)} {hive_type(c)}"
                            for c in layout.data_columns))
    lines.append(")")
    lines.append("PARTITIONED BY (")
    lines.append(",\n".join(f"  {_backtick(k)} {t}" for k, t in _partition_key_types(layout)))
    lines.append(")")
    if layout.output_format == "parquet":
        lines.append("STORED AS PARQUET")
        table_props = {}
    else:
        lines.append(f"ROW FORMAT SERDE {_sql_string(JSON_SERDE)}")
        lines.append("WITH SERDEPROPERTIES (")
        lines.append(_properties(serde_parameters(layout)))
        lines.append(")")
        lines.append(f"STORED AS INPUTFORMAT {_sql_string(TEXT_INPUT)}")
        lines.append(f"OUTPUTFORMAT {_sql_string(TEXT_OUTPUT)}")
        table_props = {"classification": "json", "compressionType": "gzip"}
    lines.append(f"LOCATION {_sql_string(layout.location)}")
    lines.append("TBLPROPERTIES (")
    lines.append(_properties({**table_props, **projection_parameters(layout)}))
    lines.append(");")
    return "\n".join(lines) + "\n"


# --- Glue -------------------------------------------------------------------------


def glue_table_input(layout: TableLayout) -> dict:
    """
    The C{TableInput} of C{aws glue create-table}: the same columns,
    partition keys and projection as L{athena_ddl}.
    """
    notes = [n for n in _shadow_notes(layout) + _jsonl_notes(layout)
             + _mapping_notes(layout) + _injected_notes(layout)]
    if layout.output_format == "parquet":
        storage = {"InputFormat": PARQUET_INPUT, "OutputFormat": PARQUET_OUTPUT,
                   "SerdeInfo": {"SerializationLibrary": PARQUET_SERDE,
                                 "Parameters": serde_parameters(layout)}}
        params = {"classification": "parquet"}
    else:
        storage = {"InputFormat": TEXT_INPUT, "OutputFormat": TEXT_OUTPUT,
                   "SerdeInfo": {"SerializationLibrary": JSON_SERDE,
                                 "Parameters": serde_parameters(layout)}}
        params = {"classification": "json", "compressionType": "gzip"}
    params["EXTERNAL"] = "TRUE"
    params.update(projection_parameters(layout))
    description = (f"Estat {layout.stream} stream, OUTPUT_FORMAT={layout.output_format}, "
                   f"columns from {_columns_source(layout.table)}")
    if notes:
        description += ". " + " ".join(notes)
    return {
        "Name": layout.name,
        "Description": description[:2048],
        "TableType": "EXTERNAL_TABLE",
        "Parameters": params,
        "PartitionKeys": [{"Name": k, "Type": t} for k, t in _partition_key_types(layout)],
        "StorageDescriptor": {
            "Columns": [{"Name": c.name, "Type": hive_type(c)} for c in layout.data_columns],
            "Location": layout.location,
            **storage,
        },
    }


# --- Spark ------------------------------------------------------------------------


def spark_ddl(layout: TableLayout) -> str:
    """
    Spark SQL: a partitioned table over the location under the raw name
    C{<table>_files}, the partition discovery a catalog table needs before
    (and after new partitions appear) it sees them, and the view C{<table>}
    to query, which gives each dynamic partition key back as the value
    sent.

    Spark decodes each C{%XX} of a partition value as one character
    (U+0000-U+00FF), not as UTF-8, so a non-ASCII value reads as mojibake
    in C{<table>_files}.  C{encode(key, 'ISO-8859-1')} gives back exactly
    the bytes of the path and C{decode(..., 'UTF-8')} the value; ASCII
    values (C{%25} included) are unchanged, C{__HIVE_DEFAULT_PARTITION__}
    stays null.  C{dt} and C{hour} are ASCII and pass as they are.
    """
    lines = _header(layout, "spark")
    lines += _comments(_shadow_notes(layout) + _jsonl_notes(layout))
    partition_types = [(k, "STRING") for k in layout.partition_keys] + [("dt", "DATE"),
                                                                        ("hour", "INT")]
    columns = [f"  {_backtick(c.name)} {spark_type(c)}" for c in layout.data_columns]
    columns += [f"  {_backtick(k)} {t}" for k, t in partition_types]
    using = "parquet" if layout.output_format == "parquet" else "json"
    files = layout.qualified_files
    lines += _comment(f"{layout.name}_files: the stored files as they are; query the view "
                      f"{layout.name} below.")
    lines.append(f"CREATE TABLE IF NOT EXISTS {files} (")
    lines.append(",\n".join(columns))
    lines.append(")")
    lines.append(f"USING {using}")
    lines.append("PARTITIONED BY (" + ", ".join(_backtick(k) for k in layout.all_keys) + ")")
    lines.append(f"LOCATION {_sql_string(layout.location)};")
    lines += _comment("Spark sees only the partitions it has discovered: run this again when "
                      "new ones (a new hour) have been stored.")
    lines.append(f"MSCK REPAIR TABLE {files};")
    view_note = [f"{layout.name}: the table to query, every column of {layout.name}_files."]
    if layout.partition_keys:
        keys = ", ".join(layout.partition_keys)
        view_note.append(
            f"Spark decodes each %XX of a partition value as one character, not as UTF-8; "
            f"{keys} here {'is' if len(layout.partition_keys) == 1 else 'are'} the value "
            "as sent (decode(encode(..., 'ISO-8859-1'), 'UTF-8')).")
    # Measured with EXPLAIN (estat/test/test_e2e_tables.py): Spark prunes
    # on the decoded value too, evaluating it on each partition's value.
    view_note.append(f"A filter on {', '.join(layout.all_keys)} reads only the partitions it "
                     "matches.")
    lines += _comment(" ".join(view_note))
    selected = [f"  {_backtick(c.name)}" for c in layout.data_columns]
    selected += [f"  decode(encode({_backtick(k)}, 'ISO-8859-1'), 'UTF-8') AS {_backtick(k)}"
                 for k in layout.partition_keys]
    selected += ["  `dt`", "  `hour`"]
    lines.append(f"CREATE OR REPLACE VIEW {layout.qualified} AS")
    lines.append("SELECT")
    lines.append(",\n".join(selected))
    lines.append(f"FROM {files};")
    return "\n".join(lines) + "\n"


# --- DuckDB -----------------------------------------------------------------------


def _duckdb_location(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def duckdb_ddl(layout: TableLayout) -> str:
    """
    A DuckDB view over every object of the stream, with the partition keys
    read from the path (DuckDB decodes the percent-encoding and reads
    C{__HIVE_DEFAULT_PARTITION__} as null).
    """
    lines = _header(layout, "duckdb")
    lines += _comments(_shadow_notes(layout) + _jsonl_notes(layout))
    if layout.location.startswith("s3://"):
        lines += _comment("S3: INSTALL httpfs; LOAD httpfs; CREATE SECRET (TYPE s3, PROVIDER "
                     "credential_chain); first.")
    pattern = _sql_string(_duckdb_location(layout.location) + "**/*" + layout.suffix)
    hive_types = "{" + ", ".join(
        f"{_sql_string(k)}: 'VARCHAR'" for k in layout.partition_keys) + (
        ", " if layout.partition_keys else "") + "'dt': 'DATE', 'hour': 'INTEGER'}"
    if layout.output_format == "parquet":
        reader = (f"read_parquet({pattern}, hive_partitioning = true, union_by_name = false,\n"
                  f"    hive_types = {hive_types})")
    else:
        columns = "{" + ", ".join(f"{_sql_string(c.name)}: {_sql_string(duckdb_type(c))}"
                                  for c in layout.data_columns) + "}"
        # ignore_errors: a value that does not fit its column reads as
        # null (the rest of its row is read) instead of failing the query.
        reader = (f"read_json({pattern}, format = 'newline_delimited', compression = 'gzip',\n"
                  f"    ignore_errors = true, hive_partitioning = true,\n"
                  f"    hive_types = {hive_types},\n"
                  f"    columns = {columns})")
    name = ".".join(_duckdb_quote(n) for n in (layout.database, layout.name) if n)
    lines.append(f"CREATE OR REPLACE VIEW {name} AS")
    lines.append(f"SELECT * FROM {reader};")
    return "\n".join(lines) + "\n"


def render(layout: TableLayout, engine: str) -> str:
    """
    What C{estat-tables --engine ENGINE} prints.
    """
    if engine == "athena":
        return athena_ddl(layout)
    if engine == "glue":
        return json.dumps(glue_table_input(layout), indent=2, ensure_ascii=False) + "\n"
    if engine == "spark":
        return spark_ddl(layout)
    if engine == "duckdb":
        return duckdb_ddl(layout)
    raise ValueError(f"unknown engine {engine!r}")


# --- the command --------------------------------------------------------------------


def main(argv=None, stdout=None, stderr=None, environ=None) -> int:
    from .config import SETTINGS, ConfigError, load_config, read_dotenv

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="estat-tables", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--stream", default="collect", choices=STREAMS)
    parser.add_argument("--bad", action="store_true",
                        help="the table of the stream's bad rows (quarantined events)")
    parser.add_argument("--location", default=None,
                        help="where the stream's objects are (default: the configured bucket "
                             "and prefix, or the local store directory)")
    parser.add_argument("--table", default=None,
                        help="table name (default estat_STREAM); for spark, the view's name, "
                             "over the table NAME_files")
    parser.add_argument("--database", default=None,
                        help="database (schema) of the table; for glue, pass it to "
                             "aws glue create-table --database-name")
    parser.add_argument("--since", default=DEFAULT_SINCE,
                        help="first day of Athena's and Glue's projected dt range: yyyy-MM-dd "
                             f"or NOW-<n>YEARS (default {DEFAULT_SINCE})")
    parser.add_argument("--env-file", default=None)
    settings = parser.add_argument_group("server settings (as twistd estat takes them)")
    for s in SETTINGS:
        settings.add_argument(f"--{s.option}", dest=s.attribute, default=None, help=s.help)
    args = parser.parse_args(argv)

    options = {s.attribute: getattr(args, s.attribute) for s in SETTINGS}
    env_file = args.env_file or environ.get("ENV_FILE", ".env")
    try:
        config = load_config(options, environ, read_dotenv(env_file))
        layout = layout_of(config, args.stream, args.location, args.table, args.database,
                           args.since, bad=args.bad)
    except (ConfigError, TablesError) as e:
        print(f"estat-tables: {e}", file=stderr)
        return 2
    stdout.write(render(layout, args.engine))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
