# -*- test-case-name: estat.test.test_deploy -*-
"""
Tests of the operations files in C{deploy/} and of the Dockerfile's
promises, against the code they describe:

 - every metric name the alert rules and the Grafana dashboard use is one
   that L{estat.metrics.Metrics} really exports;
 - C{promtool} accepts the rules and the example configuration, and the
   rules' unit tests (C{deploy/prometheus/alerts_test.yml}) pass;
 - a real Prometheus scrapes a real C{twistd estat} and sees the seed
   metrics with true counts (C{e2e});
 - the Dockerfile, the ECS task definition and the IAM policy agree with
   L{estat.config.SETTINGS} and with each other.

The tests that need C{promtool} or C{prometheus} (Debian's C{prometheus}
package) skip, saying so, when it is not installed.  Every process started
here is ended by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml  # PyYAML: a dependency of the test extras (moto[server], schemathesis)
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from estat.config import SETTINGS, SETTINGS_BY_ENV, load_config, parse_duration
from estat.metrics import SEED_METRIC_NAMES, Metrics
from estat.test.harness import LOOPBACK, EstatProcess, free_port, stop_process, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
PROMETHEUS_DIR = os.path.join(DEPLOY, "prometheus")
ALERTS = os.path.join(PROMETHEUS_DIR, "alerts.yml")
ALERTS_TEST = os.path.join(PROMETHEUS_DIR, "alerts_test.yml")
PROMETHEUS_CONFIG = os.path.join(PROMETHEUS_DIR, "prometheus.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "estat-dashboard.json")
TASK_DEFINITION = os.path.join(DEPLOY, "ecs-task-definition.json")
IAM_POLICY = os.path.join(DEPLOY, "iam-task-policy.json")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
README = os.path.join(ROOT, "README.md")

GIB = 2 ** 30


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_yaml(path: str):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --- what Estat exports -----------------------------------------------------


def exported_sample_names() -> set:
    """
    Every sample name a real L{Metrics} exposition holds once each metric
    has been used (a labelled metric exports nothing before its first
    label set), plus C{up}, which Prometheus adds to every target.
    """
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(wrappers) >= len(SEED_METRIC_NAMES)
    for metric in wrappers:
        labelnames = metric._labelnames
        child = metric.labels(*["dummy"] * len(labelnames)) if labelnames else metric
        if hasattr(child, "inc"):
            child.inc()
        elif hasattr(child, "observe"):
            child.observe(0.1)
        else:
            child.set(1)
    names = {"up"}
    for line in generate_latest(metrics.registry).decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


# --- metric names in PromQL -------------------------------------------------

#: PromQL's functions and aggregation operators (and Grafana's label_values).
PROMQL_FUNCTIONS = frozenset("""
    abs absent absent_over_time avg avg_over_time bottomk ceil changes clamp
    clamp_max clamp_min count count_over_time count_values day_of_month
    day_of_week day_of_year days_in_month delta deriv exp floor group
    histogram_count histogram_fraction histogram_quantile histogram_sum
    holt_winters hour idelta increase irate label_join label_replace
    label_values last_over_time ln log10 log2 mad_over_time max max_over_time
    min min_over_time minute month predict_linear present_over_time quantile
    quantile_over_time rate resets round scalar sgn sort sort_desc sqrt
    stddev stddev_over_time stdvar stdvar_over_time sum sum_over_time
    time timestamp topk vector year
""".split())

#: Binary and modifier keywords that stand alone.
PROMQL_KEYWORDS = frozenset("and or unless bool offset inf nan".split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expr: str) -> set:
    """
    The metric names a PromQL expression reads.

    Label matchers, label lists (C{by (...)}, C{on (...)}), ranges,
    strings and Grafana variables are removed first; what is left is
    functions (followed by C{(}), keywords and metric names.

    @raise ValueError: for a name called like a function that PromQL does
        not have.
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for m in _IDENTIFIER.finditer(text):
        token = m.group(0)
        if text[m.end():].lstrip().startswith("("):
            if token not in PROMQL_FUNCTIONS:
                raise ValueError(f"{token!r} is not a PromQL function, in {expr!r}")
            continue
        if token.lower() in PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def alert_rules() -> list:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_panels() -> list:
    panels = []
    for panel in _load_json(DASHBOARD)["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", ()))  # collapsed rows hold theirs
    return panels


def dashboard_exprs() -> list:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", ())]


def grafana_to_promql(expr: str) -> str:
    """
    A dashboard expression as Prometheus would receive it.
    """
    return (expr.replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$instance", ".*"))


class TestPromqlMetricNames:
    """
    The name extractor itself: strict enough to catch a typo.
    """

    def test_names_and_not_labels_functions_or_keywords(self):
        expr = ('histogram_quantile(0.99, sum by (le, instance) '
                '(rate(s3_put_duration_seconds_bucket{job="estat", code=~"a|b"}[$__rate_interval])))'
                ' > 0.5 and on (instance) dlq_files_current offset 5m'
                ' or sum without (reason) (increase(events_dropped_total[1h])) > 0.8 * 19327352832')
        assert promql_metric_names(expr) == {
            "s3_put_duration_seconds_bucket", "dlq_files_current", "events_dropped_total"}

    def test_a_typo_is_caught(self):
        exported = exported_sample_names()
        names = promql_metric_names('dlq_file_current{job="estat"} > 0')
        assert names == {"dlq_file_current"}
        assert not names <= exported
        assert "dlq_files_current" in exported

    def test_an_unknown_function_is_an_error(self):
        with pytest.raises(ValueError):
            promql_metric_names("rates(http_requests_total[5m])")

    def test_exported_names_include_every_kind(self):
        exported = exported_sample_names()
        for name in SEED_METRIC_NAMES + (
                "http_request_duration_seconds_bucket", "http_request_duration_seconds_count",
                "s3_put_duration_seconds_sum", "s3_put_errors_by_code_total",
                "events_dropped_total", "loop_errors_total", "dlq_bytes_current", "up"):
            assert name in exported
        assert "http_requests" not in exported  # counters only exist with _total


class TestMetricNamesInUse:
    def test_alert_expressions_use_exported_metrics(self):
        exported = exported_sample_names()
        used = {}
        for rule in alert_rules():
            for name in promql_metric_names(rule["expr"]):
                used.setdefault(name, []).append(rule["alert"])
        unknown = {n: r for n, r in used.items() if n not in exported}
        assert not unknown, f"alert rules use metrics Estat does not export: {unknown}"
        assert {"http_requests_rejected_queue_full_total", "dlq_events_dropped_total",
                "dlq_files_current", "s3_put_errors_total", "s3_events_stored_total",
                "events_accepted_total", "shutdown_events_unsaved_total", "up"} <= set(used)

    def test_dashboard_targets_use_exported_metrics(self):
        exported = exported_sample_names()
        used = {}
        for panel in dashboard_panels():
            for target in panel.get("targets", ()):
                for name in promql_metric_names(target["expr"]):
                    used.setdefault(name, []).append(panel["title"])
        unknown = {n: p for n, p in used.items() if n not in exported}
        assert not unknown, f"dashboard panels use metrics Estat does not export: {unknown}"
        assert {
            "http_requests_accepted_total", "http_requests_rejected_total",
            "events_accepted_total", "s3_events_stored_total", "event_queue_depth",
            "event_queue_capacity", "batches_pending", "s3_put_duration_seconds_bucket",
            "http_request_duration_seconds_bucket", "s3_put_errors_by_code_total",
            "dlq_files_current", "dlq_bytes_current", "dlq_events_enqueued_total",
            "dlq_events_recovered_total", "dlq_events_dropped_total",
            "events_dropped_total", "loop_errors_total",
        } <= set(used)

    def test_template_variable_query_uses_exported_metrics(self):
        exported = exported_sample_names()
        for variable in _load_json(DASHBOARD)["templating"]["list"]:
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # label_values(<series selector>, <label>): the label is not a metric.
            query = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query)
            assert promql_metric_names(query) == {"up"} & exported, query


class TestAlertRulesShape:
    def test_every_alert_has_severity_summary_description_and_runbook(self):
        rules = alert_rules()
        assert rules
        for rule in rules:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            for annotation in ("summary", "description", "runbook"):
                assert rule["annotations"].get(annotation, "").strip(), (rule["alert"], annotation)

    def test_the_asked_for_alerts_exist(self):
        by_name = {r["alert"]: r for r in alert_rules()}
        exprs = {name: r["expr"] for name, r in by_name.items()}
        wanted = {
            "http_requests_rejected_queue_full_total": "rate(",
            "dlq_events_dropped_total": "increase(",
            "dlq_files_current": "deriv(",
            "s3_put_errors_total": "rate(",
            "s3_events_stored_total": "increase(",
            "up": "== 0",
            "shutdown_events_unsaved_total": "increase(",
        }
        for metric, shape in wanted.items():
            assert any(metric in promql_metric_names(e) and shape in e for e in exprs.values()), \
                metric
        drops = [r for r in by_name.values() if "dlq_events_dropped_total" in r["expr"]]
        assert all(r["labels"]["severity"] == "critical" for r in drops)

    def test_prometheus_example_loads_the_rules_for_job_estat(self):
        config = _load_yaml(PROMETHEUS_CONFIG)
        assert "alerts.yml" in config["rule_files"]
        assert [j["job_name"] for j in config["scrape_configs"]] == ["estat"]
        for rule in alert_rules():
            assert 'job="estat"' in rule["expr"], rule["alert"]


# --- promtool ----------------------------------------------------------------


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool!r} is not on PATH: install Debian's 'prometheus' package "
                    f"(apt-get install -y prometheus) to run this test")
    return path


def _run(argv: list, cwd: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


class TestPromtool:
    def test_check_rules(self):
        promtool = _require("promtool")
        result = _run([promtool, "check", "rules", ALERTS], PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests(self):
        promtool = _require("promtool")
        tested = {t["alertname"] for case in _load_yaml(ALERTS_TEST)["tests"]
                  for t in case.get("alert_rule_test", ())}
        assert {"EstatDeadLetterDrops", "EstatQueueFullRejections"} <= tested
        result = _run([promtool, "test", "rules", ALERTS_TEST], PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_check_config(self):
        promtool = _require("promtool")
        result = _run([promtool, "check", "config", PROMETHEUS_CONFIG], PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_dashboard_expressions_parse(self, tmp_path):
        """
        Each dashboard query, made a recording rule, passes C{promtool
        check rules}: they are all valid PromQL.
        """
        promtool = _require("promtool")
        rules = [{"record": f"estat:dashboard_query_{i}", "expr": grafana_to_promql(e)}
                 for i, e in enumerate(dashboard_exprs())]
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = _run([promtool, "check", "rules", str(path)], str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a real estat ----------------------------------


def _prometheus_api(port: int, path: str, **params) -> dict:
    url = f"http://{LOOPBACK}:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error
        return json.load(e)


def _health_check_argv(argv: list) -> list:
    """
    A container health check's command, run with this Python.
    """
    if argv and argv[0] == "CMD":
        argv = argv[1:]
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


@pytest.mark.e2e
def test_real_prometheus_scrapes_real_estat(tmp_path):
    """
    Prometheus (Debian's) scrapes C{twistd estat} every second; every seed
    metric reaches it, C{http_requests_accepted_total} equals the events
    posted, the alert rules load and evaluate without error, and every
    dashboard query runs.  The Dockerfile's and the task definition's
    health checks pass against the live server.
    """
    prometheus = _require("prometheus")
    posted = 5
    (tmp_path / "estat").mkdir()
    estat = EstatProcess({"FLUSH_INTERVAL": "1s"}, directory=str(tmp_path / "estat"))
    server = None
    log = None
    try:
        estat.wait_ready()
        for n in range(posted):
            status, body = estat.post({"event": "deploy_test", "n": n})
            assert status == 202, body

        for argv in (dockerfile_healthcheck(),
                     task_definition()["containerDefinitions"][0]["healthCheck"]["command"]):
            result = subprocess.run(
                _health_check_argv(argv), env={**os.environ, "HTTP_ADDR": f"{LOOPBACK}:{estat.port}"},
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
            assert result.returncode == 0, (argv, result.stderr)

        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [ALERTS],
            "scrape_configs": [{"job_name": "estat", "scrape_interval": "1s",
                                "static_configs": [{"targets": [f"{LOOPBACK}:{estat.port}"]}]}],
        }
        config_path = tmp_path / "prom.yml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / "prometheus.log"
        log = open(log_path, "wb")
        server = subprocess.Popen(
            [prometheus, f"--config.file={config_path}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={LOOPBACK}:{port}"],
            cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        def ready():
            if server.poll() is not None:
                raise AssertionError(f"prometheus exited {server.returncode}:\n{log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, 30, 0.2, lambda: f"prometheus to be ready:\n{log_tail()}")

        def value(query: str):
            answer = _prometheus_api(port, "/api/v1/query", query=query)
            assert answer["status"] == "success", answer
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        missing = list(SEED_METRIC_NAMES)

        def all_seed_metrics_present():
            missing[:] = [m for m in SEED_METRIC_NAMES
                          if value(f'{m}{{job="estat"}}') is None]
            return not missing

        wait_until(all_seed_metrics_present, 30, 0.5,
                   lambda: f"seed metrics in Prometheus; missing {missing}:\n{log_tail()}")
        wait_until(lambda: value('http_requests_accepted_total{job="estat"}') == posted, 15, 0.5,
                   lambda: "http_requests_accepted_total == "
                           f"{posted}, got {value('http_requests_accepted_total')}")
        assert value('up{job="estat"}') == 1
        # FLUSH_INTERVAL=1s: the events are stored in the local directory store.
        wait_until(lambda: value('s3_events_stored_total{job="estat"}') == posted, 15, 0.5,
                   "s3_events_stored_total to reach the events posted")

        def rules_evaluated():
            groups = _prometheus_api(port, "/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            # A rule not yet evaluated reports Go's zero time, 0001-01-01.
            if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
                return rules
            return None

        rules = wait_until(rules_evaluated, 15, 0.5, "every alert rule to be evaluated")
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert [r for r in rules if r["health"] != "ok"] == []
        # A healthy server with no failure: nothing fires.
        assert [r["name"] for r in rules if r["state"] == "firing"] == []

        for expr in dashboard_exprs():
            answer = _prometheus_api(port, "/api/v1/query", query=grafana_to_promql(expr))
            assert answer["status"] == "success", (expr, answer)
    finally:
        if server is not None:
            stop_process(server, 15)
        if log is not None:
            log.close()
        estat.stop()


# --- the Dockerfile ------------------------------------------------------------


def dockerfile_instructions() -> list:
    """
    C{[(INSTRUCTION, arguments)]}, continuation lines joined, comments and
    parser directives left out.
    """
    instructions, current = [], ""
    for line in _read(DOCKERFILE).splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _final_stage(instructions: list) -> list:
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    return instructions[starts[-1]:]


def _exec_form(arguments: str) -> list:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), arguments
    return value


def _env_pairs(arguments: str) -> dict:
    return dict(part.split("=", 1) for part in shlex.split(arguments))


def dockerfile_env() -> dict:
    env = {}
    for keyword, arguments in _final_stage(dockerfile_instructions()):
        if keyword == "ENV":
            env.update(_env_pairs(arguments))
    return env


def dockerfile_healthcheck() -> list:
    [arguments] = [a for k, a in _final_stage(dockerfile_instructions()) if k == "HEALTHCHECK"]
    _, _, command = arguments.partition("CMD ")
    return _exec_form(command)


def _port(http_addr: str) -> int:
    return int(http_addr.rsplit(":", 1)[-1])


class TestDockerfile:
    def test_base_images_are_pinned_to_a_patch_version(self):
        instructions = dockerfile_instructions()
        args = {}
        stages = set()
        images = []
        for keyword, arguments in instructions:
            if keyword == "ARG" and "=" in arguments:
                name, default = arguments.split("=", 1)
                args[name] = default
            elif keyword == "FROM":
                words = arguments.split()
                image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                               lambda m: args[m.group(1) or m.group(2)], words[0])
                if image not in stages:
                    images.append(image)
                if len(words) == 3 and words[1].upper() == "AS":
                    stages.add(words[2])
        assert images
        for image in images:
            name, _, tag = image.partition("@")[0].rpartition(":")
            assert name and tag and tag != "latest", image
            # python:3.11 or python:3.11-slim float; python:3.11.11-slim-bookworm does not.
            assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag is not a specific version"

    def test_runs_as_a_non_root_user(self):
        users = [a for k, a in _final_stage(dockerfile_instructions()) if k == "USER"]
        assert users, "the final stage has no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), user

    def test_stops_on_sigterm(self):
        signals = [a for k, a in dockerfile_instructions() if k == "STOPSIGNAL"]
        assert signals == ["SIGTERM"]

    def test_health_check_uses_python_not_curl(self):
        command = dockerfile_healthcheck()
        text = " ".join(command)
        assert command[0] == "python", command
        assert "curl" not in text and "wget" not in text, command

    def test_entrypoint_runs_twistd_in_the_foreground_in_exec_form(self):
        stage = _final_stage(dockerfile_instructions())
        entrypoint = [_exec_form(a) for k, a in stage if k == "ENTRYPOINT"]
        cmd = [_exec_form(a) for k, a in stage if k == "CMD"]
        # Exec form: twistd is PID 1 and gets the SIGTERM itself.
        argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
        assert argv[0] == "twistd", argv
        assert "--nodaemon" in argv or "-n" in argv, argv
        assert "--pidfile=" in argv, argv
        assert argv[-1] == "estat", argv

    def test_exposes_the_default_http_port(self):
        exposed = [a for k, a in _final_stage(dockerfile_instructions()) if k == "EXPOSE"]
        default_port = _port(SETTINGS_BY_ENV["HTTP_ADDR"].default)
        assert [int(p.split("/")[0]) for e in exposed for p in e.split()] == [default_port]
        assert _port(dockerfile_env().get("HTTP_ADDR", ":%d" % default_port)) == default_port

    def test_dlq_dir_is_a_volume(self):
        stage = _final_stage(dockerfile_instructions())
        volumes = []
        for keyword, arguments in stage:
            if keyword == "VOLUME":
                volumes.extend(_exec_form(arguments) if arguments.startswith("[")
                               else arguments.split())
        assert dockerfile_env()["DLQ_DIR"] in volumes


# --- the ECS task definition and the IAM policy --------------------------------


def task_definition() -> dict:
    return _load_json(TASK_DEFINITION)


def _container() -> dict:
    [container] = task_definition()["containerDefinitions"]
    return container


def task_environment() -> dict:
    """
    The container's environment: plain C{environment} entries and the
    C{secrets} ECS injects as environment variables (values are the
    secret's ARN here).
    """
    container = _container()
    names = [e["name"] for e in container.get("environment", ())] + \
            [s["name"] for s in container.get("secrets", ())]
    assert len(names) == len(set(names)), f"a variable is set twice: {sorted(names)}"
    env = {e["name"]: e["value"] for e in container.get("environment", ())}
    env.update({s["name"]: s["valueFrom"] for s in container.get("secrets", ())})
    return env


class TestTaskDefinition:
    def test_shape(self):
        td = task_definition()
        assert td["family"] == "estat"
        assert td["networkMode"] == "awsvpc"
        assert td["requiresCompatibilities"] == ["FARGATE"]
        assert (td["cpu"], td["memory"]) == ("512", "1024")
        assert td["runtimePlatform"] == {"cpuArchitecture": "X86_64",
                                         "operatingSystemFamily": "LINUX"}
        assert td["taskRoleArn"].startswith("arn:aws:iam::")
        assert td["executionRoleArn"].startswith("arn:aws:iam::")

    def test_environment_sets_every_setting_and_nothing_else(self):
        env = task_environment()
        settings = {s.env for s in SETTINGS}
        assert sorted(settings - set(env)) == [], "settings missing from the task definition"
        # estat ignores a misspelt name silently: refuse any that is not a setting.
        assert sorted(set(env) - settings) == [], "not Estat settings"

    def test_every_value_is_accepted_by_estat(self):
        env = {k: v for k, v in task_environment().items()
               if k not in {s["name"] for s in _container().get("secrets", ())}}
        config = load_config({}, env, {})
        assert config.log_format == "json"
        assert config.raw_bucket, "RAW_BUCKET is set: production stores in S3"

    def test_stop_timeout_exceeds_shutdown_timeout(self):
        env = task_environment()
        stop_timeout = _container()["stopTimeout"]
        assert parse_duration(env["SHUTDOWN_TIMEOUT"]) < stop_timeout <= 120  # Fargate's max

    def test_health_check_asks_readyz_without_curl(self):
        command = _container()["healthCheck"]["command"]
        assert command[0] == "CMD"
        text = " ".join(command)
        assert "/readyz" in text
        assert "curl" not in text and "wget" not in text

    def test_port_matches_http_addr(self):
        [mapping] = _container()["portMappings"]
        assert mapping["containerPort"] == _port(task_environment()["HTTP_ADDR"])
        assert mapping["protocol"] == "tcp"

    def test_ephemeral_storage_holds_the_dead_letter_queue(self):
        size_gib = task_definition()["ephemeralStorage"]["sizeInGiB"]
        assert 21 <= size_gib <= 200  # Fargate's range
        dlq_bytes = int(task_environment()["DLQ_MAX_SIZE_BYTES"])
        assert size_gib * GIB >= dlq_bytes + GIB, "no room left beside a full DLQ"

    def test_dlq_dir_is_a_mounted_volume(self):
        td = task_definition()
        dlq_dir = task_environment()["DLQ_DIR"]
        assert dlq_dir == dockerfile_env()["DLQ_DIR"]
        [mount] = [m for m in _container()["mountPoints"] if m["containerPath"] == dlq_dir]
        assert not mount.get("readOnly", False)
        assert mount["sourceVolume"] in {v["name"] for v in td["volumes"]}

    def test_logs_go_to_cloudwatch_as_json(self):
        log = _container()["logConfiguration"]
        assert log["logDriver"] == "awslogs"
        assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(log["options"])
        assert task_environment()["LOG_FORMAT"] == "json"


def _statements(policy: dict) -> set:
    """
    C{{(effect, action, resource)}} of a policy, lists flattened.
    """
    triples = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            for resource in [resources] if isinstance(resources, str) else resources:
                triples.add((statement["Effect"], action, resource))
    return triples


class TestIamPolicy:
    def test_least_privilege_for_the_task_definition_bucket_and_prefixes(self):
        env = task_environment()
        bucket, raw, dlq = env["RAW_BUCKET"], env["RAW_PREFIX"], env["DLQ_PREFIX"]
        segment = env["SEGMENT_PREFIX"]
        assert _statements(_load_json(IAM_POLICY)) == {
            ("Allow", "s3:PutObject", f"arn:aws:s3:::{bucket}/{raw}/*"),
            ("Allow", "s3:PutObject", f"arn:aws:s3:::{bucket}/{dlq}/*"),
            ("Allow", "s3:PutObject", f"arn:aws:s3:::{bucket}/{segment}/*"),
            ("Allow", "s3:ListBucket", f"arn:aws:s3:::{bucket}"),
        }

    def test_same_permissions_as_the_readme(self):
        readme = _read(README)
        block = re.search(r"IAM permissions for the task role:\s*```json\n(.*?)```", readme, re.S)
        assert block, "README's IAM policy block"
        assert _statements(json.loads(block.group(1))) == _statements(_load_json(IAM_POLICY))
