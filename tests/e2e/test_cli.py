"""The `sluice` command against the running stack, as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys

from sluice.stack import Stack


def sluice(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_generate_audit_trail_and_usage_as_json(stack: Stack) -> None:
    done = sluice(stack, "--json", "generate", "--max-tokens", "12", "Write a haiku about rivers")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert {"request_id", "delta", "finish_reason", "usage", "cost"} <= set(events[0])
    request_id = events[0]["request_id"]
    assert "".join(e["delta"] for e in events).strip()
    assert events[-1]["finish_reason"] in ("stop", "length")
    assert int(events[-1]["usage"]["completion_tokens"]) > 0
    assert int(events[-1]["cost"]["nanos"]) > 0

    for _ in range(60):
        trail = sluice(stack, "audit", "trail", request_id, "--json")
        if trail.returncode == 0 and len(json.loads(trail.stdout)["records"]) == 5:
            break
    body = json.loads(trail.stdout)
    assert [r["stage"] for r in body["records"]] == [
        "received",
        "redacted",
        "assembled",
        "completed",
        "charged",
    ]
    assert body["chain_valid"] is True

    usage = sluice(stack, "usage", "--json")
    assert usage.returncode == 0, usage.stderr
    rows = json.loads(usage.stdout)["rows"]
    demo = [r for r in rows if r["tenant"] == "demo"]
    assert demo and int(demo[0]["requests"]) >= 1 and int(demo[0]["cost"]["nanos"]) > 0


def test_generate_prints_text_then_request_id_usage_and_cost(stack: Stack) -> None:
    done = sluice(stack, "generate", "--max-tokens", "10", "Name a river.")
    assert done.returncode == 0, done.stderr
    assert "request_id: " in done.stdout
    assert "tokens: prompt " in done.stdout and "cost: " in done.stdout


def test_keys_demo_prints_the_key_the_gateway_accepts(stack: Stack) -> None:
    done = sluice(stack, "keys", "demo")
    assert done.returncode == 0
    assert done.stdout.strip().startswith("sk-sluice-")
    as_json = json.loads(sluice(stack, "--json", "keys", "demo").stdout)
    assert as_json["tenant"] == "demo" and as_json["api_key"] == done.stdout.strip()
    key_id = sluice(stack, "keys", "id").stdout.strip()
    assert as_json["key_id"] == key_id and done.stdout.strip().startswith(f"sk-sluice-{key_id}.")


def test_unknown_trail_is_a_clear_error(stack: Stack) -> None:
    done = sluice(stack, "audit", "trail", "no-such-request")
    assert done.returncode == 1
    assert "NOT_FOUND: request_id: no audit records for no-such-request" in done.stderr


def test_status_reports_every_service_serving(stack: Stack) -> None:
    done = sluice(stack, "--json", "status")
    rows = json.loads(done.stdout)
    for name in ("gateway", "redaction", "prompts", "inference", "metering", "audit"):
        assert rows[name].startswith("serving"), rows
