# -*- test-case-name: estat.test.test_e2e_segment -*-
"""
End to end with the real Segment SDKs against a real C{twistd estat}:

 - analytics-python (PyPI C{segment-analytics-python}): all six calls, with
   and without C{gzip=True};
 - analytics-node (npm C{@segment/analytics-node}): track calls and
   C{closeAndFlush};
 - analytics.js (npm C{@segment/analytics-next}, its browser build) in
   headless Chromium on another loopback origin, loaded with only
   C{writeKey} and C{cdnURL} pointing at Estat, and its standalone build
   behind Segment's snippet with C{analytics._cdn};

and, with the SDK's own request function or plain HTTP: a retried batch
stored once, a wrong key's 401, a skewed clock corrected, the pixel, an
oversized message's 400.

Every message must be stored exactly once, under SEGMENT_PREFIX, with its
type, messageId, receivedAt and corrected timestamp.  The npm packages are
installed by L{estat.test.sdk.node_modules} (cached); in CI a missing tool
fails these tests instead of skipping them.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from estat.test.harness import LOOPBACK, EstatProcess, stored_objects_local, wait_until
from estat.test.sdk import NODE_CLIENT, missing, node_modules
from estat.test.test_e2e_browser import find_chromium, run_chromium

pytestmark = pytest.mark.e2e

WRITE_KEY = "seg-key"
OTHER_KEY = "other-key"
SOURCE = "backend"


class StaticServer:
    """
    Serves a few fixed files on its own loopback port (another origin than
    Estat's), from a thread.
    """

    def __init__(self) -> None:
        self.files: dict = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_GET(self) -> None:
                entry = files.get(self.path.split("?")[0])
                if entry is None:
                    self.send_error(404)
                    return
                content_type, body = entry
                self.send_response(200)
                self.send_header("Content-Type", content_type)
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

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def pages():
    server = StaticServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def estat(pages):
    directory = tempfile.mkdtemp(prefix="estat-segment-")
    server = EstatProcess({
        "FLUSH_INTERVAL": "1s",
        "WRITE_KEYS": f"{WRITE_KEY}={SOURCE},{OTHER_KEY}",
        "CORS_ALLOWED_ORIGINS": pages.origin,
        "DEDUP_WINDOW": "10m",
    }, directory=directory)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def drained(server: EstatProcess) -> None:
    """
    Wait (bounded) until every event Estat accepted is stored.
    """
    def done():
        metrics = server.metrics()
        accepted = metrics.get("events_accepted_total", 0)
        return accepted and metrics.get("s3_events_stored_total", 0) >= accepted

    wait_until(done, 20, 0.1, lambda: "every accepted event to be stored:\n" + server.log_tail())


def segment_lines(server: EstatProcess) -> list:
    """
    Every stored Segment message (keys under C{segment/}), with its key.
    """
    lines = []
    for key, events in sorted(stored_objects_local(server.store_dir).items()):
        if key.startswith("segment/"):
            lines.extend(events)
    return lines


def by_id(lines: list, ids) -> dict:
    """
    C{{messageId: [stored lines]}} for C{ids}.
    """
    wanted = set(ids)
    found: dict = {i: [] for i in wanted}
    for line in lines:
        if line.get("messageId") in wanted:
            found[line["messageId"]].append(line)
    return found


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def assert_server_fields(line: dict) -> None:
    """
    C{receivedAt}, and C{timestamp} = receivedAt - (sentAt - originalTimestamp).
    """
    received = parse_time(line["receivedAt"])
    assert line["_estat"]["received_at"] == line["receivedAt"]
    if "sentAt" in line and "originalTimestamp" in line:
        expected = received - (parse_time(line["sentAt"]) - parse_time(line["originalTimestamp"]))
        assert abs(parse_time(line["timestamp"]) - expected) <= 0.002, line  # ms rounding
    else:
        assert "timestamp" in line, line
    assert line["context"]["ip"] == LOOPBACK, line
    assert "writeKey" not in line, line


# --- analytics-python ----------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_analytics_python_all_six_calls(estat, gzip):
    from segment.analytics import Client

    errors = []
    client = Client(WRITE_KEY, host=estat.url, gzip=gzip, upload_interval=0.05,
                    max_retries=2, on_error=lambda e, batch: errors.append((repr(e), batch)))
    run = uuid.uuid4().hex[:8]
    user = f"py-{run}"
    calls = [
        client.track(user, "Signed Up", {"plan": "pro", "gzip": gzip}),
        client.identify(user, {"email": "a@example.com"}),
        client.page(user, "Docs", "Pricing", {"path": "/pricing"}),
        client.screen(user, "App", "Home", {"tab": 1}),
        client.group(user, f"group-{run}", {"name": "Acme"}),
        client.alias(f"anon-{run}", user),
    ]
    client.flush()
    client.join()
    assert errors == []
    assert all(ok for ok, _ in calls), calls
    sent = {msg["messageId"]: msg for _, msg in calls}
    drained(estat)
    stored = by_id(segment_lines(estat), sent)
    for message_id, lines in stored.items():
        assert len(lines) == 1, (message_id, lines)
        line = lines[0]
        assert line["type"] == sent[message_id]["type"]
        assert line["context"]["library"]["name"] == "analytics-python"
        assert line["originalTimestamp"] == sent[message_id]["timestamp"]
        assert line["_estat"]["source"] == SOURCE
        assert_server_fields(line)
    types = sorted(lines[0]["type"] for lines in stored.values())
    assert types == ["alias", "group", "identify", "page", "screen", "track"]
    track = next(lines[0] for lines in stored.values() if lines[0]["type"] == "track")
    assert (track["event"], track["properties"]) == ("Signed Up", {"plan": "pro", "gzip": gzip})


# --- analytics-node ------------------------------------------------------


def test_analytics_node_track_and_close_and_flush(estat):
    modules = node_modules()
    env = dict(os.environ, NODE_PATH=modules, ESTAT_HOST=estat.url, WRITE_KEY=OTHER_KEY,
               COUNT="10")
    result = subprocess.run(["node", NODE_CLIENT], env=env, capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, (output, result.stderr.decode("utf-8", "replace"))
    report = json.loads(output.strip().splitlines()[-1])
    assert report["errors"] == []
    assert len(report["sent"]) == 11 and set(report["statuses"]) == {200}, report
    drained(estat)
    stored = by_id(segment_lines(estat), report["sent"])
    for message_id, lines in stored.items():
        assert len(lines) == 1, (message_id, lines)
        line = lines[0]
        assert line["context"]["library"]["name"] == "@segment/analytics-node"
        assert line["_estat"]["source"] is None  # OTHER_KEY has no source name
        assert_server_fields(line)
    types = sorted(lines[0]["type"] for lines in stored.values())
    assert types == ["identify"] + ["track"] * 10


# --- analytics.js in Chromium --------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>estat segment e2e</title></head>
<body>
<div id="result">PENDING</div>
<script src="/analytics.js"></script>
<script>
const out = document.getElementById("result");
(async () => {
  try {
    const analytics = AnalyticsNext.AnalyticsBrowser.load(
      {writeKey: %(key)s, cdnURL: %(cdn)s});
    const page = await analytics.page("Docs", "Pricing", {run: %(run)s});
    const track = await analytics.track("Clicked Buy", {run: %(run)s, price: 9.5});
    out.textContent = "DONE " + JSON.stringify({
      page: page.event.messageId, track: track.event.messageId,
      failed: [page.failedDelivery() || null, track.failedDelivery() || null]});
  } catch (e) {
    out.textContent = "FAILED " + e + " " + (e && e.stack);
  }
})();
</script>
</body></html>
"""


def test_analytics_js_in_chromium(estat, pages, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        missing("chromium not installed: apt-get install chromium")
    bundle = os.path.join(node_modules(), "@segment", "analytics-next", "dist", "umd",
                          "index.js")
    with open(bundle, "rb") as f:
        pages.files["/analytics.js"] = ("application/javascript", f.read())
    run = uuid.uuid4().hex
    pages.files["/"] = ("text/html; charset=utf-8", (PAGE % {
        "key": json.dumps(WRITE_KEY), "cdn": json.dumps(estat.url),
        "run": json.dumps(run)}).encode("utf-8"))

    status, dom, stderr = run_chromium(chromium, pages.origin + "/", str(tmp_path / "profile"))
    diagnostics = (f"chromium exit {status}\nDOM:\n{dom[-3000:]}\nstderr tail:\n"
                   f"{stderr[-3000:]}\nestat log tail:\n{estat.log_tail()}")
    assert status == 0, diagnostics
    assert "DONE " in dom, diagnostics
    result = json.loads(dom.split("DONE ", 1)[1].split("</div>", 1)[0].replace("&quot;", '"'))
    assert result["failed"] == [None, None], diagnostics

    drained(estat)
    stored = by_id(segment_lines(estat), [result["page"], result["track"]])
    assert all(len(lines) == 1 for lines in stored.values()), (stored, diagnostics)
    page, track = stored[result["page"]][0], stored[result["track"]][0]
    assert (page["type"], page["name"], page["category"]) == ("page", "Pricing", "Docs")
    assert (track["type"], track["event"]) == ("track", "Clicked Buy")
    assert track["properties"] == {"run": run, "price": 9.5}
    for line in (page, track):
        assert line["context"]["library"]["name"] == "analytics.js"
        assert "Chrome" in line["context"]["userAgent"], line
        assert line["anonymousId"], line
        assert line["_estat"]["source"] == SOURCE
        assert_server_fields(line)


SNIPPET_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>estat segment snippet e2e</title></head>
<body>
<div id="result">PENDING</div>
<script>
// Segment's snippet, with its CDN replaced: _cdn is where analytics.js
// loads its settings from, the script comes from this page's own server.
!function(){var analytics=window.analytics=window.analytics||[];
analytics.methods=["trackSubmit","trackClick","trackLink","trackForm","pageview","identify",
"reset","group","track","ready","alias","debug","page","screen","once","off","on",
"addSourceMiddleware","addIntegrationMiddleware","setAnonymousId","addDestinationMiddleware",
"register"];
analytics.factory=function(m){return function(){var args=Array.prototype.slice.call(arguments);
args.unshift(m);analytics.push(args);return analytics}};
for(var i=0;i<analytics.methods.length;i++){var m=analytics.methods[i];
analytics[m]=analytics.factory(m)}
analytics._writeKey=%(key)s;analytics._cdn=%(cdn)s;
analytics.page("Snippet", {run: %(run)s});
analytics.track("Snippet Event", {run: %(run)s});
analytics.ready(function(){document.getElementById("result").textContent="READY"});
}();
</script>
<script async src="/analytics.js/v1/%(raw_key)s/analytics.min.js"></script>
</body></html>
"""


def test_analytics_js_snippet_in_chromium(estat, pages, tmp_path):
    """
    The snippet most sites use, pointed at Estat with C{analytics._cdn}:
    analytics.js's standalone build loads its settings from Estat and
    flushes the calls queued before it loaded.
    """
    chromium = find_chromium()
    if chromium is None:
        missing("chromium not installed: apt-get install chromium")
    bundle = os.path.join(node_modules(), "@segment", "analytics-next", "dist", "umd",
                          "standalone.js")
    with open(bundle, "rb") as f:
        pages.files[f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"] = (
            "application/javascript", f.read())
    run = uuid.uuid4().hex
    pages.files["/"] = ("text/html; charset=utf-8", (SNIPPET_PAGE % {
        "key": json.dumps(WRITE_KEY), "raw_key": WRITE_KEY, "cdn": json.dumps(estat.url),
        "run": json.dumps(run)}).encode("utf-8"))

    status, dom, stderr = run_chromium(chromium, pages.origin + "/", str(tmp_path / "profile"))
    diagnostics = (f"chromium exit {status}\nDOM:\n{dom[-3000:]}\nstderr tail:\n"
                   f"{stderr[-3000:]}\nestat log tail:\n{estat.log_tail()}")
    assert status == 0, diagnostics
    assert "READY" in dom, diagnostics

    def both():
        drained(estat)
        return [line for line in segment_lines(estat)
                if (line.get("properties") or {}).get("run") == run]

    lines = wait_until(lambda: len(both()) >= 2 and both(), 15, 0.2,
                       lambda: "the snippet's page and track calls:\n" + diagnostics)
    assert sorted(line["type"] for line in lines) == ["page", "track"], lines
    for line in lines:
        assert line["context"]["library"]["name"] == "analytics.js"
        assert line["_estat"]["source"] == SOURCE
        assert_server_fields(line)


# --- what the SDKs rely on -------------------------------------------------


def _post(estat, batch, key=WRITE_KEY, **kwargs):
    from segment.analytics.request import post

    return post(key, estat.url, batch=batch, **kwargs)


def test_a_retried_batch_is_stored_once(estat):
    from segment.analytics.request import post

    ids = [f"retry-{uuid.uuid4()}" for _ in range(3)]
    batch = [{"type": "track", "event": "Retry", "userId": "r", "messageId": i} for i in ids]
    before = estat.metric('events_deduplicated_total{stream="segment"}')
    assert post(WRITE_KEY, estat.url, batch=batch).status_code == 200
    # The SDK's retry after a timeout: the same batch, X-Retry-Count set.
    assert post(WRITE_KEY, estat.url, batch=batch, retry_count=1).status_code == 200
    assert post(WRITE_KEY, estat.url, gzip=True, batch=batch, retry_count=2).status_code == 200
    assert estat.metric('events_deduplicated_total{stream="segment"}') - before == 6
    drained(estat)
    stored = by_id(segment_lines(estat), ids)
    assert {i: len(lines) for i, lines in stored.items()} == {i: 1 for i in ids}


def test_a_wrong_key_gets_401(estat):
    from segment.analytics.request import APIError

    message_id = f"wrong-{uuid.uuid4()}"
    with pytest.raises(APIError) as raised:
        _post(estat, [{"type": "track", "event": "E", "userId": "u",
                       "messageId": message_id}], key="not-a-key")
    assert raised.value.status == 401
    drained(estat)
    assert by_id(segment_lines(estat), [message_id])[message_id] == []


def test_a_skewed_client_clock_is_corrected(estat):
    # The client's clock is two hours fast.
    skew = datetime.timedelta(hours=2)
    now = datetime.datetime.now(datetime.timezone.utc)
    made = (now + skew - datetime.timedelta(seconds=30)).isoformat(timespec="milliseconds")
    sent = (now + skew).isoformat(timespec="milliseconds")
    message_id = f"skew-{uuid.uuid4()}"
    _post(estat, [{"type": "track", "event": "Skewed", "userId": "u", "messageId": message_id,
                   "timestamp": made}], sentAt=sent)
    drained(estat)
    [line] = by_id(segment_lines(estat), [message_id])[message_id]
    assert line["originalTimestamp"] == made
    assert line["sentAt"] == sent
    received = parse_time(line["receivedAt"])
    # 30 s before it was received, not two hours ahead.
    assert abs(parse_time(line["timestamp"]) - (received - 30)) < 0.01, line
    assert abs(received - now.timestamp()) < 60


def test_the_pixel_answers_a_gif_and_stores_its_message(estat):
    message_id = f"pixel-{uuid.uuid4()}"
    data = base64.b64encode(json.dumps({
        "writeKey": WRITE_KEY, "userId": "reader", "event": "Email Opened",
        "messageId": message_id, "properties": {"campaign": "dec"}}).encode()).decode()
    status, headers, body = estat.get_with_headers("/v1/pixel/track?data=" + data)
    assert status == 200
    assert body[:6] == b"GIF89a"
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-type"] == "image/gif"
    assert headers["cache-control"] == "no-cache, no-store, must-revalidate"
    # A bad one is a GIF too.
    status, _, body = estat.get_with_headers("/v1/pixel/track?data=bm9wZQ")
    assert (status, body[:6]) == (200, b"GIF89a")
    drained(estat)
    [line] = by_id(segment_lines(estat), [message_id])[message_id]
    assert (line["type"], line["event"], line["userId"]) == ("track", "Email Opened", "reader")
    assert line["_estat"]["source"] == SOURCE


def test_an_oversized_message_gets_400(estat):
    from segment.analytics.request import APIError

    message_id = f"big-{uuid.uuid4()}"
    small_id = f"small-{uuid.uuid4()}"
    batch = [{"type": "track", "event": "Small", "userId": "u", "messageId": small_id},
             {"type": "track", "event": "Big", "userId": "u", "messageId": message_id,
              "properties": {"blob": "x" * 40_000}}]
    with pytest.raises(APIError) as raised:
        _post(estat, batch)
    assert raised.value.status == 400
    body = raised.value.response.json()
    assert body["index"] == 1 and "32768" in body["error"], body
    drained(estat)
    # All or nothing: the small one was not stored either.
    assert by_id(segment_lines(estat), [message_id, small_id]) == {message_id: [], small_id: []}


def test_sigterm_stores_queued_segment_messages(tmp_path):
    """
    A graceful shutdown drains the Segment stream too: messages still in
    memory (the flush interval is far off) are stored, and the exit is 0.
    """
    from segment.analytics.request import post

    server = EstatProcess({"FLUSH_INTERVAL": "120s", "WRITE_KEYS": WRITE_KEY},
                          directory=str(tmp_path))
    try:
        server.wait_ready()
        ids = [f"term-{uuid.uuid4()}" for _ in range(5)]
        batch = [{"type": "identify", "userId": "u", "messageId": i} for i in ids]
        assert post(WRITE_KEY, server.url, batch=batch).status_code == 200
        assert server.post({"event": "collect-too"}, headers={"X-Write-Key": WRITE_KEY})[0] == 202
        server.terminate()
        assert server.wait(30) == 0, server.log_tail()
        stored = by_id(segment_lines(server), ids)
        assert {i: len(lines) for i, lines in stored.items()} == {i: 1 for i in ids}
        raw = [e for key, events in stored_objects_local(server.store_dir).items()
               if key.startswith("raw/") for e in events]
        assert [e["event"] for e in raw] == ["collect-too"]
    finally:
        server.stop()


def test_duckdb_sees_one_table_of_unique_messages(estat):
    """
    Last, over everything the tests above stored (all three SDKs, the
    retries, the pixel): DuckDB reads SEGMENT_PREFIX as one Hive-partitioned
    table, every message once, with its server fields, in the partition of
    its receive time.
    """
    import duckdb

    # One of each type of its own, so that the test also stands alone.
    fields = {"track": {"event": "E"}, "group": {"groupId": "g"}, "alias": {"previousId": "p"}}
    _post(estat, [{"type": kind, "userId": "duck", "messageId": f"duck-{kind}-{uuid.uuid4()}",
                   **fields.get(kind, {})}
                  for kind in ("track", "identify", "page", "screen", "group", "alias")])
    drained(estat)
    pattern = os.path.join(estat.store_dir, "segment", "**", "*.jsonl.gz")
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        table = ("read_json(?, format = 'newline_delimited', hive_partitioning = true, "
                 "union_by_name = true)")
        total, unique, typed, timed = con.execute(
            f"SELECT count(*), count(DISTINCT messageId), count(type), "
            f"count(timestamp) FROM {table}", [pattern]).fetchone()
        assert total >= 6 and total == unique == typed == timed, (total, unique, typed, timed)
        # The partition is the receive hour of a batch's first message: a
        # message is in its own hour's, or (a batch that spans the hour) in
        # the hour before.
        for dt, hour, received in con.execute(
                f"SELECT CAST(dt AS VARCHAR), CAST(hour AS INTEGER), "
                f"CAST(receivedAt AS VARCHAR) FROM {table}", [pattern]).fetchall():
            start = datetime.datetime.fromisoformat(f"{dt}T{hour:02d}:00:00+00:00").timestamp()
            assert start <= parse_time(received) < start + 7200, (dt, hour, received)
        types = dict(con.execute(f"SELECT type, count(*) FROM {table} GROUP BY type",
                                 [pattern]).fetchall())
        assert set(types) == {"track", "identify", "page", "screen", "group", "alias"}, types
    finally:
        con.close()


def test_ack_mode_disk_replays_segment_messages_after_sigkill(tmp_path):
    """
    ACK_MODE=disk: a 200 means the messages are in the write-ahead log
    (their own stream in it); after a SIGKILL the next process on the
    same WAL_DIR stores them under SEGMENT_PREFIX, once.
    """
    from segment.analytics.request import post

    env = {"ACK_MODE": "disk", "FLUSH_INTERVAL": "120s", "WRITE_KEYS": WRITE_KEY,
           "WAL_DIR": str(tmp_path / "wal"), "DLQ_DIR": str(tmp_path / "dlq"),
           "LOCAL_STORE_DIR": str(tmp_path / "store")}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = EstatProcess(env, directory=str(tmp_path / "first"))
    second = None
    try:
        first.wait_ready()
        ids = [f"wal-{uuid.uuid4()}" for _ in range(4)]
        batch = [{"type": "track", "event": "Durable", "userId": "u", "messageId": i}
                 for i in ids]
        assert post(WRITE_KEY, first.url, batch=batch).status_code == 200
        first.kill()
        first.wait(10)
        assert segment_lines(first) == []
        second = EstatProcess(env, directory=str(tmp_path / "second"))
        second.wait_ready()
        second.terminate()
        assert second.wait(30) == 0, second.log_tail()
        stored = by_id(segment_lines(second), ids)
        assert {i: len(lines) for i, lines in stored.items()} == {i: 1 for i in ids}, \
            second.log_tail()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_ack_mode_stored_answers_once_stored(tmp_path):
    """
    ACK_MODE=stored: the SDK's request is answered 200 only once its
    messages are in the store.
    """
    from segment.analytics.request import post

    server = EstatProcess({"ACK_MODE": "stored", "FLUSH_INTERVAL": "200ms",
                           "WRITE_KEYS": WRITE_KEY}, directory=str(tmp_path))
    try:
        server.wait_ready()
        ids = [f"stored-{uuid.uuid4()}" for _ in range(3)]
        batch = [{"type": "page", "anonymousId": "a", "messageId": i} for i in ids]
        assert post(WRITE_KEY, server.url, batch=batch).status_code == 200
        # No waiting: stored before the answer.
        stored = by_id(segment_lines(server), ids)
        assert {i: len(lines) for i, lines in stored.items()} == {i: 1 for i in ids}
    finally:
        server.stop()
