"""
Helpers for Estat's end-to-end tests: a real moto S3 server with SigV4
checking on, a fault-injecting HTTP proxy in front of it, and a real
C{twistd estat} process.

Everything listens on and talks to 127.0.0.1 only.  Every process started
here is ended by its PID, and every wait is bounded.  This module holds no
tests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

__all__ = [
    "BUCKET",
    "LOOPBACK",
    "TWISTD",
    "EstatProcess",
    "EstatProcesses",
    "FaultProxy",
    "MotoServer",
    "ProxiedRequest",
    "content_md5",
    "decode_jsonl_gz",
    "free_port",
    "parse_metrics",
    "stop_process",
    "stored_events_local",
    "stored_objects_local",
    "temp_dir",
    "wait_until",
]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listened on a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1,
               message: str | Callable[[], str] = "condition") -> object:
    """
    Poll C{predicate} until it returns something true, for at most
    C{timeout} seconds; return that value.

    @raise AssertionError: naming C{message} when time is up.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


def temp_dir(case, prefix: str = "estat-test-") -> str:
    """
    A new empty directory, removed after the test C{case} (a trial
    C{TestCase}).  (Not C{case.mktemp()}: under pytest it would write into
    the checkout.)
    """
    path = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(shutil.rmtree, path, True)
    return path


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def decode_jsonl_gz(body: bytes) -> list:
    """
    The JSON objects of one gzip JSON Lines object, in order.
    """
    text = gzip.decompress(body).decode("utf-8")
    assert text.endswith("\n"), "a JSON Lines object ends with a newline"
    return [json.loads(line) for line in text[:-1].split("\n")]


def stored_events_local(directory: str) -> list:
    """
    Every event in every C{.jsonl.gz} object under a directory store,
    objects in key order, lines in stored order.
    """
    return [e for _, events in sorted(stored_objects_local(directory).items()) for e in events]


def stored_objects_local(directory: str) -> dict:
    """
    C{{key: [event, ...]}} of a directory store.
    """
    objects = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if not name.endswith(".jsonl.gz"):
                continue
            path = os.path.join(root, name)
            key = os.path.relpath(path, directory).replace(os.sep, "/")
            with open(path, "rb") as f:
                objects[key] = decode_jsonl_gz(f.read())
    return objects


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """
    End C{proc} by its PID: SIGTERM, a bounded wait, then SIGKILL; return
    its exit status.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout)


_stop_process = stop_process


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _http_get_with_headers(port: int, path: str,
                           timeout: float = 2.0) -> tuple[int, dict, bytes]:
    # http.client, not urllib: no proxy from the environment in the way.
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    status, _, body = _http_get_with_headers(port, path, timeout)
    return status, body


# --- moto ------------------------------------------------------------------


BUCKET = "estat-test"
REGION = "us-east-1"

_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{
        "Effect": "Allow",
        "Action": ["s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:DeleteObject",
                   # moto checks HeadBucket under its own action name.
                   "s3:HeadBucket",
                   # temporary credentials for the container-credentials test
                   "sts:AssumeRole"],
        "Resource": "*",
    }],
}


class MotoServer:
    """
    A moto server on 127.0.0.1 with one bucket, one IAM user allowed to
    use it, and SigV4 checking on: requests not signed with that user's
    key are refused.

    @ivar endpoint: C{http://127.0.0.1:PORT}.
    @ivar access_key, secret_key: the IAM user's key.
    @ivar client: a boto3 S3 client signing with that key.
    """

    def __init__(self, bucket: str = BUCKET, start_timeout: float = 30.0) -> None:
        import boto3

        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.directory = tempfile.mkdtemp(prefix="estat-moto-")
        self.log_path = os.path.join(self.directory, "moto.log")
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.directory)
        try:
            wait_until(self._up, start_timeout, 0.1,
                       lambda: f"moto to listen on {self.port}:\n{_tail(self.log_path)}")
            # Before auth is switched on moto takes any key.
            anyone = dict(endpoint_url=self.endpoint, region_name=REGION,
                          aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
            iam = boto3.client("iam", **anyone)
            iam.create_user(UserName="estat")
            key = iam.create_access_key(UserName="estat")["AccessKey"]
            self.access_key = key["AccessKeyId"]
            self.secret_key = key["SecretAccessKey"]
            policy = iam.create_policy(PolicyName="estat-s3",
                                       PolicyDocument=json.dumps(_POLICY))
            iam.attach_user_policy(UserName="estat", PolicyArn=policy["Policy"]["Arn"])
            # A task role, as on ECS: assuming it gives temporary
            # credentials with a session token that moto recognises.
            trust = {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "sts:AssumeRole",
                "Principal": {"AWS": "arn:aws:iam::123456789012:user/estat"}}]}
            role = iam.create_role(RoleName="estat-task",
                                   AssumeRolePolicyDocument=json.dumps(trust))
            self.role_arn = role["Role"]["Arn"]
            iam.attach_role_policy(RoleName="estat-task", PolicyArn=policy["Policy"]["Arn"])
            boto3.client("s3", **anyone).create_bucket(Bucket=bucket)
            self._enable_auth()
            self.client = self.make_client(self.access_key, self.secret_key)
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"moto exited with {self.proc.returncode}:\n"
                                 f"{_tail(self.log_path)}")
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _enable_auth(self) -> None:
        # moto reads the raw body as the number of requests still let
        # through unauthenticated; a form content type would hide it.
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0",
                         headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise AssertionError(f"moto reset-auth answered {response.status}: {body!r}")

    def make_client(self, access_key: str, secret_key: str, endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            config=Config(s3={"addressing_style": "path"},
                          retries={"max_attempts": 1, "mode": "standard"},
                          connect_timeout=5, read_timeout=10))

    def keys(self, prefix: str = "") -> list:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", ()))
        return sorted(keys)

    def get(self, key: str) -> dict:
        """
        The object's body and metadata: C{{"body", "content_type",
        "content_encoding", "etag"}}.
        """
        o = self.client.get_object(Bucket=self.bucket, Key=key)
        return {
            "body": o["Body"].read(),
            "content_type": o.get("ContentType"),
            "content_encoding": o.get("ContentEncoding"),
            "etag": o.get("ETag", "").strip('"'),
        }

    def objects(self, prefix: str = "") -> dict:
        """
        C{{key: body bytes}} of every object under C{prefix}.
        """
        return {k: self.get(k)["body"] for k in self.keys(prefix)}

    def events(self, prefix: str = "") -> list:
        """
        Every JSON line of every object under C{prefix}, objects in key
        order.
        """
        return [e for _, body in sorted(self.objects(prefix).items())
                for e in decode_jsonl_gz(body)]

    def stop(self) -> None:
        _stop_process(self.proc)
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- the fault proxy --------------------------------------------------------


MODES = ("pass", "500", "slowdown", "slow", "drop_after_store", "refuse", "blackhole")

_INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                   b"<Message>We encountered an internal error. Please try again.</Message>"
                   b"</Error>")
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-connection", "content-length"}


class ProxiedRequest:
    """
    One request the proxy received.
    """

    __slots__ = ("method", "path", "headers", "body_length", "mode")

    def __init__(self, method: str, path: str, headers: list, body_length: int,
                 mode: str) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body_length = body_length
        self.mode = mode

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} ({self.body_length} bytes) in {self.mode}>"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: "FaultProxy"  # set on the subclass each proxy makes

    def log_message(self, format, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.proxy._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.proxy._closed(self.connection)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        mode = self.proxy._record(ProxiedRequest(
            self.command, self.path, list(self.headers.items()), len(body), ""))
        if mode == "refuse":
            # A connection that was open when the listener closed.
            return self._drop()
        if mode == "500":
            return self._answer(500, "Internal Server Error", _INTERNAL_ERROR)
        if mode == "slowdown":
            return self._answer(503, "Slow Down", _SLOW_DOWN)
        if mode == "blackhole":
            self.proxy._wait_while_mode("blackhole")
            return self._drop()
        if mode == "slow":
            self.proxy._stopping.wait(self.proxy.slow_seconds)
            if self.proxy.slow_then == "drop" or self.proxy._stopping.is_set():
                return self._drop()
        try:
            status, reason, headers, content = self._forward(body)
        except OSError:
            return self._drop()
        if mode == "drop_after_store":
            # Stored upstream; the client never hears of it.
            return self._drop()
        self._reply(status, reason, headers, content)

    def _forward(self, body: bytes):
        upstream = http.client.HTTPConnection(LOOPBACK, self.proxy.upstream_port, timeout=30)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in _HOP_BY_HOP:
                    continue
                upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            content = response.read()
            headers = [(k, v) for k, v in response.getheaders()
                       if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":
                length = response.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
            else:
                headers.append(("Content-Length", str(len(content))))
            return response.status, response.reason, headers, content
        finally:
            upstream.close()

    def _answer(self, status: int, reason: str, content: bytes) -> None:
        headers = [("Content-Type", "application/xml"),
                   ("x-amz-request-id", "FAULTPROXY")]
        if self.command != "HEAD":
            headers.append(("Content-Length", str(len(content))))
        else:
            headers.append(("Content-Length", "0"))
            content = b""
        self._reply(status, reason, headers, content)

    def _reply(self, status: int, reason: str, headers: list, content: bytes) -> None:
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD" and content:
                self.wfile.write(content)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # Connections cut by a fault or by stop() are expected here.
        pass


class FaultProxy:
    """
    An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 server, with a fault
    mode that can be changed at any time from any thread:

     - C{"pass"}: forward the request verbatim (the C{Host} header too: the
       SigV4 signature covers it) and return the answer;
     - C{"500"}: answer 500 InternalError, forward nothing;
     - C{"slowdown"}: answer 503 SlowDown, forward nothing;
     - C{"slow"}: wait C{slow_seconds}, then forward (or, if C{slow_then}
       is C{"drop"}, close without an answer);
     - C{"drop_after_store"}: forward (so the object is stored), then close
       the client connection without any answer;
     - C{"refuse"}: close the listening socket (and every open connection):
       connections are refused until the mode changes;
     - C{"blackhole"}: accept and read, never answer; the connection is
       closed when the mode changes or the proxy stops.

    @ivar requests: every L{ProxiedRequest} received, in order.
    @ivar counts: requests received per mode.
    """

    def __init__(self, upstream_port: int, slow_seconds: float = 2.5,
                 slow_then: str = "forward") -> None:
        self.upstream_port = upstream_port
        self.slow_seconds = slow_seconds
        self.slow_then = slow_then
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.requests: list = []
        self.counts: dict = {}
        self._mode = "pass"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: set = set()
        self._server = None
        self._thread = None
        self._handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self._listen()

    # --- listening ---

    def _listen(self) -> None:
        server = _QuietServer((LOOPBACK, self.port), self._handler, bind_and_activate=False)
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(5)

    def _close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _opened(self, connection) -> None:
        with self._lock:
            self._connections.add(connection)

    def _closed(self, connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    # --- the mode ---

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            old, self._mode = self._mode, mode
            self._changed.notify_all()
        if mode == old:
            return
        if mode == "refuse":
            self._unlisten()
            self._close_connections()
        elif old == "refuse":
            self._listen()

    def _wait_while_mode(self, mode: str) -> None:
        with self._changed:
            while self._mode == mode and not self._stopping.is_set():
                self._changed.wait(0.2)

    def _record(self, request: ProxiedRequest) -> str:
        with self._lock:
            request.mode = self._mode
            self.requests.append(request)
            self.counts[self._mode] = self.counts.get(self._mode, 0) + 1
            return self._mode

    def reset_records(self) -> None:
        with self._lock:
            self.requests = []
            self.counts = {}

    def recorded(self, method: str | None = None, mode: str | None = None) -> list:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method)
                    and (mode is None or r.mode == mode)]

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._unlisten()
        self._close_connections()


# --- the Estat process -----------------------------------------------------


#: The C{twistd} of the Python running the tests.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _twistd() -> str:
    return TWISTD


#: The twistd options every process here is started with, as README's
#: commands and the image start it: the reactor of estat.http.reactor.
#: A test passes C{twistd_options=()} for plain C{twistd estat}.
TWISTD_OPTIONS = ("--reactor=estat",)


#: Environment variables Estat reads; the parent's values never leak in.
def _estat_env() -> set:
    from estat.config import SETTINGS

    return {s.env for s in SETTINGS} | {"ENV_FILE"}


_ESTAT_ENV = _estat_env()

_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+\d+)?$")


def parse_metrics(text: str) -> dict:
    """
    Prometheus text format as C{{"name{labels}": value}}.
    """
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if m is None:
            raise ValueError(f"not a sample line: {line!r}")
        samples[m.group(1)] = float(m.group(2))
    return samples


class EstatProcess:
    """
    A C{twistd -n estat} process in its own temporary working directory.

    @ivar port: the HTTP port on 127.0.0.1.
    @ivar directory: the working directory (holds the log).
    @ivar env: the environment it was started with.
    """

    def __init__(self, env: dict | None = None, args: Iterable[str] = (),
                 directory: str | None = None,
                 twistd_options: Iterable[str] = TWISTD_OPTIONS) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="estat-proc-")
        self.port = free_port()
        self.log_path = os.path.join(self.directory, "estat.log")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("AWS_") and k not in _ESTAT_ENV}
        base.update({
            "HTTP_ADDR": f"{LOOPBACK}:{self.port}",
            "DLQ_DIR": os.path.join(self.directory, "dlq"),
            "LOCAL_STORE_DIR": os.path.join(self.directory, "store"),
            "INSTANCE_ID": "e2e",
            "PYTHONUNBUFFERED": "1",
            # botocore must find nothing outside what a test sets.
            "AWS_CONFIG_FILE": os.path.join(self.directory, "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.directory, "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        base.update(env or {})
        self.env = base
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [_twistd(), "-n", "--pidfile=", *twistd_options, "estat", *args],
            cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    @property
    def dlq_dir(self) -> str:
        return self.env["DLQ_DIR"]

    @property
    def store_dir(self) -> str:
        return self.env["LOCAL_STORE_DIR"]

    @property
    def url(self) -> str:
        """
        C{http://127.0.0.1:PORT}, without a trailing slash.
        """
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def _describe(self) -> str:
        return f"estat pid {self.pid} (exit {self.proc.poll()}); log tail:\n{self.log_tail()}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """
        Poll C{GET /readyz} until it answers 200.

        @raise AssertionError: with the log's tail, if the process exits or
            time runs out.
        """
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"estat exited before it was ready: {self._describe()}")
            try:
                status, _ = _http_get(self.port, "/readyz", timeout=1.0)
            except OSError:
                return False
            return status == 200

        wait_until(ready, timeout, 0.05, lambda: f"/readyz: {self._describe()}")

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> str:
        """
        Wait until the log holds C{text} at least C{count} times.
        """
        def found():
            log = self.log()
            if log.count(text) >= count:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(f"estat exited before logging {text!r}: "
                                     f"{self._describe()}")
            return None

        return wait_until(found, timeout, 0.05, lambda: f"{text!r} in the log: "
                                                        f"{self._describe()}")

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)

    def post(self, obj, path: str = "/collect", timeout: float = 10.0,
             headers: dict | None = None) -> tuple[int, bytes]:
        """
        POST one JSON body on a new connection; return (status, body).
        """
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
        conn = self.connection(timeout)
        try:
            conn.request("POST", path, body=body,
                         headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return _http_get(self.port, path, timeout)

    def get_with_headers(self, path: str, timeout: float = 5.0) -> tuple[int, dict, bytes]:
        """
        C{GET path} on a new connection; return (status, C{{header: value}}
        as sent, body).
        """
        return _http_get_with_headers(self.port, path, timeout)

    def metrics(self, timeout: float = 5.0) -> dict:
        status, body = self.get("/metrics", timeout)
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {body[:200]!r}")
        return parse_metrics(body.decode("utf-8"))

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 30.0) -> int:
        """
        Wait for the process to exit; return its exit code.

        @raise AssertionError: if it is still running after C{timeout}.
        """
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"estat did not exit within {timeout}s: "
                                 f"{self._describe()}") from None

    def stop(self, timeout: float = 30.0) -> int | None:
        """
        End the process whatever its state (SIGTERM, then SIGKILL) and
        close the log.  For clean-ups.
        """
        try:
            return _stop_process(self.proc, timeout)
        finally:
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class EstatProcesses:
    """
    The Estat processes of one test, each in its own new directory
    C{estat-N} under C{base}.  L{stop_all} ends every one started.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.started: list = []

    def start(self, env: dict | None = None, ready: bool = True,
              twistd_options: Iterable[str] = TWISTD_OPTIONS) -> EstatProcess:
        """
        Start one process; wait until it is ready unless C{ready} is false.
        """
        directory = os.path.join(self.base, f"estat-{len(self.started)}")
        os.mkdir(directory)
        estat = EstatProcess(env, directory=directory, twistd_options=twistd_options)
        self.started.append(estat)
        if ready:
            estat.wait_ready()
        return estat

    def stop_all(self) -> None:
        for estat in self.started:
            estat.stop()
