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

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from estat.test.harness import LOOPBACK, EstatProcess, stored_events_local, wait_until

pytestmark = pytest.mark.e2e

WRITE_KEY = "browser-key"
INSTALL_LOG = "/tmp/chromium-install.log"


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
        server = EstatProcess({
            "FLUSH_INTERVAL": "1s",
            "CORS_ALLOWED_ORIGINS": page.origin,
            "WRITE_KEYS": WRITE_KEY,
        }, directory=workdir)
        server.wait_ready()
        collect = server.url + "/collect"
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
        wait_until(lambda: server.metric("events_accepted_total") >= 2, 15, 0.1,
                   lambda: "the beacon to arrive (events_accepted_total >= 2):\n" + diagnostics)
        assert server.metric("events_accepted_total") == 2, diagnostics

        # SIGTERM: a graceful shutdown that stores what is queued.
        server.terminate()
        exit_code = server.wait(30)
        stored = {e.get("id"): e for e in stored_events_local(server.store_dir)}
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
