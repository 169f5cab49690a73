# -*- test-case-name: estat.test.test_e2e_replicas -*-
"""
Three replicas of the real C{twistd estat}, on one host name, writing to
the same bucket under the same C{RAW_PREFIX} at the same time, as tasks of
one ECS service do.

Their keys must never collide: an object written by one replica must not
overwrite another's.  So the bucket holds exactly as many objects as the
three processes stored batches, and every acknowledged event is in it
exactly once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import http.client
import json
import random
import re
import threading
import time

import pytest

from estat.test.harness import LOOPBACK, EstatProcess, MotoServer, wait_until

pytestmark = pytest.mark.e2e

REPLICAS = 3
CLIENTS = 9
LOAD_SECONDS = 12.0
PREFIX = "replicated"
SHUTDOWN_TIMEOUT = 8.0

KEY = re.compile(rf"^{PREFIX}/dt=\d{{4}}-\d{{2}}-\d{{2}}/hour=\d{{2}}/"
                 r"(?P<instance>.+)-\d{8}T\d{9}Z-[0-9a-f]{16}\.jsonl\.gz$")


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def replicas(moto, tmp_path):
    started = []
    for n in range(REPLICAS):
        directory = tmp_path / f"replica-{n}"
        directory.mkdir()
        started.append(EstatProcess({
            "RAW_BUCKET": moto.bucket,
            "RAW_PREFIX": PREFIX,
            "S3_ENDPOINT_URL": moto.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key,
            # Small batches: many keys, made within the same milliseconds.
            "BATCH_SIZE": "40",
            "FLUSH_INTERVAL": "1s",
            "SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
            # The default instance id, on one host name for all three: only
            # the random bits tell them apart.
            "INSTANCE_ID": "",
            "HOSTNAME": "estat-task",
        }, directory=str(directory)))
    try:
        for estat in started:
            estat.wait_ready()
        yield started
    finally:
        for estat in started:
            estat.stop()


def post_until(estat: EstatProcess, client: int, stop: threading.Event,
               acked: list, failures: list) -> None:
    """
    POST distinct events (single ones and arrays) on one keep-alive
    connection until C{stop}; note the ids answered 202.
    """
    rng = random.Random(client)
    seq = 0
    conn = http.client.HTTPConnection(LOOPBACK, estat.port, timeout=10)
    try:
        while not stop.is_set():
            n = rng.choice((1, rng.randint(1, 40)))
            events = [{"id": f"r{client}-{seq + i}", "client": client, "n": seq + i}
                      for i in range(n)]
            seq += n
            body = json.dumps(events[0] if n == 1 and rng.random() < 0.5 else events)
            try:
                conn.request("POST", "/collect", body=body,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, estat.port, timeout=10)
                continue
            if response.status == 202:
                acked.extend(e["id"] for e in events)
            elif response.status != 503:
                failures.append(f"{response.status} {answer[:200]!r}")
            time.sleep(0.002)
    finally:
        conn.close()


def test_replicas_on_one_bucket_and_prefix_never_collide(moto, replicas):
    stop = threading.Event()
    acked = [[] for _ in range(CLIENTS)]
    failures: list = []
    threads = [threading.Thread(target=post_until,
                                args=(replicas[c % REPLICAS], c, stop, acked[c], failures),
                                daemon=True)
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join(15)
    assert not failures, failures[:5]
    acked_ids = [i for ids in acked for i in ids]
    assert len(acked_ids) > 3000, "too little load to mean anything"

    # Everything accepted is stored before the SIGTERM, so the last
    # /metrics of each replica tells all it stored.
    def all_stored():
        samples = [estat.metrics() for estat in replicas]
        done = all(m["batches_pending"] == 0 and m["event_queue_depth"] == 0
                   and m["s3_events_stored_total"] == m["events_accepted_total"]
                   for m in samples)
        return samples if done else None

    last = wait_until(all_stored, 30, 0.25, "every replica to store all it accepted")
    for estat in replicas:
        estat.terminate()
    exit_codes = [estat.wait(SHUTDOWN_TIMEOUT + 10) for estat in replicas]
    assert exit_codes == [0] * REPLICAS

    batches = sum(m["batches_stored_total"] for m in last)
    accepted = sum(m["events_accepted_total"] for m in last)
    assert all(m["dlq_events_enqueued_total"] == 0 for m in last)
    assert all(m["batches_stored_total"] > 20 for m in last), [
        m["batches_stored_total"] for m in last]

    keys = moto.keys(PREFIX + "/")
    print(f"{len(acked_ids)} events acknowledged, {len(keys)} objects, batches stored "
          f"per replica {[m['batches_stored_total'] for m in last]}")
    assert len(keys) == len(set(keys))
    # No object overwrote another: one object per stored batch.
    assert len(keys) == batches, (len(keys), batches)
    instances = collections.Counter()
    for key in keys:
        m = KEY.match(key)
        assert m, key
        assert m["instance"].startswith("estat-task-"), key
        instances[m["instance"]] += 1
    assert len(instances) == REPLICAS, instances

    stored = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda key: moto.get(key)["body"], keys))
    for body in bodies:
        for line in gzip.decompress(body).decode("utf-8").splitlines():
            stored[json.loads(line)["id"]] += 1
    duplicated = {i: n for i, n in stored.items() if n > 1}
    assert not duplicated, sorted(duplicated)[:10]
    missing = set(acked_ids) - set(stored)
    assert not missing, sorted(missing)[:10]
    assert len(acked_ids) == len(set(acked_ids)) == accepted == sum(stored.values())
