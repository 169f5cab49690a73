# -*- test-case-name: estat.test.test_config -*-
"""
Estat's configuration: one table of settings, each an environment variable
(the names and defaults of the original Go service), a twistd option, and a
line in an optional ``.env`` file.

Precedence: command-line option > process environment > ``.env`` > default.

This module only parses; it never touches the network, the disk (beyond
reading the ``.env`` file it is given) or the reactor.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Mapping

import attr

__all__ = [
    "Config",
    "ConfigError",
    "SETTINGS",
    "Setting",
    "load_config",
    "parse_duration",
    "parse_http_addr",
]


class ConfigError(ValueError):
    """
    A setting has a value that cannot be used.  The message names the
    setting and the value, on one line.
    """


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """
    Parse a duration in Go's ``time.ParseDuration`` syntax (``3s``, ``120s``,
    ``2m``, ``24h``, ``1h30m``, ``1.5s``, ``250ms``) into seconds.  ``0`` is
    accepted alone.  Negative durations are refused: no setting means one.
    """
    s = text.strip()
    if s in ("0", "+0"):
        return 0.0
    if s.startswith("+"):
        s = s[1:]
    if not s or s.startswith("-"):
        raise ValueError(f"not a non-negative duration: {text!r}")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


_ASCII_INT = re.compile(r"[+-]?[0-9]+")


def _int(text: str) -> int:
    """
    A plain decimal integer: ASCII digits only (int() alone would take
    '16_384' or other scripts' digits).
    """
    text = text.strip()
    if not _ASCII_INT.fullmatch(text):
        raise ValueError(f"not an integer: {text!r}")
    return int(text, 10)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a positive duration")
    return value


def _string(text: str) -> str:
    return text.strip()


def _non_empty_string(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _key_prefix(text: str) -> str:
    value = text.strip().strip("/")
    if not value:
        raise ValueError("must not be empty")
    return value


def _gzip_level(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 9:
        raise ValueError("must be between 1 and 9")
    return value


def _niceness(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be between 0 and 19")
    return value


def _workers(text: str) -> int:
    """
    C{WORKERS}: a positive count, or C{auto} (L{available_cpus}), kept as 0
    until the process resolves it.
    """
    value = text.strip().lower()
    if value == "auto":
        return 0
    count = _int(value)
    if not 1 <= count <= 256:
        raise ValueError("must be 'auto' or a count from 1 to 256")
    return count


def available_cpus(affinity=None, cgroup_root: str = "/sys/fs/cgroup") -> int:
    """
    The CPUs this process may run on (C{os.sched_getaffinity}), capped by
    the cgroup CPU quota rounded down (v2 C{cpu.max}, or v1
    C{cpu.cfs_quota_us}/C{cpu.cfs_period_us}), at least 1: a 0.5-vCPU task
    gets 1, a 4-vCPU one 4.
    """
    import math
    import os

    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    count = len(affinity) if affinity else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


def _cgroup_quota(root: str) -> float | None:
    import os

    try:
        with open(os.path.join(root, "cpu.max")) as f:
            limit, _, period = f.read().strip().partition(" ")
        if limit != "max" and period:
            return int(limit) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            limit = int(f.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read().strip())
        if limit > 0 and period > 0:
            return limit / period
    except (OSError, ValueError):
        pass
    return None


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return value


def _cidr_list(text: str) -> tuple:
    networks = []
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            networks.append(ipaddress.ip_network(part, strict=False))
    return tuple(networks)


def _string_list(text: str) -> tuple:
    return tuple(p for p in re.split(r"[,\s]+", text.strip()) if p)


def _origin_list(text: str) -> tuple:
    origins = _string_list(text)
    for origin in origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin.rstrip("/")):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
    return tuple(o.rstrip("/") for o in origins)


def _public_url(text: str) -> str:
    value = text.strip().rstrip("/")
    if value and not re.match(r"^https?://[^/\s?#]+$", value):
        raise ValueError("must be a URL like https://collect.example.com (no path)")
    return value


def _ack_mode(text: str) -> str:
    value = text.strip().lower()
    if value not in ("memory", "disk", "stored"):
        raise ValueError("must be 'memory', 'disk' or 'stored'")
    return value


def _output_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("jsonl", "parquet"):
        raise ValueError("must be jsonl or parquet")
    return value


#: Parquet codecs pyarrow writes, and each one's level range (None: no level).
PARQUET_CODECS = {"zstd": (1, 22), "gzip": (1, 9), "brotli": (0, 11), "lz4": None,
                  "snappy": None, "none": None}


def _parquet_compression(text: str) -> tuple:
    """
    C{zstd}, C{zstd:9}, C{snappy}, C{none}...: C{(codec, level or None)}.
    """
    codec, _, level = text.strip().lower().partition(":")
    if codec not in PARQUET_CODECS:
        raise ValueError("codec must be one of " + ", ".join(PARQUET_CODECS))
    bounds = PARQUET_CODECS[codec]
    if not level:
        return (codec, None)
    if bounds is None:
        raise ValueError(f"{codec} takes no level")
    number = _int(level)
    if not bounds[0] <= number <= bounds[1]:
        raise ValueError(f"{codec} level must be {bounds[0]}-{bounds[1]}")
    return (codec, number)


def _partition_by(text: str) -> tuple:
    """
    Comma-separated partition keys: C{source}, or the name of a declared
    string field.  Empty: none (dt/hour only).
    """
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    for key in keys:
        if key in ("dt", "hour"):
            raise ValueError(f"{key!r} is always the last partition keys; do not name it")
        if not all(c.isalnum() or c == "_" for c in key):
            raise ValueError(f"{key!r}: a partition key is letters, digits and '_'")
    if len(set(k.lower() for k in keys)) != len(keys):
        raise ValueError("a partition key is named twice")
    return keys


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _addressing_style(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "path", "virtual"):
        raise ValueError("must be 'auto', 'path' or 'virtual'")
    return value


_GO_ADDR = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$")


def parse_http_addr(text: str) -> str:
    """
    Turn ``HTTP_ADDR`` into a Twisted server endpoint description.

    The Go forms ``:8080``, ``127.0.0.1:8080`` and ``[::1]:8080`` are
    accepted, and so is any endpoint description Twisted understands
    (``tcp:8080:interface=127.0.0.1``, ``unix:/run/estat.sock``).
    """
    value = text.strip()
    if re.match(r"^(tcp|tcp6|unix|ssl|systemd):", value):
        return value
    m = _GO_ADDR.match(value)
    if m is not None:
        port = int(m.group("port"))
        if port > 65535:
            raise ValueError("port out of range")
        host = m.group("v6") or m.group("host") or ""
        if host:
            if host == "localhost":
                host = "127.0.0.1"
            else:
                ipaddress.ip_address(host)
            return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
        return f"tcp:{port}"
    raise ValueError("not an address like ':8080' or '127.0.0.1:8080'")


@attr.s(frozen=True, slots=True)
class Setting:
    """
    One configuration setting.

    @ivar env: the environment variable's name (also the ``.env`` key).
    @ivar attribute: the L{Config} attribute it fills.
    @ivar default: the default, as the text a user would write.
    @ivar parse: turns the text into the value, raising C{ValueError}.
    @ivar help: one line for C{twistd estat --help}.
    """

    env: str = attr.ib()
    default: str = attr.ib()
    parse: Callable[[str], Any] = attr.ib()
    help: str = attr.ib()

    @property
    def attribute(self) -> str:
        return self.env.lower()

    @property
    def option(self) -> str:
        return self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    # The original service's table, same names, same defaults.
    Setting("AWS_REGION", "ap-northeast-2", _non_empty_string, "AWS region of the bucket"),
    Setting("RAW_BUCKET", "", _string, "S3 bucket for raw events; empty: use the local directory store"),
    Setting("RAW_PREFIX", "raw", _key_prefix, "key prefix of stored batches"),
    Setting("DLQ_PREFIX", "raw_dlq", _key_prefix, "key prefix for raw events that could not be encoded"),
    Setting("HTTP_ADDR", ":8080", parse_http_addr, "listen address (':8080', '127.0.0.1:8080' or a Twisted endpoint)"),
    Setting("MAX_BODY_SIZE", "16384", _positive_int, "largest accepted request body, bytes"),
    Setting("CHANNEL_SIZE", "4000", _positive_int, "events the in-memory queue holds before answering 503"),
    Setting("BATCH_SIZE", "5000", _positive_int, "events per stored object"),
    Setting("FLUSH_INTERVAL", "120s", _positive_duration, "seal a batch when its first event is this old"),
    Setting("S3_TIMEOUT", "3s", _positive_duration, "timeout of one upload attempt"),
    Setting("S3_APP_RETRIES", "2", _non_negative_int, "retries of an upload after the first attempt"),
    Setting("DLQ_DIR", "/tmp/dlq", _non_empty_string, "directory of the local dead-letter queue"),
    Setting("DLQ_MAX_AGE", "24h", _positive_duration, "dead-letter files older than this are dropped"),
    Setting("DLQ_MAX_SIZE_BYTES", "19327352832", _positive_int, "dead-letter queue size limit, bytes"),
    # Estat's own settings.
    Setting("DLQ_RETRY_INTERVAL", "5s", _positive_duration, "pause between dead-letter retry passes when idle (doubles on failure, up to 60s)"),
    Setting("LOCAL_STORE_DIR", "./estat-data", _non_empty_string, "directory store used when RAW_BUCKET is empty"),
    Setting("S3_ENDPOINT_URL", "", _string, "S3-compatible endpoint (e.g. http://127.0.0.1:9000); empty: AWS"),
    Setting("S3_ADDRESSING_STYLE", "auto", _addressing_style, "S3 addressing: auto, path or virtual"),
    Setting("SHUTDOWN_TIMEOUT", "25s", _positive_duration, "deadline for a graceful shutdown (keep it below ECS's stopTimeout)"),
    Setting("TRUSTED_PROXIES", "", _cidr_list, "CIDRs whose X-Forwarded-For is believed (e.g. the ALB subnets)"),
    Setting("MAX_PENDING_BATCHES", "4", _positive_int, "sealed batches that may wait for upload before the batcher stops taking events"),
    Setting("QUEUE_MAX_WAIT", "1s", parse_duration, "a request that finds the event queue full waits this long for room before its 503 (ACK_MODE=memory, /collect); 0: 503 at once"),
    Setting("QUEUE_MAX_WAITING_EVENTS", "4000", _positive_int, "events of the requests waiting for room at once; a request that would pass it gets 503 at once"),
    Setting("WORKER_NICE", "0", _niceness, "scheduling niceness (0-19) of the worker threads that gzip batches, sign and do disk I/O; 10 gives the reactor thread the CPU first (lower latency at moderate load, less batched throughput at saturation)"),
    Setting("GZIP_LEVEL", "6", _gzip_level, "gzip level of stored objects, 1 (fastest) to 9 (smallest): libdeflate level N, no larger than zlib level N"),
    Setting("INSTANCE_ID", "", _string, "instance name used in object keys; empty: derived from the host or ECS task"),
    Setting("MAX_BATCH_BODY_SIZE", "524288", _positive_int, "largest body of a batch request (JSON array or NDJSON), bytes, also after decompression"),
    Setting("MAX_EVENTS_PER_REQUEST", "500", _positive_int, "most events one request may carry"),
    Setting("CORS_ALLOWED_ORIGINS", "", _origin_list, "origins browsers may post from (comma-separated), or *"),
    Setting("WRITE_KEYS", "", _string_list, "accepted write keys (comma-separated); empty: no key needed"),
    Setting("WRITE_KEYS_FILE", "", _string, "file of accepted write keys, one per line (added to WRITE_KEYS)"),
    Setting("IP_ANONYMIZE", "false", _boolean, "zero the last octet of IPv4 / last 80 bits of IPv6 client addresses"),
    Setting("HTTP_IDLE_TIMEOUT", "75s", _positive_duration, "close keep-alive connections idle this long (keep above the ALB's idle timeout, 60s)"),
    Setting("REQUEST_TIMEOUT", "30s", _positive_duration, "a request's headers and body must arrive within this (answer: 408)"),
    Setting("MAX_CONNECTIONS", "5000", _positive_int, "open HTTP connections beyond this are closed at once"),
    Setting("LOG_FORMAT", "text", _log_format, "log format on stdout: text or json"),
    # Segment-compatible tracking API (estat.ingest.segment_rules).
    Setting("SEGMENT_PREFIX", "segment", _key_prefix, "key prefix of stored Segment messages"),
    Setting("PUBLIC_URL", "", _public_url, "this server's URL as browsers reach it (https://collect.example.com), for analytics.js settings; empty: from the request"),
    Setting("DEDUP_WINDOW", "10m", parse_duration, "a messageId admitted this recently is acknowledged and not stored again; 0 disables"),
    Setting("DEDUP_MAX_IDS", "100000", _positive_int, "most message ids the dedup window holds (about 75 bytes each); past it the oldest are forgotten early"),
    # Acknowledgement modes (what a 202 promises).
    Setting("ACK_MODE", "memory", _ack_mode, "when a 202 is sent: memory (queued), disk (in the write-ahead log, fdatasync'd) or stored (in the store or the DLQ)"),
    Setting("WORKERS", "1", _workers, "processes serving HTTP_ADDR: 1 is one process as always; N > 1 or auto (the CPUs this process may use, capped by the cgroup quota) runs a supervisor and N workers on one port (docs/workers.md)"),
    Setting("WAL_DIR", "/tmp/wal", _non_empty_string, "directory of the write-ahead log (ACK_MODE=disk); one process per directory"),
    Setting("WAL_MAX_SIZE_BYTES", "1073741824", _positive_int, "size cap of the write-ahead log; beyond it POSTs get 503"),
    Setting("WAL_SEGMENT_SIZE_BYTES", "16777216", _positive_int, "the write-ahead log starts a new segment file at this size"),
    Setting("ACK_MAX_WAITING", "10000", _positive_int, "requests that may wait for their acknowledgement at once (ACK_MODE=stored); beyond, 503"),
    # Tables: output format, declared columns, partitions (estat.encode, estat.schema).
    Setting("OUTPUT_FORMAT", "jsonl", _output_format, "stored objects: jsonl (gzip JSON Lines) or parquet (typed columns, needs pyarrow)"),
    Setting("PARQUET_COMPRESSION", "zstd", _parquet_compression, "Parquet codec[:level]: zstd (default level 3), gzip, brotli, lz4, snappy or none"),
    Setting("COLLECT_SCHEMA", "", _string, "JSON Schema file declaring the columns of /collect events; empty: the whole event in _extra"),
    Setting("SEGMENT_SCHEMA", "", _string, "JSON Schema file declaring more Segment columns (properties, traits as structs)"),
    Setting("SCHEMAS", "", _string, "tracking plan file (YAML or JSON): each stream's JSON Schemas and what to do with an event that fails (docs/schemas.md); empty: nothing is checked"),
    Setting("BAD_PREFIX", "bad", _key_prefix, "key prefix of quarantined events (bad rows), BAD_PREFIX/<stream>/..."),
    Setting("PARTITION_BY", "", _partition_by, "Hive partition keys of /collect before dt/hour: source, or a declared string field"),
    Setting("SEGMENT_PARTITION_BY", "", _partition_by, "Hive partition keys of Segment messages before dt/hour: source, or a string field such as type or event"),
    Setting("MAX_PARTITIONS", "100", _positive_int, "partitions with unsealed events at once, per stream; events for more go to __other__"),
)

SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}


@attr.s(frozen=True, slots=True, kw_only=True)
class Config:
    """
    The parsed settings.  Durations are seconds (float), sizes are bytes.
    """

    aws_region: str = attr.ib()
    raw_bucket: str = attr.ib()
    raw_prefix: str = attr.ib()
    dlq_prefix: str = attr.ib()
    http_addr: str = attr.ib()
    max_body_size: int = attr.ib()
    channel_size: int = attr.ib()
    batch_size: int = attr.ib()
    flush_interval: float = attr.ib()
    s3_timeout: float = attr.ib()
    s3_app_retries: int = attr.ib()
    dlq_dir: str = attr.ib()
    dlq_max_age: float = attr.ib()
    dlq_max_size_bytes: int = attr.ib()
    dlq_retry_interval: float = attr.ib()
    local_store_dir: str = attr.ib()
    s3_endpoint_url: str = attr.ib()
    s3_addressing_style: str = attr.ib()
    shutdown_timeout: float = attr.ib()
    trusted_proxies: tuple = attr.ib()
    max_pending_batches: int = attr.ib()
    gzip_level: int = attr.ib()
    worker_nice: int = attr.ib()
    instance_id: str = attr.ib()
    max_batch_body_size: int = attr.ib()
    max_events_per_request: int = attr.ib()
    cors_allowed_origins: tuple = attr.ib()
    write_keys: tuple = attr.ib()
    write_keys_file: str = attr.ib()
    ip_anonymize: bool = attr.ib()
    http_idle_timeout: float = attr.ib()
    request_timeout: float = attr.ib()
    max_connections: int = attr.ib()
    log_format: str = attr.ib()
    segment_prefix: str = attr.ib()
    public_url: str = attr.ib()
    dedup_window: float = attr.ib()
    dedup_max_ids: int = attr.ib()
    ack_mode: str = attr.ib(default="memory")
    wal_dir: str = attr.ib(default="/tmp/wal")
    wal_max_size_bytes: int = attr.ib(default=1073741824)
    wal_segment_size_bytes: int = attr.ib(default=16777216)
    ack_max_waiting: int = attr.ib(default=10000)
    output_format: str = attr.ib(default="jsonl")
    parquet_compression: tuple = attr.ib(default=("zstd", None))
    collect_schema: str = attr.ib(default="")
    segment_schema: str = attr.ib(default="")
    schemas: str = attr.ib(default="")
    bad_prefix: str = attr.ib(default="bad")
    partition_by: tuple = attr.ib(default=())
    segment_partition_by: tuple = attr.ib(default=())
    max_partitions: int = attr.ib(default=100)
    queue_max_wait: float = attr.ib(default=1.0)
    queue_max_waiting_events: int = attr.ib(default=4000)
    workers: int = attr.ib(default=1)
    #: Set by the supervisor's workers (L{estat.workers.worker.worker_config}):
    #: this process's slot, C{None} in a single process.
    worker_slot: int | None = attr.ib(default=None)

    @classmethod
    def defaults(cls, **overrides: Any) -> "Config":
        """
        The default configuration, with some attributes replaced; for tests
        and embedding.
        """
        values = {s.attribute: s.parse(s.default) for s in SETTINGS}
        values.update(overrides)
        return cls(**values)


def read_dotenv(path: str) -> dict[str, str]:
    """
    Read a ``.env`` file with python-dotenv (quoting, ``export``, comments
    and escapes as docker-compose reads them).  A missing file is empty.
    """
    import os

    from dotenv import dotenv_values

    if not path or not os.path.isfile(path):
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def load_config(
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
) -> Config:
    """
    Build a L{Config} from the three sources, the first that has a value
    winning: C{options} (keyed by L{Setting.attribute}, C{None} meaning
    "not given"), then C{environ}, then C{dotenv}, then the default.

    @raise ConfigError: naming the first bad setting and its value.
    """
    values = {}
    for setting in SETTINGS:
        text = options.get(setting.attribute)
        source = "option --" + setting.option
        if text is None:
            text = environ.get(setting.env)
            source = "environment"
        if text is None:
            text = dotenv.get(setting.env)
            source = ".env"
        if text is None:
            text = setting.default
            source = "default"
        try:
            values[setting.attribute] = setting.parse(text)
        except ValueError as e:
            raise ConfigError(
                f"invalid {setting.env}={text!r} (from {source}): {e}"
            ) from None
    return Config(**values)
