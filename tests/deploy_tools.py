"""Shared helpers of the deployment tests (tests/test_deploy_*.py): find the real tools, read the artifacts.

A missing tool skips its test on a developer machine, with the install command in the reason; under CI
(the ``CI`` environment variable set) a missing tool fails the test, so a green CI run always means the
artifacts were checked by the real tools.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
DEPLOY_DIR = REPO_ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
OBSERVABILITY_DIR = DEPLOY_DIR / "observability"
RULES_FILE = OBSERVABILITY_DIR / "prometheus" / "prosocialalign.rules.yaml"
RULES_TEST_FILE = OBSERVABILITY_DIR / "prometheus" / "prosocialalign.rules.test.yaml"
DASHBOARD_FILE = OBSERVABILITY_DIR / "grafana" / "prosocialalign-dashboard.json"
ADAPTER_VALUES_FILE = OBSERVABILITY_DIR / "prometheus-adapter-values.yaml"
PROMETHEUS_JOB = "prosocialalign"

# A name directly followed by a label matcher or a range: a series selector (functions are followed by "(").
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")

# Grafana's variables, replaced by what they expand to for one Prometheus job.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$job": PROMETHEUS_JOB}


def require_tool(name: str, install_hint: str) -> str:
    """Path of a command-line tool: the virtualenv's own first (PyPI-installed tools), then PATH."""
    venv_tool = Path(sys.executable).parent / name
    if venv_tool.is_file() and os.access(venv_tool, os.X_OK):
        return str(venv_tool)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found in the virtualenv or on PATH; install it with: {install_hint}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: deployment checks must run, not skip)")
    pytest.skip(message)


def run_tool(
    args: list[str], cwd: Path | None = None, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def load_yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def load_rule_groups() -> list[dict]:
    return yaml.safe_load(RULES_FILE.read_text())["groups"]


def selectors(expr: str) -> set[str]:
    """Series names a PromQL expression selects (as written in our rules: every selector has {} or [])."""
    return set(SELECTOR.findall(expr))


def grafana_expr_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target in the dashboard, Grafana variables expanded."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], grafana_expr_to_promql(target["expr"])))
    return found


def render_adapter_metrics_query(rule: dict, label_matchers: str, group_by: str) -> str:
    """The PromQL the Prometheus adapter sends for one custom metric (its Go template, filled in)."""
    series = rule["name"]["matches"].strip("^$")
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", group_by)
    )
