# -*- test-case-name: estat.test.test_e2e_s3 -*-
"""
End-to-end tests of the real C{twistd estat} process against a real S3
API: a moto server with SigV4 checking on, behind a L{FaultProxy} that
fails uploads in the ways S3 and networks do.

The checks are about events, not calls: every event answered 202 ends up
in the bucket exactly once, whatever failed on the way; and the reactor
stays responsive (C{/healthz} answers) while S3 misbehaves.

One moto server and one proxy serve the whole module; each test has its
own key prefix and its own Estat process.  Everything talks to 127.0.0.1.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import re
import time
import uuid
from urllib.parse import quote

import pytest

from estat.dlq import SUFFIX, read_dlq_file
from estat.test.harness import (
    BUCKET,
    LOOPBACK,
    EstatProcess,
    EstatProcesses,
    FaultProxy,
    MotoServer,
    content_md5,
    decode_jsonl_gz,
    wait_until,
)

pytestmark = pytest.mark.e2e

S3_TIMEOUT = 1.0
SHUTDOWN_TIMEOUT = 4.0
#: How long the failing proxy sits on a request in "slow" mode: longer
#: than S3_TIMEOUT, so every attempt times out.
SLOW_SECONDS = 2.5
#: Bound of every wait for the dead-letter queue to drain once S3 is back.
RECOVERY_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_proxy(moto):
    proxy = FaultProxy(moto.port, slow_seconds=SLOW_SECONDS)
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(module_proxy):
    module_proxy.set_mode("pass")
    module_proxy.reset_records()
    yield module_proxy
    module_proxy.set_mode("pass")


@pytest.fixture
def start_estat(moto, proxy, tmp_path, request):
    """
    C{start_estat(**env) -> EstatProcess}: an Estat process storing in the
    moto bucket through the proxy, ready and past its start-up store
    check.  Each test gets its own RAW_PREFIX; every process is ended
    after the test.
    """
    prefix = f"e2e-{re.sub(r'[^a-z0-9]+', '-', request.node.name.lower()).strip('-')}-" \
             f"{uuid.uuid4().hex[:8]}"
    processes = EstatProcesses(str(tmp_path))

    def start(**overrides) -> EstatProcess:
        env = {
            "RAW_BUCKET": BUCKET,
            "RAW_PREFIX": prefix,
            "S3_ENDPOINT_URL": proxy.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key,
            "S3_TIMEOUT": f"{S3_TIMEOUT}s",
            "S3_APP_RETRIES": "1",
            "BATCH_SIZE": "10",
            "FLUSH_INTERVAL": "1s",
            "DLQ_DIR": str(tmp_path / "dlq"),
            "DLQ_RETRY_INTERVAL": "500ms",
            "SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT}s",
        }
        env.update(overrides)
        estat = processes.start(env)
        # The start-up HeadBucket must not meet a fault set by the test.
        estat.wait_log("store check")
        return estat

    start.prefix = prefix
    yield start
    processes.stop_all()


def post_events(estat: EstatProcess, events: list) -> list:
    """
    POST each event on one keep-alive connection; return the ids answered
    202 (all of them, or the test fails).
    """
    accepted = []
    conn = estat.connection(timeout=10)
    try:
        for event in events:
            conn.request("POST", "/collect", body=_json(event),
                         headers={"Content-Type": "application/json",
                                  "User-Agent": "estat-e2e/1"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 202, (response.status, body)
            accepted.append(event["id"])
    finally:
        conn.close()
    return accepted


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def make_events(tag: str, count: int) -> list:
    return [{"id": f"{tag}-{n}", "n": n, "tag": tag} for n in range(count)]


def assert_healthz_responsive(estat: EstatProcess) -> None:
    """
    C{GET /healthz} is answered within about a second: the reactor is not
    blocked by whatever S3 is doing.
    """
    started = time.monotonic()
    status, body = estat.get("/healthz", timeout=1.0)
    assert status == 200, body
    assert time.monotonic() - started < 1.0


def metric_at_least(estat: EstatProcess, name: str, value: float):
    def check():
        m = estat.metrics()
        return m if m.get(name, 0) >= value else None
    return check


def wait_stored_exactly_once(moto: MotoServer, estat: EstatProcess, prefix: str,
                             ids: list, timeout: float = RECOVERY_TIMEOUT) -> list:
    """
    Wait until the DLQ is empty and the bucket holds every one of C{ids};
    then assert each is there exactly once and nothing else is.
    """
    expected = set(ids)

    def all_there():
        if estat.metric("dlq_files_current") != 0 or estat.metric("batches_pending") != 0:
            return None
        stored = [e["id"] for e in moto.events(prefix)]
        return stored if set(stored) >= expected else None

    stored = wait_until(all_there, timeout, 0.25,
                        lambda: f"every event stored under {prefix} and the DLQ empty; "
                                f"log:\n{estat.log_tail(30)}")
    duplicates = {i: k for i, k in collections.Counter(stored).items() if k > 1}
    assert not duplicates, f"events stored more than once: {sorted(duplicates)[:10]}"
    assert set(stored) == expected, f"unexpected events: {sorted(set(stored) - expected)[:10]}"
    return stored


def dlq_events(directory: str) -> list:
    """
    The events in a dead-letter directory, read with the server's own
    reader (so a corrupt file fails the test).
    """
    events = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(SUFFIX):
            events.extend(decode_jsonl_gz(read_dlq_file(os.path.join(directory, name)).body))
    return events


# --- the happy path ---------------------------------------------------------


KEY = re.compile(r"^(?P<prefix>[^/]+)/dt=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
                 r"e2e-\d{8}T\d{9}Z-[0-9a-f]{16}\.jsonl\.gz$")


def test_events_are_stored_as_sent(moto, proxy, start_estat):
    """
    Events read back from S3 are, line by line, the objects the client
    sent plus the server fields; each object went up with a correct
    C{Content-MD5}, C{Content-Type} and C{Content-Encoding}.
    """
    estat = start_estat(BATCH_SIZE="20")
    sent = [{"id": f"h-{n}", "n": n, "text": "h\u00e9llo \u2713 \u2028 \"q\"",
             "nested": {"a": [1, 2.5, None, True, False], "b": {"c": "d" * (n % 5)}},
             "neg": -n, "float": n / 3}
            for n in range(45)]
    sent[7]["big"] = 2 ** 70  # beyond 64 bits: must stay exact
    post_events(estat, sent)

    wait_until(metric_at_least(estat, "s3_events_stored_total", 45), 20, 0.1,
               lambda: f"45 events stored: {estat.log_tail()}")
    keys = moto.keys(start_estat.prefix)
    assert len(keys) >= 3, keys  # 20 + 20 by size, 5 by age (more if the client is slow)

    objects = {}
    puts = {r.path: r for r in proxy.recorded("PUT")}
    for key in keys:
        assert KEY.match(key), key
        o = moto.get(key)
        body = o["body"]
        assert o["content_type"] == "application/x-ndjson"
        assert o["content_encoding"] == "gzip"
        assert o["etag"] == hashlib.md5(body).hexdigest()
        put = puts[f"/{BUCKET}/{quote(key, safe='/~')}"]
        assert put.header("Content-MD5") == content_md5(body)
        assert put.body_length == len(body)
        assert put.header("Host") == f"{LOOPBACK}:{proxy.port}"
        assert "AWS4-HMAC-SHA256" in put.header("Authorization")
        objects[key] = decode_jsonl_gz(body)
        assert 1 <= len(objects[key]) <= 20, key

    order = {e["id"]: n for n, e in enumerate(sent)}
    stored = []
    for key, events in sorted(objects.items(), key=lambda kv: order[kv[1][0]["id"]]):
        m = KEY.match(key)
        received = datetime.datetime.strptime(events[0]["_estat"]["received_at"],
                                              "%Y-%m-%dT%H:%M:%S.%fZ")
        assert (m["date"], m["hour"]) == (f"{received:%Y-%m-%d}", f"{received:%H}"), key
        stored.extend(events)
    assert len(stored) == len(sent)
    for line, original in zip(stored, sent):
        server = line.pop("_estat")
        assert line == original
        assert server["ip"] == LOOPBACK
        assert server["user_agent"] == "estat-e2e/1"

    m = estat.metrics()
    assert m["s3_put_errors_total"] == 0
    assert m["dlq_events_enqueued_total"] == 0
    estat.terminate()
    estat.wait(SHUTDOWN_TIMEOUT + 10)


# --- refused by S3 ----------------------------------------------------------


def test_badly_signed_uploads_are_refused_and_kept(moto, proxy, start_estat):
    """
    With the wrong secret, S3 refuses every PUT with SignatureDoesNotMatch;
    the events wait in the dead-letter queue and nothing is stored.
    """
    estat = start_estat(AWS_SECRET_ACCESS_KEY="not-" + moto.secret_key)
    ids = post_events(estat, make_events("badsig", 25))

    m = wait_until(metric_at_least(estat, "dlq_events_enqueued_total", 25), 20, 0.1,
                   lambda: f"25 events in the DLQ: {estat.log_tail()}")
    assert m['s3_put_errors_by_code_total{code="SignatureDoesNotMatch"}'] > 0
    assert m["s3_put_errors_total"] >= 3
    assert m["s3_events_stored_total"] == 0
    assert m["dlq_files_current"] >= 3
    assert "SignatureDoesNotMatch" in estat.log()
    assert moto.keys(start_estat.prefix) == []
    stored_in_dlq = [e["id"] for e in dlq_events(estat.dlq_dir)]
    assert sorted(stored_in_dlq) == sorted(ids)
    estat.terminate()
    estat.wait(SHUTDOWN_TIMEOUT + 10)


# --- faults, and recovery ---------------------------------------------------


#: The error code each fault is counted under.
FAULT_CODES = {
    "500": "InternalError",
    "slowdown": "SlowDown",
    "slow": "Timeout",
    "drop_after_store": "ConnectionLost",
    "refuse": "ConnectionRefused",
    "blackhole": "Timeout",
}


@pytest.mark.parametrize("mode", list(FAULT_CODES))
def test_fault_then_recovery_stores_every_event_once(moto, proxy, start_estat, mode):
    """
    While S3 fails in C{mode}, uploads fail (counted), the retries run out
    and the batches go to the dead-letter queue, and C{/healthz} stays
    responsive; once S3 is back every accepted event is in the bucket
    exactly once.
    """
    # Only the size trigger seals: exactly two batches however slow the
    # client is.
    estat = start_estat(FLUSH_INTERVAL="60s")
    count, batches = 20, 2
    proxy.set_mode(mode)
    ids = post_events(estat, make_events(mode, count))

    # Both batches failed twice (S3_APP_RETRIES=1) and went to the DLQ.
    m = wait_until(metric_at_least(estat, "dlq_events_enqueued_total", count), 20, 0.1,
                   lambda: f"{count} events in the DLQ in mode {mode}: {estat.log_tail()}")
    assert m["s3_put_errors_total"] >= 2 * batches
    codes = {k: v for k, v in m.items() if k.startswith("s3_put_errors_by_code_total")}
    assert m["dlq_files_current"] == batches
    assert_healthz_responsive(estat)
    if mode != "refuse":
        assert proxy.counts.get(mode, 0) >= 2 * batches
    if mode == "drop_after_store":
        # The ambiguous failure: the objects are in the bucket already.
        assert len(moto.keys(start_estat.prefix)) == batches

    proxy.set_mode("pass")
    stored = wait_stored_exactly_once(moto, estat, start_estat.prefix, ids)
    assert len(stored) == count
    # Each batch is one object: a retry writes the same key.
    assert len(moto.keys(start_estat.prefix)) == batches

    m = estat.metrics()
    assert m["dlq_events_recovered_total"] == count
    assert m["dlq_events_dropped_total"] == 0
    estat.terminate()
    estat.wait(SHUTDOWN_TIMEOUT + 10)
    # Last, so that a wrong label does not hide the checks above.
    assert codes.get(f's3_put_errors_by_code_total{{code="{FAULT_CODES[mode]}"}}', 0) > 0, codes


# --- shutdown while S3 is unreachable ---------------------------------------


def test_sigterm_while_s3_is_blackholed_keeps_events_for_the_next_process(
        moto, proxy, start_estat):
    """
    A SIGTERM while S3 answers nothing: the process exits 0 within
    SHUTDOWN_TIMEOUT with every event in its dead-letter queue; the next
    process on the same DLQ_DIR uploads them, each exactly once.
    """
    first = start_estat()
    proxy.set_mode("blackhole")
    ids = post_events(first, make_events("term", 25))  # two full batches and an open one

    started = time.monotonic()
    first.terminate()
    exit_code = first.wait(SHUTDOWN_TIMEOUT + 10)
    elapsed = time.monotonic() - started
    log = first.log()
    assert elapsed < SHUTDOWN_TIMEOUT + 1.5, f"took {elapsed:.1f}s:\n{log[-3000:]}"
    assert "shutdown deadline of" not in log, log[-3000:]

    in_dlq = [e["id"] for e in dlq_events(first.dlq_dir)]
    assert sorted(in_dlq) == sorted(ids), "events missing from the dead-letter queue"
    assert moto.keys(start_estat.prefix) == []

    proxy.set_mode("pass")
    second = start_estat(RAW_PREFIX=start_estat.prefix + "-second")
    wait_stored_exactly_once(moto, second, start_estat.prefix, ids)
    assert second.metric("dlq_events_recovered_total") == len(ids)
    assert [n for n in os.listdir(second.dlq_dir) if n.endswith(SUFFIX)] == []
    second.terminate()
    second.wait(SHUTDOWN_TIMEOUT + 10)
    assert exit_code == 0, f"exit status {exit_code} after a clean shutdown"


# --- start-up with a bucket that is not there --------------------------------


def test_missing_bucket_is_reported_once_and_serving_goes_on(moto, proxy, start_estat):
    estat = start_estat(RAW_BUCKET="no-such-bucket")
    log = estat.wait_log("store check")
    failed = [line for line in log.splitlines() if "store check FAILED" in line]
    assert len(failed) == 1, log
    assert "no-such-bucket" in failed[0]

    ids = post_events(estat, make_events("nobucket", 3))
    assert ids == ["nobucket-0", "nobucket-1", "nobucket-2"]
    assert estat.get("/readyz")[0] == 200
    m = wait_until(metric_at_least(estat, "dlq_events_enqueued_total", 3), 20, 0.1,
                   lambda: f"3 events in the DLQ: {estat.log_tail()}")
    assert m['s3_put_errors_by_code_total{code="NoSuchBucket"}'] > 0
    assert sorted(e["id"] for e in dlq_events(estat.dlq_dir)) == sorted(ids)
    estat.terminate()
    estat.wait(SHUTDOWN_TIMEOUT + 10)


# --- back-pressure while S3 hangs -------------------------------------------


def test_queue_full_answers_503_and_loses_nothing(moto, proxy, start_estat):
    """
    While S3 hangs, the batcher stops taking events once MAX_PENDING_BATCHES
    are on their way, the queue fills and further events are refused with
    503 and counted; the accepted ones are all stored once S3 is back.
    """
    estat = start_estat(CHANNEL_SIZE="5", BATCH_SIZE="5", MAX_PENDING_BATCHES="1")
    proxy.set_mode("blackhole")
    accepted, refused = [], []
    conn = estat.connection(timeout=10)
    try:
        for event in make_events("full", 15):
            conn.request("POST", "/collect", body=_json(event))
            response = conn.getresponse()
            response.read()
            if response.status == 202:
                accepted.append(event["id"])
            else:
                assert response.status == 503
                assert response.getheader("Retry-After") == "1"
                refused.append(event["id"])
    finally:
        conn.close()
    assert refused, "the queue never filled"
    m = estat.metrics()
    assert m["http_requests_total"] == 15
    assert m["http_requests_accepted_total"] == len(accepted)
    assert m["http_requests_rejected_queue_full_total"] == len(refused)
    assert_healthz_responsive(estat)

    proxy.set_mode("pass")
    wait_stored_exactly_once(moto, estat, start_estat.prefix, accepted)
    assert estat.metric("dlq_events_dropped_total") == 0
    estat.terminate()
    estat.wait(SHUTDOWN_TIMEOUT + 10)
