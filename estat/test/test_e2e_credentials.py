# -*- test-case-name: estat.test.test_e2e_credentials -*-
"""
End-to-end: credentials from the ECS/Fargate container endpoint, served
slowly, must never stall the reactor.

A fake container-credentials endpoint on 127.0.0.1 hands out temporary
credentials (with a session token, from moto's STS) after hanging the first
request past botocore's timeout, so botocore spends seconds in timeouts,
retries and sleeps.  While it does, C{/healthz} and C{POST /collect} must
answer at once; afterwards the events must be in the bucket, signed with
the temporary credentials.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from estat.test.harness import LOOPBACK, EstatProcess, MotoServer, free_port, wait_until

pytestmark = pytest.mark.e2e

#: The first fetch hangs longer than botocore's 2 s container timeout.
FIRST_FETCH_HANG = 2.6


class SlowCredentialsEndpoint:
    """
    The ECS container credentials endpoint, slow: the first request hangs
    C{FIRST_FETCH_HANG} seconds (botocore gives up and retries), later ones
    answer after a short delay.
    """

    def __init__(self, credentials: dict) -> None:
        self.credentials = credentials
        self.requests: list = []  # (start, end) monotonic times
        self.in_flight = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with endpoint._lock:
                    first = not endpoint.requests
                    endpoint.requests.append([time.monotonic(), None])
                    index = len(endpoint.requests) - 1
                    endpoint.in_flight += 1
                try:
                    time.sleep(FIRST_FETCH_HANG if first else 0.5)
                    body = json.dumps(endpoint.credentials).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # botocore gave up on this one
                finally:
                    with endpoint._lock:
                        endpoint.requests[index][1] = time.monotonic()
                        endpoint.in_flight -= 1

        self.port = free_port()
        self.server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://{LOOPBACK}:{self.port}/v2/credentials/estat-test"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


def test_slow_container_credentials_do_not_stall_requests(moto):
    import boto3

    session = boto3.client("sts", endpoint_url=moto.endpoint, region_name="us-east-1",
                           aws_access_key_id=moto.access_key,
                           aws_secret_access_key=moto.secret_key)
    temporary = session.assume_role(RoleArn=moto.role_arn, RoleSessionName="estat",
                                    DurationSeconds=3600)["Credentials"]
    assert temporary["SessionToken"]
    expiration = (datetime.datetime.now(datetime.timezone.utc)
                  + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    endpoint = SlowCredentialsEndpoint({
        "AccessKeyId": temporary["AccessKeyId"],
        "SecretAccessKey": temporary["SecretAccessKey"],
        "Token": temporary["SessionToken"],
        "Expiration": expiration,
    })
    prefix = f"creds-{uuid.uuid4().hex[:8]}"
    server = EstatProcess({
        "RAW_BUCKET": moto.bucket,
        "S3_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint.url,
        "RAW_PREFIX": prefix,
        "FLUSH_INTERVAL": "1s",
        "BATCH_SIZE": "1000",
    })
    try:
        server.wait_ready()
        # The start-up bucket check asks for credentials first: wait until
        # that fetch is hanging, then use the API while it does.
        wait_until(lambda: endpoint.in_flight > 0, 15, 0.02,
                   "botocore to ask the container endpoint for credentials")
        ids = []
        slowest = 0.0
        while endpoint.in_flight > 0 and len(ids) < 200:
            event_id = uuid.uuid4().hex
            started = time.monotonic()
            status, _ = server.post({"id": event_id})
            health, _ = server.get("/healthz")
            slowest = max(slowest, time.monotonic() - started)
            assert (status, health) == (202, 200)
            ids.append(event_id)
        assert ids, "the credential fetch ended before any request was made"
        assert endpoint.requests[0][1] is None or \
            endpoint.requests[0][1] - endpoint.requests[0][0] >= FIRST_FETCH_HANG - 0.1
        # Requests were answered while a credential fetch was hanging, and
        # each in far less time than the fetch took.
        assert slowest < 0.5, f"a request took {slowest:.2f}s while credentials were fetched"

        def stored():
            keys = moto.keys(prefix + "/")
            return keys and len(moto.events(prefix + "/")) >= len(ids)

        wait_until(stored, 30, 0.5, lambda: f"events in S3; log:\n{server.log_tail()}")
        events = moto.events(prefix + "/")
        assert sorted(e["id"] for e in events) == sorted(ids)
        assert len(endpoint.requests) >= 2, "botocore should have retried the hung fetch"
        assert server.metric("s3_put_errors_total") == 0
    finally:
        server.terminate()
        assert server.wait(30) == 0
        server.cleanup()
        endpoint.stop()
