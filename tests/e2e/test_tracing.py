"""One request yields one connected trace across all six services, with no content in it.

The session stack runs with SLUICE_TRACES_EXPORTER=file (tests/conftest.py), so each
service writes its spans as JSON lines under <state_dir>/traces/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc

from sluice.config import SERVICES
from sluice.stack import Stack
from tests.e2e.test_request_path import EMAIL, PHONE, ask, channel, key  # noqa: F401 - fixtures

ALL_SERVICES = {f"sluice-{name}" for name in SERVICES}


def spans(state_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in (state_dir / "traces").glob("*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                found.append(json.loads(line))
    return found


def trace_of(state_dir: Path, request_id: str, deadline_s: float = 90) -> list[dict[str, Any]]:
    """Every span of the request's trace, once all six services have reported theirs."""
    deadline = time.monotonic() + deadline_s
    while True:
        everything = spans(state_dir)
        ids = {
            s["context"]["trace_id"]
            for s in everything
            if s["attributes"].get("sluice.request_id") == request_id
        }
        assert len(ids) <= 1, f"request {request_id} is spread over {len(ids)} traces"
        mine = [s for s in everything if ids and s["context"]["trace_id"] in ids]
        services = {s["resource"]["attributes"]["service.name"] for s in mine}
        if services >= ALL_SERVICES or time.monotonic() > deadline:
            return mine
        time.sleep(0.5)


def test_one_request_is_one_connected_trace_through_every_service(
    stack: Stack,
    channel: grpc.Channel,  # noqa: F811 - the imported fixture
    key: str,  # noqa: F811
) -> None:
    responses = ask(channel, key, f"Mail me at {EMAIL} or call {PHONE}, then write a haiku", max_tokens=16)
    request_id = responses[0].request_id

    trace = trace_of(stack.settings.state_dir, request_id)

    services = {s["resource"]["attributes"]["service.name"] for s in trace}
    assert services >= ALL_SERVICES, f"missing spans from {sorted(ALL_SERVICES - services)}"
    span_ids = {s["context"]["span_id"] for s in trace}
    roots = [s for s in trace if s["parent_id"] is None]
    assert [r["resource"]["attributes"]["service.name"] for r in roots] == ["sluice-gateway"], roots
    orphans = [s["name"] for s in trace if s["parent_id"] is not None and s["parent_id"] not in span_ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    hops = {s["attributes"].get("messaging.destination.name") for s in trace}
    assert {"sluice.requests.v1", "sluice.redacted.v1", "sluice.prompts.v1", "sluice.completions.v1"} <= hops


def test_spans_carry_genai_usage_and_cost_but_never_content(
    stack: Stack,
    channel: grpc.Channel,  # noqa: F811
    key: str,  # noqa: F811
) -> None:
    responses = ask(channel, key, f"My email is {EMAIL} and my phone {PHONE}. Say hi.", max_tokens=12)
    request_id, usage = responses[0].request_id, responses[-1].usage
    trace = trace_of(stack.settings.state_dir, request_id)

    attributes = [s["attributes"] for s in trace]
    assert any(a.get("gen_ai.operation.name") == "chat" for a in attributes)
    assert any(a.get("gen_ai.request.model") == "smollm2-135m-instruct" for a in attributes)
    assert any(a.get("gen_ai.usage.output_tokens") == usage.completion_tokens for a in attributes)
    assert any(a.get("gen_ai.usage.input_tokens") == usage.prompt_tokens for a in attributes)
    assert any("sluice.cost.nanos" in a for a in attributes)

    for path in (stack.settings.state_dir / "traces").glob("*.jsonl"):
        exported = path.read_text(errors="replace")
        assert EMAIL not in exported and PHONE not in exported, f"raw PII in {path.name}"
