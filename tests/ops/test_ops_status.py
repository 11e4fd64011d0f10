"""`sluice status` and the metrics behind it, against the real six-service stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from sluice.ports import free_ports
from sluice.stack import Stack

PLANTED = "status.probe.4471@example.org"


def sluice(stack: Stack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        env=env or stack.child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def metrics(stack: Stack, service: str) -> str:
    url = f"http://{stack.settings.host}:{stack.settings.metrics_port(service)}/metrics"  # type: ignore[arg-type]
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def eventually(check, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


@pytest.mark.timeout(1200)  # the stack fixture starts six services on a shared machine first
def test_status_snapshot_shows_health_lag_traffic_ttft_and_spend(stack: Stack) -> None:
    done = sluice(stack, "generate", "--max-tokens", "8", f"Say hi to {PLANTED}")
    assert done.returncode == 0, done.stderr

    def snapshot() -> dict | None:  # type: ignore[type-arg]
        result = sluice(stack, "--json", "status", "--interval", "0.5")
        body = json.loads(result.stdout)
        return body if body["spend_today"].get("demo") else None

    body = eventually(snapshot)
    assert body, "no spend for tenant demo appeared"
    for name in ("gateway", "redaction", "prompts", "inference", "metering", "audit"):
        assert body[name].startswith("serving"), body
    assert body["problems"] == []
    assert body["requests_total"] >= 1 and body["requests_per_s"] is not None
    assert 0 < body["ttft_p50_s"] <= body["ttft_p99_s"]
    assert body["spend_today"]["demo"]["USD"] > 0
    lag = body["consumer_lag"]
    assert "sluice-redaction/sluice.requests.v1" in lag
    assert all(isinstance(v, int) and v >= 0 for v in lag.values())
    assert PLANTED not in json.dumps(body)

    text = sluice(stack, "status", "--once", "--interval", "0.5")
    assert text.returncode == 0, text.stderr
    for heading in ("services", "consumer lag", "spend today", "TTFT p50", "requests/s"):
        assert heading in text.stdout, text.stdout


def test_services_export_request_codes_first_token_and_lag(stack: Stack) -> None:
    rejected = sluice(stack, "generate", "--max-tokens", "0", "hello")
    assert rejected.returncode == 1 and "INVALID_ARGUMENT" in rejected.stderr
    gateway = metrics(stack, "gateway")
    generate = 'method="sluice.v1.Gateway/Generate"'
    assert f'sluice_grpc_requests_total{{code="INVALID_ARGUMENT",{generate},service="gateway"}}' in gateway
    assert f'sluice_grpc_requests_total{{code="OK",{generate},service="gateway"}}' in gateway
    assert "sluice_grpc_time_to_first_token_seconds_count" in gateway
    # Each service exports its own groups' lag (refreshed every 15 s).
    lagging = eventually(
        lambda: 'sluice_consumer_lag{group="sluice-redaction"' in metrics(stack, "redaction")
    )
    assert lagging, metrics(stack, "redaction")
    # Exported either way: the session stack's chain may already be broken on purpose by the
    # audit tampering tests (tests/audit/test_audit_store.py checks the value itself).
    assert eventually(lambda: re.search(r"^sluice_audit_chain_valid [01]\.0$", metrics(stack, "audit"), re.M))
    assert 'sluice_redaction_entities_total{entity_type="EMAIL_ADDRESS"}' in metrics(stack, "redaction")
    assert 'sluice_cost_total{currency="USD",model=' in metrics(stack, "metering")
    for service in ("gateway", "redaction", "metering", "audit"):
        assert PLANTED not in metrics(stack, service)


def test_status_of_a_stack_that_is_not_running_says_so(stack: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = stack.child_env()
    env["SLUICE_STATE_DIR"] = str(tmp_path)
    for name, port in zip(
        ("GATEWAY", "REDACTION", "PROMPTS", "INFERENCE", "METERING", "AUDIT"), free_ports(6), strict=True
    ):
        env[f"SLUICE_{name}_PORT"] = str(port)
    done = sluice(stack, "--json", "status", "--interval", "0.1", env=env)
    assert done.returncode == 3, done.stderr
    body = json.loads(done.stdout)
    assert body["gateway"] == "stopped" and body["audit"] == "stopped"
    assert any(p.startswith("gateway metrics:") for p in body["problems"])
    assert any(p.startswith("spend today:") for p in body["problems"])
    # Kafka is up, so the lag of the real stack's groups is still shown.
    assert "sluice-redaction/sluice.requests.v1" in body["consumer_lag"]
