"""The dashboard and the rules against real data: a real Prometheus (Debian's binary, on loopback) scrapes the
real server while it answers guided and unguided requests, evaluates the recording and alerting rules itself,
and answers every dashboard query through its HTTP API with data.

Expressions that count rare events (5xx responses, guidance failures) are written to answer 0 rather than
nothing while the server is scraped (see deploy/observability/prometheus/prosocialalign.rules.yaml), so
"every query returns data" holds on a healthy server without `vector(0)`.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from deploy_tools import (
    ADAPTER_VALUES_FILE,
    DASHBOARD_FILE,
    PROMETHEUS_JOB,
    RULES_FILE,
    dashboard_exprs,
    load_rule_groups,
    render_adapter_metrics_query,
    require_tool,
    selectors,
)

from prosocialalign.core.launcher import free_port
from tests.support import start_server

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL = "1s"
PROMETHEUS_START_TIMEOUT_S = 60
DATA_TIMEOUT_S = 90
GUIDED_PREFS = {"empathy": 1.0}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def guided_server(live_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The session's live server when it runs with guidance; otherwise a guided one for this module."""
    if "--no-guidance" not in live_server.extra_args:
        yield live_server
        return
    server = start_server(tmp_path_factory.mktemp("prometheus_live"))
    try:
        yield server
    finally:
        server.stop()


class Prometheus:
    """A Prometheus server process and the query side of its HTTP API."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
            "rule_files": [str(RULES_FILE)],
            "scrape_configs": [
                {
                    "job_name": PROMETHEUS_JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prometheus not ready in {PROMETHEUS_START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str) -> object:
        response = httpx.get(self.url + path, params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def wait_for(self, expr: str, minimum: float) -> None:
        deadline = time.monotonic() + DATA_TIMEOUT_S
        value = float("nan")
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if value >= minimum:
                return
            time.sleep(1)
        raise AssertionError(f"{expr} stayed at {value} (< {minimum}) for {DATA_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def prometheus(guided_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = require_tool("prometheus", "apt-get install prometheus")
    target = urlparse(guided_server.base_url).netloc
    server = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), target)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def traffic(guided_server, prometheus: Prometheus) -> dict[str, int]:
    """Guided and unguided chat (plain and streamed) and a text completion, one at a time, so that the
    counters rise between scrapes; then wait until Prometheus has scraped all of it."""
    from openai import OpenAI

    client = OpenAI(base_url=guided_server.base_url + "/v1", api_key=guided_server.api_key, max_retries=0)
    messages = [{"role": "user", "content": "I had a rough day at work. Any advice?"}]
    counts = {"chat": 0, "guided": 0, "completions": 0}
    for guided in (False, True, False, True):
        extra = {"prosocial_prefs": GUIDED_PREFS} if guided else None
        reply = client.chat.completions.create(
            model=guided_server.model,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body=extra,
        )
        assert reply.choices[0].message.content is not None
        counts["chat"] += 1
        counts["guided"] += int(guided)
        time.sleep(1.5)
    stream = client.chat.completions.create(
        model=guided_server.model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"prosocial_prefs": GUIDED_PREFS},
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    counts["chat"] += 1
    counts["guided"] += 1
    completion = client.completions.create(
        model=guided_server.model, prompt="Kindness is", max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].text is not None
    counts["completions"] += 1

    job = f'job="{PROMETHEUS_JOB}"'
    prometheus.wait_for(
        f'sum(prosocial_requests_total{{{job}, endpoint="/v1/chat/completions"}})', counts["chat"]
    )
    prometheus.wait_for(f"sum(prosocial_guided_requests_total{{{job}}})", counts["guided"])
    prometheus.wait_for(f'sum(prosocial_requests_total{{{job}, endpoint="/v1/completions"}})', 1)
    # A few more scrapes and rule evaluations past the last request.
    time.sleep(5)
    return counts


def test_target_is_scraped(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    targets = prometheus.api("/api/v1/targets")["activeTargets"]
    assert [target["health"] for target in targets] == ["up"], targets


def test_every_dashboard_query_returns_data(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    empty = [f"{title}: {expr}" for title, expr in dashboard_exprs(dashboard) if not prometheus.query(expr)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_dashboard_job_variable_finds_the_job(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    values = prometheus.api("/api/v1/label/job/values", **{"match[]": "prosocial_engine_healthy"})
    assert PROMETHEUS_JOB in values


def test_dashboard_values_reflect_the_traffic(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    """Not just series: the numbers moved with what was sent."""
    job = f'job="{PROMETHEUS_JOB}"'
    assert (
        prometheus.scalar(
            f'sum(rate(prosocial_requests_total{{{job}, endpoint="/v1/chat/completions"}}[5m]))'
        )
        > 0
    )
    # Windowed rates of counters created mid-window are approximate (a new series' first increment is not a
    # rate), so compare the share loosely and the counters exactly. With the operator's safety mask on, every
    # request runs through the ARM and counts as guided.
    guided_share = prometheus.scalar(
        f"sum(rate(prosocial_guided_requests_total{{{job}}}[5m]))"
        f' / sum(rate(prosocial_requests_total{{{job}, endpoint=~"/v1/(chat/)?completions"}}[5m]))'
    )
    assert math.isfinite(guided_share) and guided_share > 0
    assert prometheus.scalar(f"sum(prosocial_guided_requests_total{{{job}}})") >= traffic["guided"]
    requests_total = traffic["chat"] + traffic["completions"]
    assert prometheus.scalar(f"sum(vllm:time_to_first_token_seconds_count{{{job}}})") >= requests_total
    assert prometheus.scalar(f"sum(prosocial_arm_forward_seconds_count{{{job}}})") > 0
    assert prometheus.scalar(f"sum(prosocial_arm_batch_size_count{{{job}}})") > 0
    ttft_p95 = prometheus.scalar(
        f"histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{job}}}[5m])))"
    )
    assert math.isfinite(ttft_p95) and ttft_p95 > 0
    assert prometheus.scalar(f"min(prosocial_engine_healthy{{{job}}})") == 1


def test_rules_evaluate_on_real_data(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    """Prometheus itself evaluated every rule without error; every recording rule has a value; no alert fires
    on a healthy server; every series an alert reads exists."""
    groups = prometheus.api("/api/v1/rules")["groups"]
    evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = [rule for group in load_rule_groups() for rule in group["rules"]]
    recorded = {rule["record"] for rule in expected if "record" in rule}
    problems = []
    for rule in expected:
        name = rule.get("record") or rule["alert"]
        state = evaluated.get(name)
        if state is None or state["health"] != "ok":
            problems.append(f"{name}: {state and (state['health'], state.get('lastError'))}")
            continue
        if "record" in rule and not prometheus.query(rule["record"]):
            problems.append(f"recording rule {name} has no value")
        if "alert" in rule:
            if state["state"] == "firing":
                problems.append(f"alert {name} fires on a healthy server: {state['alerts']}")
            for series in selectors(rule["expr"]) - recorded:
                if not prometheus.query(f"count({series})"):
                    problems.append(f"alert {name} reads {series}, which has no series")
    assert not problems, "\n".join(problems)


def test_autoscaling_query_returns_the_queue(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    """The query the Prometheus adapter sends for the HPA metric, here grouped by instance instead of pod."""
    rule = yaml.safe_load(ADAPTER_VALUES_FILE.read_text())["rules"]["custom"][0]
    expr = render_adapter_metrics_query(rule, f'job="{PROMETHEUS_JOB}"', "instance")
    result = prometheus.query(expr)
    assert len(result) == 1 and float(result[0]["value"][1]) >= 0
