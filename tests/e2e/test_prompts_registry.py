"""Versioned templates through the real stack: labels, live rollback, A/B arms, bad input.

Real Kafka (sluice.templates.v1), the real prompts service and the rest of the
pipeline with the real model; the audit trail is the witness.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from services.gateway.auth import demo_key_file
from sluice import topics
from sluice.stack import Stack
from sluice.v1 import (
    envelope_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    prompts_pb2,
    prompts_pb2_grpc,
    templates_pb2,
)
from tests.e2e.test_request_path import _all_values, trail

SCHEMA = json.dumps(
    {
        "type": "object",
        "required": ["product", "question"],
        "properties": {"product": {"type": "string", "maxLength": 40}, "question": {"type": "string"}},
        "additionalProperties": False,
    }
)
VARIABLES = {"product": "Sluice", "question": "What is a river?"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def prompts(stack: Stack) -> Iterator[prompts_pb2_grpc.PromptsStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("prompts")) as channel:
        yield prompts_pb2_grpc.PromptsStub(channel)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


def create(
    prompts: prompts_pb2_grpc.PromptsStub,
    name: str,
    system: str,
    user: str = "{{ question }}",
    **fields: object,
) -> templates_pb2.TemplateVersion:
    request = prompts_pb2.CreateVersionRequest(
        name=name,
        messages=[
            envelope_pb2.ChatMessage(role="system", content=system),
            envelope_pb2.ChatMessage(role="user", content=user),
        ],
        author="e2e",
        **fields,  # type: ignore[arg-type]
    )
    return prompts.CreateVersion(request, timeout=30).version


def label(prompts: prompts_pb2_grpc.PromptsStub, name: str, label_name: str, *arms: tuple[int, int]) -> None:
    prompts.SetLabel(
        prompts_pb2.SetLabelRequest(
            name=name,
            label=label_name,
            variants=[templates_pb2.Variant(version=v, weight=w) for v, w in arms],
        ),
        timeout=30,
    )


def generate(
    gateway: gateway_pb2_grpc.GatewayStub, key: str, ref: templates_pb2.TemplateRef, **fields: object
) -> list[gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(template=ref, max_tokens=4, temperature=0.0, **fields)  # type: ignore[arg-type]
    return list(gateway.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=180))


def assembled(stack: Stack, request_id: str) -> dict[str, str]:
    records = trail(stack, request_id, stages=3).records
    return dict(next(r for r in records if r.stage == "assembled").details)


def failure(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_label_moves_switch_the_version_live_and_the_audit_trail_records_it(
    stack: Stack, prompts: prompts_pb2_grpc.PromptsStub, gateway: gateway_pb2_grpc.GatewayStub, key: str
) -> None:
    name = unique("support")
    v1 = create(prompts, name, "Answer in one word about {{ product }}.", variables_schema=SCHEMA)
    v2 = create(
        prompts, name, "Answer politely about {{ product }}.", variables_schema=SCHEMA, note="politer"
    )
    assert (v1.version, v2.version) == (1, 2)
    label(prompts, name, "production", (2, 100))

    ref = templates_pb2.TemplateRef(name=name, label="production")
    first = generate(gateway, key, ref, variables=VARIABLES)
    details = assembled(stack, first[0].request_id)
    assert details["template_name"] == name
    assert (details["template_version"], details["template_label"]) == ("2", "production")
    assert first[-1].usage.completion_tokens > 0

    label(prompts, name, "production", (1, 100))  # roll back: no restart
    again = generate(gateway, key, ref, variables=VARIABLES)
    assert assembled(stack, again[0].request_id)["template_version"] == "1"

    pinned = generate(gateway, key, templates_pb2.TemplateRef(name=name, version=2), variables=VARIABLES)
    assert assembled(stack, pinned[0].request_id)["template_version"] == "2"


def test_registry_reads_back_versions_labels_and_dry_runs(prompts: prompts_pb2_grpc.PromptsStub) -> None:
    name = unique("faq")
    create(prompts, name, "v1 about {{ product }}", variables_schema=SCHEMA)
    create(prompts, name, "v2 about {{ product }}", variables_schema=SCHEMA, note="second")
    label(prompts, name, "staging", (2, 100))

    got = prompts.GetTemplate(
        prompts_pb2.GetTemplateRequest(ref=templates_pb2.TemplateRef(name=name, label="staging"))
    )
    assert (got.version.version, got.version.note, list(got.labels)) == (2, "second", ["staging"])
    listed = {t.name: t for t in prompts.ListTemplates(prompts_pb2.ListTemplatesRequest()).templates}
    assert listed[name].latest_version == 2
    versions = prompts.ListVersions(prompts_pb2.ListVersionsRequest(name=name))
    assert [v.version for v in versions.versions] == [1, 2]
    assert [(p.label, p.variants[0].version) for p in versions.labels] == [("staging", 2)]

    rendered = prompts.Render(
        prompts_pb2.RenderRequest(
            template=templates_pb2.TemplateRef(name=name, version=1),
            variables=VARIABLES,
            context=["The Rhine is a river."],
        )
    )
    assert rendered.prompt.startswith("<|im_start|>system\nv1 about Sluice")
    assert rendered.template_used.version == 1 and rendered.prompt_tokens > 10
    assert [m.role for m in rendered.messages] == ["system", "user"]


def test_a_50_50_experiment_splits_200_users_and_stays_sticky(
    stack: Stack, prompts: prompts_pb2_grpc.PromptsStub, gateway: gateway_pb2_grpc.GatewayStub, key: str
) -> None:
    name = unique("exp")
    create(prompts, name, "Arm A about {{ product }}", variables_schema=SCHEMA)
    create(prompts, name, "Arm B about {{ product }}", variables_schema=SCHEMA)
    label(prompts, name, "production", (1, 50), (2, 50))
    ref = templates_pb2.TemplateRef(name=name)

    def arm(user: str) -> str:
        request = prompts_pb2.RenderRequest(template=ref, variables=VARIABLES, tenant="demo", user=user)
        return prompts.Render(request).template_used.variant

    users = [f"u-synthetic-{i:03d}" for i in range(200)]
    first = [arm(u) for u in users]
    counts = Counter(first)
    assert set(counts) == {"v1", "v2"}
    assert 80 <= counts["v1"] <= 120, counts
    assert [arm(u) for u in users] == first

    # Through the real pipeline: each user keeps their arm, and every event records it.
    for user in ("alice@example.com", "bob@example.com"):
        seen = set()
        for _ in range(2):
            request_id = generate(gateway, key, ref, variables=VARIABLES, user=user)[0].request_id
            details = assembled(stack, request_id)
            assert details["template_variant"] == f"v{details['template_version']}"
            seen.add(details["template_variant"])
        assert len(seen) == 1


def test_create_version_refuses_syntax_errors_and_sandbox_escapes(
    stack: Stack, prompts: prompts_pb2_grpc.PromptsStub
) -> None:
    name = unique("bad")
    error = failure(lambda: create(prompts, name, "fine", user="line one\n{% endfor %}"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("messages[1].content: template syntax error on line 2")

    error = failure(lambda: create(prompts, name, "{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("messages[0].content: refused by the sandbox")
    audit_id = error.details().rsplit("(audited as ", 1)[1].rstrip(")")
    record = trail(stack, audit_id, stages=1).records[0]
    assert record.stage == "dead_lettered" and "refused by the sandbox" in record.details["reason"]

    error = failure(lambda: create(prompts, name, "x", variables_schema="{oops"))
    assert error.details().startswith("variables_schema: not valid JSON")
    error = failure(lambda: label(prompts, name, "production", (1, 100)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_template_version_or_label_is_not_found(prompts: prompts_pb2_grpc.PromptsStub) -> None:
    name = unique("known")
    create(prompts, name, "hello {{ product }}")
    for ref, start in [
        (templates_pb2.TemplateRef(name=unique("missing")), "template.name: no template named"),
        (templates_pb2.TemplateRef(name=name, version=9), f"template.version: {name} has no version 9"),
        (
            templates_pb2.TemplateRef(name=name, label="canary"),
            f"template.label: {name} has no label 'canary'",
        ),
    ]:
        error = failure(lambda ref=ref: prompts.Render(prompts_pb2.RenderRequest(template=ref)))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith(start)


def _dead_letter_reason(stack: Stack, request_id: str) -> str:
    records = trail(stack, request_id, stages=3).records
    letters = [r for r in records if r.stage == "dead_lettered"]
    assert letters, [r.stage for r in records]
    return letters[0].details["reason"]


def failing_generate(
    gateway: gateway_pb2_grpc.GatewayStub, key: str, ref: templates_pb2.TemplateRef, **fields: object
) -> tuple[str, grpc.RpcError]:
    """The request_id (first response) and the error that ends the stream."""
    request = gateway_pb2.GenerateRequest(template=ref, max_tokens=4, **fields)  # type: ignore[arg-type]
    stream = gateway.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=180)
    request_id = ""
    with pytest.raises(grpc.RpcError) as caught:
        for response in stream:
            request_id = request_id or response.request_id
    return request_id, caught.value


def test_bad_requests_fail_with_the_field_named_and_are_audited(
    stack: Stack, prompts: prompts_pb2_grpc.PromptsStub, gateway: gateway_pb2_grpc.GatewayStub, key: str
) -> None:
    name = unique("strict")
    create(
        prompts,
        name,
        "About {{ product }}.{% for d in documents %} {{ d }}{% endfor %}",
        variables_schema=SCHEMA,
    )
    sneaky = unique("sneaky")
    create(prompts, sneaky, "{{ documents.append('x') }}")
    ref = templates_pb2.TemplateRef(name=name, version=1)

    _, error = failing_generate(gateway, key, ref, variables={"product": "x" * 50, "extra": "1"})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "variables.question: is required" in error.details()
    assert "variables.product: must satisfy maxLength 40" in error.details()
    assert "'extra' was unexpected" in error.details()

    escaped, error = failing_generate(
        gateway, key, templates_pb2.TemplateRef(name=sneaky, version=1), context=["d"]
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused by the sandbox" in error.details()

    misfit, error = failing_generate(
        gateway, key, ref, variables={"product": "p", "question": "river " * 2100}
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("prompt: ")

    _, error = failing_generate(gateway, key, templates_pb2.TemplateRef(name=unique("ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("template.name:")

    assert "refused by the sandbox" in _dead_letter_reason(stack, escaped)
    assert _dead_letter_reason(stack, misfit).startswith("prompt: ")


def test_variables_and_context_documents_are_redacted_before_prompts(
    stack: Stack, prompts: prompts_pb2_grpc.PromptsStub, gateway: gateway_pb2_grpc.GatewayStub, key: str
) -> None:
    name = unique("pii")
    create(prompts, name, "Docs:{% for d in documents %} {{ d }}{% endfor %}", user="{{ question }}")
    email, phone = "rosa.planted.var@example.com", "415-555-0177"
    request_id = generate(
        gateway,
        key,
        templates_pb2.TemplateRef(name=name, version=1),
        variables={"question": f"Write to {email} please"},
        context=[f"The customer phone is {phone}."],
    )[0].request_id
    assert assembled(stack, request_id)["template_name"] == name
    for topic in (topics.REDACTED, topics.PROMPTS):
        values = b"".join(asyncio.run(_all_values(stack.settings.bootstrap, topic, 6)))
        assert email.encode() not in values and phone.encode() not in values, topic
    prompts_values = b"".join(asyncio.run(_all_values(stack.settings.bootstrap, topics.PROMPTS, 6)))
    assert b"Write to " in prompts_values and b"The customer phone is " in prompts_values
