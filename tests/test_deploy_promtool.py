"""Prometheus rules and the Grafana dashboard, checked by the real promtool: the rule file parses
(`promtool check rules`), its unit tests pass (`promtool test rules`), every dashboard query and the
Prometheus-adapter query parse as PromQL, and every metric they read is one the server or vLLM exports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_tools import (
    ADAPTER_VALUES_FILE,
    DASHBOARD_FILE,
    OBSERVABILITY_DIR,
    PROMETHEUS_JOB,
    RULES_FILE,
    RULES_TEST_FILE,
    dashboard_exprs,
    load_rule_groups,
    render_adapter_metrics_query,
    require_tool,
    run_tool,
    selectors,
)

PROMTOOL_HINT = "apt-get install prometheus (Debian's package ships promtool)"
DASHBOARD_METRICS = {
    "prosocial_requests_total",
    "prosocial_request_latency_seconds_bucket",
    "prosocial_guided_requests_total",
    "prosocial_masked_tokens_total",
    "prosocial_arm_forward_seconds_bucket",
    "prosocial_arm_batch_size_bucket",
    "prosocial_engine_healthy",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
}
RULE_METRICS = {
    "prosocial_requests_total",
    "prosocial_request_latency_seconds_bucket",
    "up",
    "prosocial_engine_healthy",
    "prosocial_guidance_failures_total",
    "prosocial_masked_tokens_total",
}


def promtool() -> str:
    return require_tool("promtool", PROMTOOL_HINT)


def all_rules() -> list[dict]:
    return [rule for group in load_rule_groups() for rule in group["rules"]]


def prosocial_series_names() -> set[str]:
    """Series names the server's registry exposes (counters get _total, histograms _bucket/_sum/_count)."""
    from prometheus_client import Counter, Gauge, Histogram

    from server import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, Histogram):
            names.update(value._name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def vllm_metric_names() -> set[str]:
    """Names vLLM's Prometheus stat logger registers, read from the installed vLLM's source."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    return set(re.findall(r'name="(vllm:[a-z_:]+)"', source))


def test_rule_file_passes_promtool_check() -> None:
    result = run_tool([promtool(), "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = run_tool([promtool(), "test", "rules", RULES_TEST_FILE.name], cwd=RULES_TEST_FILE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    tested = {case["alertname"] for group in tests for case in group.get("alert_rule_test", [])}
    alerts = {rule["alert"] for rule in all_rules() if "alert" in rule}
    assert alerts <= tested, f"alerts without a promtool unit test: {alerts - tested}"
    firing = {
        case["alertname"]
        for group in tests
        for case in group.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts <= firing, f"alerts never shown to fire: {alerts - firing}"


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check is live: a rule with a PromQL syntax error fails it."""
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert run_tool([promtool(), "check", "rules", str(broken)]).returncode != 0


def test_operator_rule_matches_the_rule_file() -> None:
    operator_rule = yaml.safe_load((OBSERVABILITY_DIR / "prometheusrule.yaml").read_text())
    assert operator_rule["spec"]["groups"] == load_rule_groups()


def test_dashboard_and_adapter_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana variables expanded) and the adapter's HPA query."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [expr for _title, expr in dashboard_exprs(dashboard)]
    adapter_rule = yaml.safe_load(ADAPTER_VALUES_FILE.read_text())["rules"]["custom"][0]
    exprs.append(render_adapter_metrics_query(adapter_rule, 'namespace="prosocial",pod=~"a|b"', "pod"))
    rules = [{"record": f"check:query_{index}:value", "expr": expr} for index, expr in enumerate(exprs)]
    query_file = tmp_path / "queries.rules.yaml"
    query_file.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run_tool([promtool(), "check", "rules", str(query_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_the_required_metrics() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    used = set().union(*(selectors(expr) for _title, expr in dashboard_exprs(dashboard)))
    assert DASHBOARD_METRICS <= used, f"dashboard misses {DASHBOARD_METRICS - used}"
    assert dashboard["uid"] and len({panel["id"] for panel in dashboard["panels"]}) == len(
        dashboard["panels"]
    )
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "prosocial_engine_healthy" in variables["job"]["definition"]


def test_rules_cover_the_required_signals() -> None:
    used = set().union(*(selectors(rule["expr"]) for rule in all_rules()))
    assert RULE_METRICS <= used, f"rules miss {RULE_METRICS - used}"
    assert any('status=~"5.."' in rule["expr"] for rule in all_rules())
    assert any(f'up{{job="{PROMETHEUS_JOB}"}}' in rule["expr"] for rule in all_rules())
    for rule in all_rules():
        assert "vector(" not in rule["expr"], "no invented series: vector() would hide a missing server"


def test_every_metric_read_is_exported() -> None:
    """A misspelled metric makes a silent, empty panel: every name must exist in server/metrics.py or vLLM."""
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    exported = prosocial_series_names() | {"up"}
    vllm_names = vllm_metric_names()
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [rule["expr"] for rule in all_rules()] + [expr for _title, expr in dashboard_exprs(dashboard)]
    for name in set().union(*(selectors(expr) for expr in exprs)) - recorded:
        if name.startswith("vllm:"):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert base in vllm_names, f"{name} is not a vLLM metric"
        else:
            assert name in exported, f"{name} is not exported by server/metrics.py"


@pytest.mark.parametrize(
    "alert", [rule for rule in all_rules() if "alert" in rule], ids=lambda rule: rule["alert"]
)
def test_alerts_are_actionable(alert: dict) -> None:
    assert alert["labels"]["severity"] in {"critical", "warning"}
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert "for" in alert, "every alert waits before firing (probes and restarts cause short blips)"
