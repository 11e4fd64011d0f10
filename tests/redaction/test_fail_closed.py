"""The boundary's consumer fails closed and refuses bad input, on real analysis (no mocks).

The handler is called as the consumer loop calls it; a RequestFailed or
BadEvent becomes a DLQ record and a StreamFailed for the caller there
(tests/integration covers that loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.redaction.analyzer import DeadlineExceeded, RedactionError, Redactor
from services.redaction.service import RedactionService
from services.redaction.vault import keyring_from_settings
from sluice import envelope as envelopes
from sluice.config import load_settings
from sluice.kafka import RequestFailed
from sluice.topics import REDACTED, BadEvent
from sluice.v1 import envelope_pb2, events_pb2, privacy_pb2

MIB = 1024 * 1024


def request(text: str, tenant: str = "demo", request_id: str = "r-1") -> events_pb2.GenerationRequested:
    return events_pb2.GenerationRequested(
        envelope=envelopes.new_envelope(request_id=request_id, tenant=tenant, producer="test"),
        model="smollm2-135m-instruct",
        messages=[envelope_pb2.ChatMessage(role="user", content=text)],
        params=events_pb2.GenerationParams(max_tokens=8),
        reply_to=envelope_pb2.ReplyTo(topic="sluice.tokens.v1", partition=0),
    )


def service(tmp_path: Path, redactor: Redactor | None, **settings: Any) -> RedactionService:
    made = RedactionService(load_settings(state_dir=tmp_path, **settings))
    if redactor is not None:
        made.boundary.loaded(redactor)
    return made


def handle(svc: RedactionService, event: events_pb2.GenerationRequested) -> Any:
    return asyncio.run(svc.handle(event, None))  # type: ignore[arg-type]


def adversarial(size: int) -> str:
    """Long digit runs and deeply nested brackets: worst cases for phone, card and NER matching."""
    unit = "1" * 400 + " " + "(" * 200 + "[{<4111 1111 1111 1111>}]" + ")" * 200 + " 555 0132 "
    return (unit * (size // len(unit) + 1))[:size]


@pytest.fixture(scope="module")
def redactor() -> Iterator[Redactor]:
    yield Redactor()


def test_model_not_loaded_fails_the_request_instead_of_forwarding(tmp_path: Path) -> None:
    with pytest.raises(RequestFailed) as failed:
        handle(service(tmp_path, None), request("Call Jane Roe at 415-555-0132"))
    assert failed.value.code == "UNAVAILABLE"
    assert str(failed.value) == "redaction: redaction model is not loaded"


def test_a_mebibyte_of_adversarial_text_cannot_outlive_the_deadline(
    tmp_path: Path, redactor: Redactor
) -> None:
    svc = service(tmp_path, redactor, redaction_max_text_bytes=2 * MIB, redaction_deadline_s=0.5)
    with pytest.raises(RequestFailed) as failed:
        handle(svc, request(adversarial(MIB)))
    assert failed.value.code == "DEADLINE_EXCEEDED"
    assert str(failed.value).startswith("redaction: deadline:")
    # The analyzer stopped at the deadline and is free: the next request is served.
    outputs = handle(svc, request("Mail jane.roe@example.org", request_id="r-2"))
    assert [o.topic for o in outputs] == [REDACTED]
    assert outputs[0].event.messages[0].content == "Mail <EMAIL_ADDRESS_1>"


def test_the_analyzer_itself_raises_past_its_deadline(redactor: Redactor) -> None:
    with pytest.raises(DeadlineExceeded, match=r"^deadline:"):
        redactor.find(
            [adversarial(MIB)],
            entities=["PHONE_NUMBER"],
            thresholds={"PHONE_NUMBER": 0.1},
            deadline=time.monotonic() + 0.2,
        )


def test_text_over_the_size_limit_is_dead_lettered_naming_the_field(
    tmp_path: Path, redactor: Redactor
) -> None:
    with pytest.raises(BadEvent, match=r"^messages\[0\]\.content: 262145 bytes is over the limit of 262144"):
        handle(service(tmp_path, redactor), request("a" * 262145))


def test_unknown_tenant_policy_is_dead_lettered(tmp_path: Path, redactor: Redactor) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text("tenants:\n  acme:\n    version: v1\n    entities: {PERSON: {}}\n")
    svc = service(tmp_path, redactor, redaction_policies_file=policies)
    with pytest.raises(BadEvent, match=r"^tenant: no redaction policy for tenant 'demo'"):
        handle(svc, request("hello"))


def test_unsupported_language_is_refused(tmp_path: Path, redactor: Redactor) -> None:
    with pytest.raises(RedactionError, match=r"^language: unsupported language 'fr'"):
        redactor.find(["Bonjour"], entities=["PERSON"], thresholds={"PERSON": 0.5}, language="fr")


def test_pseudonyms_leave_only_sealed_and_before_the_redacted_request(
    tmp_path: Path, redactor: Redactor
) -> None:
    svc = service(tmp_path, redactor)
    vault_out, redacted_out = handle(svc, request("My name is Jane Roe, write me a greeting"))
    assert vault_out.topic == "sluice.tokens.v1" and vault_out.partition == 0
    assert redacted_out.topic == REDACTED
    assert redacted_out.event.messages[0].content == "My name is <PERSON_1>, write me a greeting"
    for out in (vault_out, redacted_out):
        assert b"Jane" not in out.event.SerializeToString()
    keyring = keyring_from_settings(svc.settings)
    assert keyring.open(vault_out.event.pseudonyms, "demo", "r-1") == {"<PERSON_1>": "Jane Roe"}


def test_a_run_time_policy_update_applies_or_is_dead_lettered_naming_the_field(tmp_path: Path) -> None:
    svc = service(tmp_path, None)
    good = privacy_pb2.PolicyUpdate(tenant="acme", policy_yaml="version: v9\nentities: {EMAIL_ADDRESS: {}}")
    # (The envelope is checked by the consumer loop before the handler; not needed here.)
    assert asyncio.run(svc.handle_policy(good, None)) == ()  # type: ignore[arg-type]
    assert svc.boundary.policy("acme").version == "v9"
    bad = privacy_pb2.PolicyUpdate(tenant="acme", policy_yaml="version: v10\nentities: {EMAIL: {}}")
    with pytest.raises(BadEvent, match=r"^tenants\.acme\.entities\.EMAIL: unknown entity type"):
        asyncio.run(svc.handle_policy(bad, None))  # type: ignore[arg-type]
    assert svc.boundary.policy("acme").version == "v9"  # the bad update changed nothing
    asyncio.run(svc.handle_policy(privacy_pb2.PolicyUpdate(tenant="acme"), None))  # type: ignore[arg-type]
    assert svc.boundary.policy("acme").version == "default-1"
