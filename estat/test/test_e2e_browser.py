# -*- test-case-name: estat.test.test_e2e_browser -*-
"""
End to end with a real browser: a page served from one loopback port posts
events to a real C{twistd estat} on another, once with C{fetch} (custom
header, so a CORS preflight; C{keepalive}) and once with
C{navigator.sendBeacon} (a string: C{text/plain}, no preflight, the write
key in the query).  Both events must end up in the stored objects.

Needs headless Chromium; skipped, saying how to install it, without it.
Every process started here is ended by its PID (or its own process group),
and every wait is bounded.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from estat.config import SETTINGS

pytestmark = pytest.mark.e2e

LOOPBACK = "127.0.0.1"
WRITE_KEY = "browser-key"
INSTALL_LOG = "/tmp/chromium-install.log"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def find_chromium(wait: float = 300.0) -> str | None:
    """
    The Chromium binary, after waiting (bounded) for a background C{apt-get
    install} still running (its log ends with C{rc=<status>}).
    """
    deadline = time.monotonic() + wait
    while os.path.exists(INSTALL_LOG) and time.monotonic() < deadline:
        with open(INSTALL_LOG, encoding="utf-8", errors="replace") as f:
            if "rc=" in f.read():
                break
        time.sleep(2)
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    # http.client, not urllib: no proxy from the environment in the way.
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class EstatServer:
    """
    A real C{twistd -n --pidfile= estat} in a temporary directory.
    """

    def __init__(self, directory: str, env: dict) -> None:
        self.directory = directory
        self.port = free_port()
        self.store_dir = os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "estat.log")
        # Nothing of the parent's Estat or AWS settings leaks in.
        names = {s.env for s in SETTINGS} | {"ENV_FILE"}
        base = {k: v for k, v in os.environ.items()
                if k not in names and not k.startswith("AWS_")}
        base.update({
            "HTTP_ADDR": f"{LOOPBACK}:{self.port}",
            "LOCAL_STORE_DIR": self.store_dir,
            "DLQ_DIR": os.path.join(directory, "dlq"),
            "FLUSH_INTERVAL": "1s",
            "INSTANCE_ID": "e2e",
            "PYTHONUNBUFFERED": "1",
        })
        base.update(env)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "estat"], cwd=directory, env=base,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"estat exited ({self.proc.returncode}) before it was "
                                     f"ready:\n{self.log_tail()}")
            try:
                if http_get(self.port, "/readyz", 1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"estat not ready within {timeout}s:\n{self.log_tail()}")

    def metric(self, name: str) -> float:
        status, body = http_get(self.port, "/metrics")
        assert status == 200, body
        for line in body.decode("utf-8").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def terminate(self, timeout: float = 30.0) -> int:
        """
        SIGTERM (a graceful shutdown that stores what is queued) and a
        bounded wait for the exit status.
        """
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"estat did not exit within {timeout}s of SIGTERM:\n"
                                 f"{self.log_tail()}") from None

    def stop(self) -> None:
        """
        For clean-ups: end the process whatever its state.
        """
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(15)
        finally:
            self._log.close()

    def stored_events(self) -> list:
        events = []
        for root, _, files in os.walk(self.store_dir):
            for name in sorted(files):
                if name.endswith(".jsonl.gz"):
                    with open(os.path.join(root, name), "rb") as f:
                        text = gzip.decompress(f.read()).decode("utf-8")
                    events.extend(json.loads(line) for line in text.splitlines() if line)
        return events


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>estat e2e</title></head>
<body>
<div id="result">PENDING</div>
<script>
const collect = %(collect)s;
const key = %(key)s;
const out = document.getElementById("result");
const queued = navigator.sendBeacon(
  collect + "?write_key=" + encodeURIComponent(key),
  JSON.stringify({id: %(beacon_id)s, via: "sendBeacon"}));
fetch(collect, {
  method: "POST",
  keepalive: true,
  headers: {"Content-Type": "application/json", "X-Write-Key": key},
  body: JSON.stringify({id: %(fetch_id)s, via: "fetch"}),
}).then(r => r.text().then(text => {
  out.textContent = "FETCH-DONE status=" + r.status + " body=" + text + " beacon=" + queued;
})).catch(e => {
  out.textContent = "FETCH-FAILED " + e + " beacon=" + queued;
});
</script>
</body></html>
"""


class PageServer:
    """
    Serves one HTML page (set once Estat's port is known) on its own
    loopback port, another origin than Estat's, from a thread.
    """

    def __init__(self) -> None:
        self.html = "<!doctype html><title>not ready</title>"
        page = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/":
                    self.send_error(404)
                    return
                body = page.html.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return self.origin + "/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def run_chromium(binary: str, url: str, profile: str, timeout: float = 60.0):
    """
    Load C{url} headless and return (exit status, dumped DOM, stderr).
    Chromium runs in its own process group so that, on a timeout, its
    helper processes (all started by this call) end with it.
    """
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-proxy-server",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    env = dict(os.environ, HOME=profile)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"chromium did not finish within {timeout}s; stderr tail:\n"
                             f"{err.decode('utf-8', 'replace')[-3000:]}") from None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


@pytest.fixture
def workdir():
    directory = tempfile.mkdtemp(prefix="estat-browser-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_fetch_and_send_beacon_from_another_origin(workdir):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")

    fetch_id = "fetch-" + uuid.uuid4().hex
    beacon_id = "beacon-" + uuid.uuid4().hex
    page = PageServer()
    server = None
    try:
        server = EstatServer(workdir, {
            "CORS_ALLOWED_ORIGINS": page.origin,
            "WRITE_KEYS": WRITE_KEY,
        })
        server.wait_ready()
        collect = f"http://{LOOPBACK}:{server.port}/collect"
        page.html = PAGE % {"collect": json.dumps(collect), "key": json.dumps(WRITE_KEY),
                            "fetch_id": json.dumps(fetch_id),
                            "beacon_id": json.dumps(beacon_id)}

        status, dom, stderr = run_chromium(chromium, page.url,
                                           os.path.join(workdir, "profile"))
        diagnostics = (f"chromium exit {status}\nDOM:\n{dom[-2000:]}\nchromium stderr tail:\n"
                       f"{stderr[-2000:]}\nestat log tail:\n{server.log_tail()}")
        assert status == 0, diagnostics
        # The fetch passed its preflight and could read the answer: the
        # CORS headers are right for the page's origin.
        assert 'FETCH-DONE status=202 body={"accepted":1} beacon=true' in dom, diagnostics

        # sendBeacon is fire-and-forget: wait (bounded) until Estat has
        # accepted both before stopping it.
        deadline = time.monotonic() + 15
        while server.metric("events_accepted_total") < 2:
            assert time.monotonic() < deadline, "beacon never arrived:\n" + diagnostics
            time.sleep(0.1)
        assert server.metric("events_accepted_total") == 2, diagnostics

        exit_code = server.terminate()
        stored = {e.get("id"): e for e in server.stored_events()}
        assert fetch_id in stored, f"fetch event not stored; stored ids: {sorted(stored)}"
        assert beacon_id in stored, f"beacon event not stored; stored ids: {sorted(stored)}"
        assert stored[fetch_id]["via"] == "fetch"
        assert stored[beacon_id]["via"] == "sendBeacon"
        for event in (stored[fetch_id], stored[beacon_id]):
            assert event["_estat"]["ip"] == LOOPBACK
            assert "Chrome" in (event["_estat"]["user_agent"] or ""), event
            assert WRITE_KEY not in json.dumps(event)
        # Last, so that everything above is checked whatever the exit
        # status.  README: after SIGTERM "the process exits 0".
        assert exit_code == 0, (f"exit status {exit_code} after a clean shutdown:\n"
                                f"{server.log_tail()}")
    finally:
        page.close()
        if server is not None:
            server.stop()
