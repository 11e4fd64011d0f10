"""SLO rules and the dashboard: the rules parse and behave (promtool), and every metric
they and the dashboard use is one the services register, with the labels used."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services
import sluice
import streams
from sluice.config import REPO_ROOT
from tests.ops.conftest import run

# The first run builds the Go tools (go install; minutes on a busy machine): allow for it.
pytestmark = pytest.mark.timeout(3600)
RULES = REPO_ROOT / "monitoring" / "prometheus" / "sluice-rules.yaml"
RULE_TESTS = REPO_ROOT / "monitoring" / "prometheus" / "sluice-rules.test.yaml"
DASHBOARD = REPO_ROOT / "monitoring" / "grafana" / "sluice-overview.json"
# Series Prometheus makes itself, not the services.
PROMETHEUS_SERIES = {"up"}
SELECTOR = re.compile(r"\b(sluice_[a-z0-9_]+)(\{([^}]*)\})?")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name the code can export -> its label names (all modules imported)."""
    for package in (sluice, services, streams):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.startswith("sluice.v1"):
                importlib.import_module(module.name)
    names: dict[str, set[str]] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        names[name] = set(getattr(collector, "_labelnames", ()))
    return names


def test_rules_pass_promtool_check(promtool: Path) -> None:
    done = run(promtool, "check", "rules", RULES)
    assert "SUCCESS" in done.stdout + done.stderr


def test_alerts_fire_when_they_should_and_not_otherwise(promtool: Path) -> None:
    run(promtool, "test", "rules", RULE_TESTS)


def test_promtool_rejects_a_broken_rule(promtool: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m]) > \n")
    assert run(promtool, "check", "rules", bad, check=False).returncode != 0


def test_every_slo_of_the_issue_has_an_alert() -> None:
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    slos = {rule["labels"].get("slo") for rule in alerts.values()}
    assert {"availability", "error-rate", "ttft", "lag", "audit", "budget"} <= slos
    for name in ("SluiceAuditChainBroken", "SluiceAuditCompletenessGaps", "SluiceHardBudgetReached"):
        assert name in alerts
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"page", "ticket", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def _check_metrics(exprs: list[str], exported: dict[str, set[str]], records: set[str]) -> list[str]:
    problems = []
    for expr in exprs:
        for used in re.findall(r"\b(sluice:[a-z0-9_:]+)", expr):
            if used not in records:
                problems.append(f"{used}: no recording rule defines it")
        for match in SELECTOR.finditer(expr):
            series, labels = match.group(1), match.group(3) or ""
            family = re.sub(r"_(bucket|sum|count|total|created)$", "", series)
            known = exported.get(series) if series in exported else exported.get(family)
            if known is None:
                problems.append(f"{series}: not registered by any module")
                continue
            extra = set(LABEL.findall(labels)) - known - {"le"}
            if extra:
                problems.append(f"{series}: labels {sorted(extra)} not among {sorted(known)}")
        for word in re.findall(r"\b([a-z_]+)\{", expr):
            if not word.startswith("sluice_") and word not in PROMETHEUS_SERIES:
                problems.append(f"{word}: not a Sluice metric")
    return problems


def test_rules_use_only_exported_metrics_and_labels(exported: dict[str, set[str]]) -> None:
    rules = _rules()
    records = {rule["record"] for rule in rules if "record" in rule}
    assert _check_metrics([rule["expr"] for rule in rules], exported, records) == []


def test_dashboard_uses_only_exported_metrics_and_labels(exported: dict[str, set[str]]) -> None:
    records = {rule["record"] for rule in _rules() if "record" in rule}
    exprs = _dashboard_exprs()
    assert len(exprs) > 20
    assert _check_metrics(exprs, exported, records) == []


def test_the_metric_check_can_fail(exported: dict[str, set[str]]) -> None:
    problems = _check_metrics(
        ["sum(rate(sluice_nonexistent_total[5m]))", 'sluice_consumer_lag{tenant="x"}', "sluice:nothing"],
        exported,
        set(),
    )
    assert len(problems) == 3, problems


def test_dashboard_covers_the_issue_list() -> None:
    text = " ".join(_dashboard_exprs())
    for metric in (
        "sluice_grpc_requests_total",  # request rate, errors by status
        "sluice_grpc_time_to_first_token_seconds",  # time to first token
        "sluice_inference_time_per_output_token_seconds",
        "sluice_inference_output_tokens_total",  # tokens/s
        "sluice_inference_queue_wait_seconds",
        "sluice_consumer_lag",
        'outcome="dead_letter"',  # DLQ rate
        "sluice_redaction_entities_total",  # PII detections by type
        "sluice_cost_total",  # cost per tenant and model
        "sluice_budget_alerts_total",  # budget burn
        "sluice_audit_chain_valid",
        "sluice_audit_incomplete_requests",
    ):
        assert metric in text, metric


def test_every_exported_metric_has_the_sluice_prefix(exported: dict[str, set[str]]) -> None:
    ours = {
        name
        for name, collector in REGISTRY._names_to_collectors.items()
        if type(collector).__module__.startswith("prometheus_client.metrics")
    }
    assert {name for name in ours if not name.startswith("sluice_")} == set()
