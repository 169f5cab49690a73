# -*- test-case-name: estat.test.test_tap -*-
"""
C{twistd estat}: the options and the wiring of the service.  Behaviour
lives in the modules this one connects; nothing here does I/O beyond
reading the C{.env} file.
"""

from __future__ import annotations

import os
import sys
import threading
from functools import partial

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from .batcher import Batcher
from .config import SETTINGS, Config, ConfigError, load_config, read_dotenv
from .dedup import DedupWindow
from .dlq import DiskDeadLetterQueue
from .event import ClientAddressResolver
from .ingest.access import CorsPolicy, WriteKeys, read_keys_file
from .http.routes import IngestAPI
from .ingest.body import Limits
from .http.protocol import FastHTTPFactory
from .ingest.segment_api import SegmentAPI
from .http.site import HTTPListenerService
from .http.transport import server_endpoint
from .ingest.admission import WaitingQueueAdmission
from .ingest.core import IngestCore, QueueAdmission
from .keys import KeyMaker, default_instance_id, sanitize
from .malloc import one_arena
from .metrics import Metrics
from .queue import EventQueue
from .ingest.segment_rules import SegmentLimits
from .service import EstatService, Readiness
from .store.local import LocalDirectoryStore
from .uploader import Uploader

__all__ = ["Options", "makeService", "build_service"]


class Options(usage.Options):
    """
    Every setting is an option; an option not given falls back to the
    environment, then to C{--env-file}, then to the default.
    """

    synopsis = "[options]"
    longdesc = (
        "Estat ingest server. Every option is also an environment variable "
        "(upper case, '_' for '-') and a line of the .env file; precedence: "
        "option > environment > .env > default. Durations use Go syntax "
        "(3s, 2m, 1h30m)."
    )
    optParameters = [
        ["env-file", None, None, "the .env file to read [default: .env, or $ENV_FILE]"],
    ] + [
        [s.option, None, None, f"{s.help} [${s.env}, default: {s.default or 'empty'}]"]
        for s in SETTINGS
    ]

    def postOptions(self) -> None:
        env_file = self["env-file"] or os.environ.get("ENV_FILE", ".env")
        try:
            self.config = load_config(
                {s.attribute: self[s.option] for s in SETTINGS},
                os.environ,
                read_dotenv(env_file),
            )
            if self.config.write_keys_file:
                try:
                    read_keys_file(self.config.write_keys_file)
                except OSError as e:
                    raise ConfigError(f"invalid WRITE_KEYS_FILE={self.config.write_keys_file!r}: {e.strerror}")
            _tables(self.config)
        except ConfigError as e:
            # One line naming the setting and its value, not the whole
            # usage text twistd prints for a UsageError.
            sys.stderr.write(f"estat: {e}\n")
            raise SystemExit(2)


def with_backlog(description: str, backlog: int = 1024) -> str:
    """
    A TCP listener with a longer accept queue than Twisted's 50, so that a
    burst of new connections (a load balancer warming up, a reconnect
    storm) is not met with dropped SYNs and one-second client retries.
    """
    if description.startswith(("tcp:", "tcp6:")) and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def _tables(config: Config) -> tuple:
    """
    The tables of the two streams (C{COLLECT_SCHEMA}, C{SEGMENT_SCHEMA}),
    with the partition keys checked against them.

    @raise ConfigError: a schema that does not load, or a partition key
        that is neither C{source} nor a declared string field.
    """
    from .pipeline.partitions import check_keys
    from .schema.columns import SchemaError, collect_table, segment_table

    plan = _plan(config)
    collect_schema, segment_schema = config.collect_schema, config.segment_schema
    if plan is not None:
        collect_schema = plan.columns("collect") or ""
        segment_schema = plan.columns("segment") or ""
    setting = "SCHEMAS" if plan is not None else None
    try:
        collect = collect_table(collect_schema or None)
    except SchemaError as e:
        raise ConfigError(f"invalid {setting or 'COLLECT_SCHEMA'}="
                          f"{config.schemas if setting else collect_schema!r}: {e}")
    try:
        segment = segment_table(segment_schema or None)
    except SchemaError as e:
        raise ConfigError(f"invalid {setting or 'SEGMENT_SCHEMA'}="
                          f"{config.schemas if setting else segment_schema!r}: {e}")
    if plan is not None:
        from .schema.columns import with_schema_errors

        collect, segment = with_schema_errors(collect), with_schema_errors(segment)
    for setting, keys, table in (("PARTITION_BY", config.partition_by, collect),
                                 ("SEGMENT_PARTITION_BY", config.segment_partition_by, segment)):
        try:
            check_keys(keys, table.stream, table)
        except ValueError as e:
            raise ConfigError(f"invalid {setting}={','.join(keys)!r}: {e}")
    return collect, segment


def _plan(config: Config):
    """
    The tracking plan C{SCHEMAS} names, compiled, or C{None}.

    @raise ConfigError: the plan does not load (naming its file and why),
        it is set together with C{COLLECT_SCHEMA}/C{SEGMENT_SCHEMA}, or
        C{BAD_PREFIX} would share keys with another prefix.
    """
    if not config.schemas:
        return None
    from .schema.plan import PlanError, load_plan

    for other in ("COLLECT_SCHEMA", "SEGMENT_SCHEMA"):
        if getattr(config, other.lower()):
            raise ConfigError(f"invalid SCHEMAS={config.schemas!r}: {other} is set too; "
                              "name the column schemas in the plan (columns:) instead")
    bad = config.bad_prefix
    for other in ("RAW_PREFIX", "SEGMENT_PREFIX", "DLQ_PREFIX"):
        value = getattr(config, other.lower())
        if value == bad or value.startswith(bad + "/") or bad.startswith(value + "/"):
            raise ConfigError(f"invalid BAD_PREFIX={bad!r}: it shares keys with "
                              f"{other}={value!r}")
    try:
        return load_plan(config.schemas)
    except PlanError as e:
        raise ConfigError(f"invalid SCHEMAS={config.schemas!r}: {e}")


def stream_encoding(config: Config, table, key_maker: KeyMaker):
    """
    The encoder of one stream (C{OUTPUT_FORMAT}, its partitions) and the
    partitioner its batcher keeps apart (C{None}: one run of events per
    batch).  pyarrow is imported here, and only for C{parquet}.
    """
    from .encode.jsonl import JsonlEncoder
    from .pipeline.partitions import Partitioner

    if config.output_format == "parquet":
        from .encode.parquet import ParquetEncoder

        encoder = ParquetEncoder(table, config.parquet_compression, config.gzip_level)
    else:
        encoder = JsonlEncoder(config.gzip_level, table.stream)
    key_maker.suffix = encoder.suffix
    keys = config.partition_by if table.stream == "collect" else config.segment_partition_by
    if not keys:
        return encoder, None
    from .encode.partitioned import PartitionedEncoder

    partitioner = Partitioner(keys, config.max_partitions)
    encoder = PartitionedEncoder(encoder, partitioner, key_maker)
    # The write-ahead log and the stored-mode ledger follow the stream's
    # order: there the encoder splits each batch by partition instead.
    return encoder, (partitioner if config.ack_mode == "memory" else None)


def build_service(config: Config, reactor, environ=None, endpoint=None) -> EstatService:
    """
    Wire the pipeline for C{config} on C{reactor}: where objects go
    (L{_storage}), the C{/collect} stream and its rules (L{_collect_stream},
    L{_collect_core}), the Segment stream, the tracking plan's bad rows, the
    acknowledgement mode, the HTTP listener (L{_http}) and the service that
    orders start-up and shutdown.
    """
    environ = os.environ if environ is None else environ
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    run_in_thread = _run_in_thread(config, reactor)
    store, dead_letters, uploader = _storage(config, reactor, metrics, run_in_thread, environ)

    instance = sanitize(config.instance_id) if config.instance_id else default_instance_id(environ)
    collect_table, segment_table = _tables(config)
    queue, batcher = _collect_stream(config, reactor, metrics, uploader, instance,
                                     collect_table)
    core = _collect_core(config, reactor, metrics, queue)
    readiness = Readiness(ready=False)
    segment_queue, segment_batcher, segment = _segment_stream(
        config, reactor, metrics, core, uploader, instance, segment_table)
    streams = [(segment_queue, segment_batcher)]
    bad_streams = {}
    plan = _plan(config)
    if plan is not None:
        from .ingest.validation import EventValidation

        validation = EventValidation(plan, metrics)
        core.validation = segment.validation = validation
        for name in ("collect", "segment"):
            bad_streams[name] = _bad_stream(config, reactor, metrics, uploader, instance, name)
            streams.append(bad_streams[name])
    metrics.batches_pending.set_function(
        lambda: batcher.pending_batches + sum(b.pending_batches for _, b in streams))
    api = IngestAPI(core=core, metrics=metrics, clock=reactor, readiness=readiness,
                    handler_for=segment.handler_for)
    wal, replays, settle = _ack_mode(config, core, queue, batcher, uploader, metrics, reactor,
                                     run_in_thread)
    # The Segment stream takes the same acknowledgement mode: its own
    # stream in the same write-ahead log, or its own ledger of waiters.
    replays = replays + _segment_ack_mode(config, wal, segment, segment_queue,
                                          segment_batcher, uploader, metrics)
    for name, (bad_queue, bad_batcher) in bad_streams.items():
        admission, more = _stream_ack_mode(config, wal, "bad_" + name, bad_queue,
                                           bad_batcher, metrics)
        (core if name == "collect" else segment).bad_admission = admission
        replays = replays + more
    if settle is not None:
        first_settle = settle

        def settle() -> Deferred:
            return gatherResults([first_settle()] + [b.drain() for _, b in streams])

    site, http = _http(config, reactor, metrics, {b"/collect": core.handle, **segment.routes()},
                       api, core.limits, settle, endpoint)
    service = EstatService(
        http=http,
        batcher=batcher,
        uploader=uploader,
        dead_letters=dead_letters,
        queue=queue,
        store=store,
        readiness=readiness,
        metrics=metrics,
        clock=reactor,
        shutdown_timeout=config.shutdown_timeout,
        on_clean_shutdown=partial(_exit_zero_after_signal, reactor),
        streams=streams,
        wal=wal,
        replays=replays,
    )
    if plan is not None:
        from .schema.reloader import PlanReloader

        reloader = PlanReloader(path=config.schemas, validation=core.validation,
                                metrics=metrics, run_in_thread=run_in_thread,
                                on_signal=partial(_on_sighup, reactor))
        service.reloader = reloader
        reloader.setServiceParent(service)
    service.api = api
    service.segment = segment
    service.core = core
    service.site = site
    return service


def _run_in_thread(config: Config, reactor):
    """
    C{f, *args -> Deferred} in the reactor's thread pool, at C{WORKER_NICE}.
    """
    threadpool = reactor.getThreadPool()
    if config.worker_nice:
        return partial(deferToThreadPool, reactor, threadpool, _niced, config.worker_nice)
    return partial(deferToThreadPool, reactor, threadpool)


def _storage(config: Config, reactor, metrics: Metrics, run_in_thread, environ):
    """
    C{(store, dead_letters, uploader)}: the object store (S3 when
    C{RAW_BUCKET} is set, else the local directory), the disk dead-letter
    queue, and the uploader between them.
    """
    if config.raw_bucket:
        from .store.s3 import S3Store

        store = S3Store.from_config(config, reactor=reactor, run_in_thread=run_in_thread,
                                    environ=environ)
    else:
        store = LocalDirectoryStore(root=config.local_store_dir, run_in_thread=run_in_thread)

    dead_letters = DiskDeadLetterQueue(
        directory=config.dlq_dir,
        metrics=metrics,
        clock=reactor,
        run_in_thread=run_in_thread,
        max_age=config.dlq_max_age,
        max_bytes=config.dlq_max_size_bytes,
        interval=config.dlq_retry_interval,
        max_backoff=max(60.0, config.dlq_retry_interval),
        shared=config.worker_slot is not None,
    )
    uploader = Uploader(
        store=store,
        dead_letters=dead_letters,
        metrics=metrics,
        clock=reactor,
        run_in_thread=run_in_thread,
        retries=config.s3_app_retries,
        gzip_level=config.gzip_level,
    )
    dead_letters.deliver = lambda obj: Deferred.fromCoroutine(uploader.put_with_retries(obj, 0))
    uploader.on_stored = dead_letters.store_is_back
    return store, dead_letters, uploader


def _collect_stream(config: Config, reactor, metrics: Metrics, uploader: Uploader,
                    instance: str, table):
    """
    C{(queue, batcher)} of C{/collect}: the bounded queue (C{CHANNEL_SIZE})
    and the batcher that seals it into objects under C{RAW_PREFIX}, encoded
    by C{OUTPUT_FORMAT} (the uploader's default encoder).
    """
    queue = EventQueue(config.channel_size, call_soon=lambda f: reactor.callLater(0, f))
    metrics.event_queue_capacity.set(config.channel_size)
    metrics.event_queue_depth.set_function(lambda: len(queue))
    key_maker = KeyMaker(config.raw_prefix, config.dlq_prefix, instance)
    encoder, partitioner = stream_encoding(config, table, key_maker)
    uploader.encoder = encoder
    batcher = Batcher(
        queue=queue,
        sink=uploader.upload,
        key_maker=key_maker,
        metrics=metrics,
        clock=reactor,
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        max_pending=config.max_pending_batches,
        partitioner=partitioner,
        stream="collect",
    )
    return queue, batcher


def _collect_core(config: Config, reactor, metrics: Metrics, queue: EventQueue) -> IngestCore:
    """
    C{/collect}'s rules: write keys (C{WRITE_KEYS}, C{WRITE_KEYS_FILE}),
    limits, CORS, client addresses, and the dedup window the Segment
    routes share.
    """
    keys = config.write_keys
    if config.write_keys_file:
        keys = keys + read_keys_file(config.write_keys_file)
    limits = Limits(event_size=config.max_body_size, body_size=config.max_batch_body_size,
                    events_per_request=config.max_events_per_request)
    # One window of recently admitted messageIds for /collect and the
    # Segment routes (namespaced), so DEDUP_MAX_IDS bounds both.
    dedup = DedupWindow(reactor, window=config.dedup_window, max_ids=config.dedup_max_ids,
                        on_evicted_early=metrics.dedup_ids_evicted_early.inc)
    metrics.dedup_ids.set_function(lambda: len(dedup))
    admission = WaitingQueueAdmission(queue, clock=reactor, metrics=metrics,
                                      max_wait=config.queue_max_wait,
                                      max_waiting_events=config.queue_max_waiting_events,
                                      retry_after=1)
    return IngestCore(
        admission=admission,
        metrics=metrics,
        clock=reactor,
        client_addresses=ClientAddressResolver(config.trusted_proxies,
                                               anonymize=config.ip_anonymize),
        limits=limits,
        write_keys=WriteKeys(keys),
        cors=CorsPolicy(config.cors_allowed_origins),
        dedup=dedup,
        record_source=config.output_format == "parquet" or "source" in config.partition_by,
    )


def _http(config: Config, reactor, metrics: Metrics, routes: dict, api: IngestAPI,
          limits: Limits, settle, endpoint=None):
    """
    C{(site, http)}: the httptools protocol's factory over C{routes} (the
    ingest handlers) and C{api}'s Klein resource for the rest, and the
    listener service on C{HTTP_ADDR}.
    """

    def too_large() -> None:
        metrics.http_requests.inc()
        metrics.http_requests_rejected.labels("too_large").inc()
        metrics.events_rejected.labels("too_large").inc()

    def timed_out() -> None:
        metrics.http_requests_rejected.labels("request_timeout").inc()

    def refused() -> None:
        metrics.http_connections_refused.inc()

    def protocol_error(reason: str) -> None:
        metrics.http_requests_rejected.labels(reason).inc()

    site = FastHTTPFactory(
        routes=routes,
        resource=api.resource(),
        clock=reactor,
        max_body_size=limits.request_size,
        idle_timeout=config.http_idle_timeout,
        request_timeout=config.request_timeout,
        max_connections=config.max_connections,
        on_too_large=too_large,
        on_timeout=timed_out,
        on_refused=refused,
        on_protocol_error=protocol_error,
    )
    metrics.http_connections_open.set_function(lambda: len(site.channels))
    http = HTTPListenerService(
        endpoint=endpoint or server_endpoint(reactor, with_backlog(config.http_addr)),
        site=site,
        clock=reactor,
        grace=min(5.0, config.shutdown_timeout / 4),
        settle=settle,
    )
    return site, http


def _segment_stream(config: Config, reactor, metrics: Metrics, core: IngestCore,
                    uploader: Uploader, instance: str, table):
    """
    The Segment tracking API's stream: its own queue, batcher and key
    prefix (SEGMENT_PREFIX, poison events under DLQ_PREFIX/SEGMENT_PREFIX),
    the same uploader, dead-letter queue, write keys, CORS and client
    addresses as C{/collect}, and the same dedup window.
    """
    queue = EventQueue(config.channel_size)
    key_maker = KeyMaker(config.segment_prefix,
                         f"{config.dlq_prefix}/{config.segment_prefix}", instance)
    encoder, partitioner = stream_encoding(config, table, key_maker)
    batcher = Batcher(
        queue=queue,
        sink=uploader.sink_for(encoder),
        key_maker=key_maker,
        metrics=metrics,
        clock=reactor,
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        max_pending=config.max_pending_batches,
        partitioner=partitioner,
        stream="segment",
    )
    segment = SegmentAPI(
        admission=QueueAdmission(queue, retry_after=1),
        metrics=metrics,
        clock=reactor,
        client_addresses=core.client_addresses,
        write_keys=core.write_keys,
        cors=core.cors,
        limits=SegmentLimits(messages_per_batch=config.max_events_per_request),
        dedup=core.dedup,
        public_url=config.public_url,
    )
    return queue, batcher, segment


def _bad_stream(config: Config, reactor, metrics: Metrics, uploader: Uploader,
                instance: str, stream: str):
    """
    The quarantined events (bad rows) of C{stream}: their own queue and
    batcher, keys under C{BAD_PREFIX/<stream>/} (the stream's partitions,
    then dt/hour), the format of L{bad_encoding}, the same uploader and
    dead-letter queue.
    """
    queue = EventQueue(config.channel_size)
    prefix = f"{config.bad_prefix}/{stream}"
    key_maker = KeyMaker(prefix, f"{config.dlq_prefix}/{prefix}", instance)
    encoder, partitioner = bad_encoding(config, stream, key_maker)
    batcher = Batcher(
        queue=queue,
        sink=uploader.sink_for(encoder),
        key_maker=key_maker,
        metrics=metrics,
        clock=reactor,
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        max_pending=config.max_pending_batches,
        partitioner=partitioner,
        stream="bad_" + stream,
    )
    return queue, batcher


def bad_encoding(config: Config, stream: str, key_maker: KeyMaker, partitioned: bool = True):
    """
    The encoder of C{stream}'s bad rows and the partitioner its batcher
    keeps apart, as L{stream_encoding} for good events: the stream's
    partition keys read from the event as sent
    (L{estat.pipeline.partitions.BadRowPartitioner}), and with
    C{OUTPUT_FORMAT=parquet} the fixed bad-row table
    (L{estat.schema.badrows}); else gzip JSON Lines.  C{partitioned=False}:
    the format alone (C{estat-badrows resubmit} rewrites one object, of one
    partition already).
    """
    if config.output_format == "parquet":
        from .encode.badrows import BadRowEncoder

        encoder = BadRowEncoder(stream, config.parquet_compression, config.gzip_level)
    else:
        from .encode.jsonl import JsonlEncoder

        encoder = JsonlEncoder(config.gzip_level, "bad_" + stream)
    key_maker.suffix = encoder.suffix
    keys = config.partition_by if stream == "collect" else config.segment_partition_by
    if not keys or not partitioned:
        return encoder, None
    from .encode.partitioned import PartitionedEncoder
    from .pipeline.partitions import BadRowPartitioner

    partitioner = BadRowPartitioner(keys, config.max_partitions)
    encoder = PartitionedEncoder(encoder, partitioner, key_maker)
    return encoder, (partitioner if config.ack_mode == "memory" else None)


def _stream_ack_mode(config: Config, wal, stream: str, queue: EventQueue, batcher: Batcher,
                     metrics: Metrics):
    """
    C{ACK_MODE} for one more stream: C{(admission, replays)}.
    """
    from .ingest.core import QueueAdmission

    upload = batcher.sink
    if config.ack_mode == "disk":
        from .wal.admission import WalAdmission

        admission = WalAdmission(wal=wal, queue=queue, upload=upload,
                                 key_maker=batcher.key_maker, metrics=metrics, stream=stream,
                                 replay_concurrency=config.max_pending_batches)
        batcher.sink = admission.sink
        return admission, [lambda recovered: admission.replay(recovered, batcher)]
    if config.ack_mode == "stored":
        from .wal.admission import StoredAdmission

        admission = StoredAdmission(queue=queue, upload=upload, metrics=metrics,
                                    max_waiting=config.ack_max_waiting)
        batcher.sink = admission.sink
        return admission, []
    return QueueAdmission(queue, retry_after=1), []


def _on_sighup(reactor, handler):
    """
    Run C{handler} on the reactor thread at each C{SIGHUP}; returns the
    callable that puts the previous handler back.
    """
    import signal

    def received(signum, frame) -> None:
        reactor.callFromThread(handler)

    previous = signal.signal(signal.SIGHUP, received)
    return lambda: signal.signal(signal.SIGHUP, previous)


def _ack_mode(config: Config, core: IngestCore, queue: EventQueue, batcher: Batcher,
              uploader: Uploader, metrics: Metrics, reactor, run_in_thread):
    """
    Wire C{ACK_MODE}: the admission of the C{/collect} stream, and for
    C{disk} the write-ahead log.  Returns C{(wal, replays, settle)}.
    C{memory} leaves the core's L{WaitingQueueAdmission} and adds nothing.
    """
    if config.ack_mode != "memory":
        # The durable modes admit by their own rules, without waiting.
        queue.on_room = None
    if config.ack_mode == "disk":
        from .wal.admission import WalAdmission
        from .wal.log import WriteAheadLog

        wal = WriteAheadLog(
            directory=config.wal_dir, metrics=metrics, clock=reactor,
            call_from_thread=reactor.callFromThread, run_in_thread=run_in_thread,
            segment_size=config.wal_segment_size_bytes, max_bytes=config.wal_max_size_bytes)
        admission = WalAdmission(wal=wal, queue=queue, upload=uploader.upload,
                                 key_maker=batcher.key_maker, metrics=metrics,
                                 replay_concurrency=config.max_pending_batches)
        core.admission = admission
        batcher.sink = admission.sink
        return wal, [lambda recovered: admission.replay(recovered, batcher)], None
    if config.ack_mode == "stored":
        from .wal.admission import StoredAdmission

        admission = StoredAdmission(queue=queue, upload=uploader.upload, metrics=metrics,
                                    max_waiting=config.ack_max_waiting)
        core.admission = admission
        batcher.sink = admission.sink
        return None, [], batcher.drain
    return None, [], None


def _segment_ack_mode(config: Config, wal, segment, queue: EventQueue, batcher: Batcher,
                      uploader: Uploader, metrics: Metrics) -> list:
    """
    C{ACK_MODE} for the Segment stream, as L{_ack_mode} wires /collect's;
    returns its replays (C{disk}), if any.  The batcher's sink is the
    stream's own upload (its encoder).
    """
    upload = batcher.sink
    if config.ack_mode == "disk":
        from .wal.admission import WalAdmission

        admission = WalAdmission(wal=wal, queue=queue, upload=upload,
                                 key_maker=batcher.key_maker, metrics=metrics,
                                 stream=segment.stream,
                                 replay_concurrency=config.max_pending_batches)
        segment.admission = admission
        batcher.sink = admission.sink
        return [lambda recovered: admission.replay(recovered, batcher)]
    if config.ack_mode == "stored":
        from .wal.admission import StoredAdmission

        admission = StoredAdmission(queue=queue, upload=upload, metrics=metrics,
                                    max_waiting=config.ack_max_waiting)
        segment.admission = admission
        batcher.sink = admission.sink
    return []


_pool_thread = threading.local()


def _niced(niceness: int, f, *args, **kwargs):
    """
    Run C{f} in a pool thread whose scheduling priority is below the
    reactor thread's (C{WORKER_NICE}): on one CPU, gzip of a 5,000-event
    batch is ~30 ms of CPU, and at equal priority the kernel shares the CPU
    with the reactor while it runs (half-load p99 8.2 ms; 4.5-5.2 ms at
    nice 10, while batched throughput at saturation fell from ~67,000 to
    ~45,000 events/s with 503s: the encoder then gets too little CPU).
    """
    if getattr(_pool_thread, "niceness", None) != niceness:
        _pool_thread.niceness = niceness
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except (OSError, AttributeError):
            pass
    return f(*args, **kwargs)


def _exit_zero_after_signal(reactor) -> None:
    """
    twistd exits by re-raising the signal that stopped it (status 143 for
    SIGTERM).  After a shutdown that drained everything, exit 0 instead,
    as the original service does; a shutdown that missed its deadline
    keeps the signal status.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def tune_interpreter() -> None:
    """
    Process-wide settings for a latency-sensitive server on a small CPU:

     - the encoder's worker threads hand the GIL back to the reactor thread
       after 1 ms instead of 5 ms, which trims the request latency tail
       while a batch is being encoded;
     - everything imported and wired so far is moved out of the garbage
       collector's sight (gc.freeze): full collections then walk only the
       objects made while serving, not the ~200,000 of the libraries.
    """
    import gc

    sys.setswitchinterval(0.001)
    gc.collect()
    gc.freeze()


def makeService(options, reactor=None, environ=None, argv=None):
    if reactor is None:
        from twisted.internet import reactor
    environ = os.environ if environ is None else environ
    config = options.config
    # Before any thread allocates (see estat.malloc).
    one_arena(environ)
    slot = None
    endpoint = None
    from .workers.worker import worker_slot

    slot = worker_slot(environ)
    if slot is None:
        workers = config.workers
        if workers == 0:
            from .config import available_cpus

            workers = available_cpus()
        if workers > 1:
            return build_supervisor(config, reactor, workers, environ,
                                    sys.argv if argv is None else argv)
    else:
        from .http.transport import AdoptedEndpoint
        from .workers.supervisor import LISTEN_FD
        from .workers.worker import watch_supervisor, worker_config

        instance = (sanitize(config.instance_id) if config.instance_id
                    else default_instance_id(environ))
        config = worker_config(config, slot, instance)
        endpoint = AdoptedEndpoint(reactor, int(environ.get("ESTAT_LISTEN_FD", LISTEN_FD)))
        watch_supervisor(reactor, os.getppid())
        if environ.get("ESTAT_READY_FD"):
            from .workers.worker import tell_ready

            tell_ready(reactor, int(environ["ESTAT_READY_FD"]))
    service = build_service(config, reactor, environ, endpoint)
    if slot is not None and environ.get("ESTAT_METRICS_DIR"):
        _share_metrics(service, config, reactor, slot, environ["ESTAT_METRICS_DIR"])
    if service.wal is not None:
        from .wal.files import WalInUse

        try:
            # Now, so that a second process on one WAL_DIR stops with one
            # clear line rather than a traceback.
            service.wal.privilegedStartService()
        except (WalInUse, OSError) as e:
            sys.stderr.write(f"estat: {e}\n")
            raise SystemExit(2)
    tune_interpreter()
    _note_reactor(reactor)
    return service


def _note_reactor(reactor) -> None:
    """
    One line when the server runs on a reactor other than
    L{estat.http.reactor}'s (C{twistd --reactor=estat}), which is faster.
    """
    kind = type(reactor)
    if (kind.__module__, kind.__name__) == ("estat.http.reactor", "EstatEPollReactor"):
        return
    from twisted.logger import Logger

    Logger(namespace="estat.tap").info(
        "reactor {reactor}: twistd --reactor=estat dispatches HTTP reads faster "
        "(docs/performance.md)", reactor=f"{kind.__module__}.{kind.__name__}")


def _share_metrics(service: EstatService, config: Config, reactor, slot: int,
                   directory: str) -> None:
    """
    A worker's part of one C{/metrics}: its snapshot in C{directory} every
    second and after shutdown, and scrapes that merge every worker's.
    """
    from .workers.metrics import MetricsScrape, MetricsShare

    registry = service.api.metrics.registry
    run_in_thread = _run_in_thread(config, reactor)
    share = MetricsShare(directory=directory, slot=slot, registry=registry, clock=reactor,
                         run_in_thread=run_in_thread)
    share.setServiceParent(service)
    reactor.addSystemEventTrigger("after", "shutdown", share.write_final)
    service.api.exposition = MetricsScrape(directory=directory, slot=slot, registry=registry,
                                           run_in_thread=run_in_thread).exposition


def build_supervisor(config: Config, reactor, workers: int, environ, argv: list):
    """
    C{WORKERS=N} (N > 1): the supervisor, which binds C{HTTP_ADDR} and
    starts N copies of this command as workers (L{estat.workers}).
    """
    from .workers.supervisor import (Supervisor, bind_listeners, exit_with, twisted_spawner,
                                     worker_argv)

    try:
        listeners = bind_listeners(with_backlog(config.http_addr), workers)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"estat: WORKERS={workers}: cannot listen on {config.http_addr}: {e}\n")
        raise SystemExit(2)
    import signal

    def on_exit(status: int) -> None:
        exit_with(reactor, status)
        if supervisor.running:
            # Not asked to stop (a crash loop stopped the workers): stop twistd.
            reactor.callLater(0, reactor.stop)

    environ = dict(environ)
    # One instance name for the workers, each with its slot (-w<slot>).
    environ["INSTANCE_ID"] = (sanitize(config.instance_id) if config.instance_id
                              else default_instance_id(environ))
    import shutil

    from .workers.metrics import make_directory, retire_snapshot

    metrics_dir = make_directory()
    environ["ESTAT_METRICS_DIR"] = metrics_dir
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, metrics_dir, True)
    supervisor = Supervisor(
        spawn=twisted_spawner(reactor, worker_argv(sys.executable, list(argv)), environ,
                              [listener.fileno() for listener in listeners]),
        clock=reactor,
        count=workers,
        shutdown_timeout=config.shutdown_timeout + 10.0,
        on_exit=on_exit,
        listeners=listeners,
        on_worker_exit=partial(retire_snapshot, metrics_dir),
    )
    supervisor.restore_sighup = _on_sighup(
        reactor, lambda: supervisor.signal_all(signal.SIGHUP))
    return supervisor
