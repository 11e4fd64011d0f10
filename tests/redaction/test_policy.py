"""Tenant policies: validation naming the field, fallback, and every operator on real analysis."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.redaction.analyzer import RedactionError, Redactor
from services.redaction.boundary import (
    SUPPORTED_ENTITIES,
    Boundary,
    boundary_from_settings,
    parse_tenant_policy,
    stream_redactor_for,
)
from services.redaction.policy import PolicyError
from sluice.config import DEFAULTS_DIR, Settings, load_settings


def test_every_entity_a_policy_may_name_is_supported_by_the_analyzer(loaded_redactor: Redactor) -> None:
    assert SUPPORTED_ENTITIES - {"DENY_LIST"} <= loaded_redactor.supported_entities


def test_the_shipped_policy_file_loads(settings: Settings) -> None:
    boundary = boundary_from_settings(settings)
    assert boundary.policy("demo").entities["PERSON"].operator == "pseudonymize"
    assert boundary.policy("any-other-tenant").version == "default-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            "version: v1\nentities: {NOT_A_THING: {}}",
            "tenants.acme.entities.NOT_A_THING: unknown entity type",
        ),
        ("version: v1\nentities: {PERSON: {threshold: 1.5}}", "tenants.acme.entities.PERSON.threshold:"),
        ("version: v1\nentities: {PERSON: {operator: shred}}", "tenants.acme.entities.PERSON.operator:"),
        ("version: v1\nlanguage: fr\nentities: {PERSON: {}}", "tenants.acme.language: unsupported language"),
        ("version: v1\nentities: {PERSON: {}}\ncolour: blue", "tenants.acme.colour:"),
        ("entities: {PERSON: {}}", "tenants.acme.version:"),
        ("version: v1\nentities: {}", "tenants.acme.entities: name at least one entity"),
        ("version: v1", "tenants.acme.entities: name at least one entity"),
        ("version: v1\nentities: {PERSON: {}}\ndeny: ['  ']", "tenants.acme.deny:"),
        ("version: v1\nentities: {PERSON: {}}\npseudonym_ttl_s: 0", "tenants.acme.pseudonym_ttl_s:"),
        ("version: [unclosed", "tenants.acme: not valid YAML"),
    ],
)
def test_an_invalid_policy_is_refused_naming_the_field(body: str, field: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_tenant_policy(body, "acme")
    assert str(refused.value).startswith(field), str(refused.value)


def test_an_invalid_policy_file_stops_the_start_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("tenants:\n  acme:\n    version: v1\n    entities: {PERSON: {threshold: -1}}\n")
    with pytest.raises(PolicyError, match=r"^tenants\.acme\.entities\.PERSON\.threshold:"):
        boundary_from_settings(load_settings(state_dir=tmp_path, redaction_policies_file=path))


def test_a_tenant_without_policy_and_no_fallback_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("tenants:\n  acme:\n    version: v1\n    entities: {PERSON: {}}\n")
    boundary = boundary_from_settings(load_settings(state_dir=tmp_path, redaction_policies_file=path))
    with pytest.raises(PolicyError, match=r"^tenant: no redaction policy for tenant 'other'"):
        boundary.policy("other")


def _boundary(tmp_path: Path, redactor: Redactor, policy: str, master: str | None = None) -> Boundary:
    path = tmp_path / "policies.yaml"
    path.write_text("tenants:\n  acme:\n" + "".join(f"    {line}\n" for line in policy.strip().splitlines()))
    boundary = boundary_from_settings(load_settings(state_dir=tmp_path, redaction_policies_file=path))
    boundary.loaded(redactor)
    return boundary


TEXT = "Ask Maria Garcia at maria.garcia@example.org or call (415) 555-0132; Maria Garcia agreed."


def test_placeholder_numbers_each_value_once_per_request(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(tmp_path, loaded_redactor, "version: v1\nentities: {PERSON: {}, EMAIL_ADDRESS: {}}")
    applied, _ = b.redact_now("acme", [TEXT, "Maria Garcia again"])
    assert applied.texts == [
        "Ask <PERSON_1> at <EMAIL_ADDRESS_1> or call (415) 555-0132; <PERSON_1> agreed.",
        "<PERSON_1> again",
    ]
    assert applied.entity_counts == {"PERSON": 1, "EMAIL_ADDRESS": 1}
    assert applied.originals == {}


def test_mask_drop_and_hash_operators(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(
        tmp_path,
        loaded_redactor,
        "version: v1\nmask_char: '#'\nentities:\n  PERSON: {operator: hash}\n"
        "  EMAIL_ADDRESS: {operator: mask}\n  PHONE_NUMBER: {operator: drop}",
    )
    text = b.redact_now("acme", [TEXT])[0].texts[0]
    assert "Maria" not in text and "maria" not in text and "555" not in text
    assert "#" * len("maria.garcia@example.org") in text
    assert text.count("<PERSON:") == 2  # the same value hashes the same
    assert "or call ;" in text


def test_hashes_are_salted_per_tenant(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(tmp_path, loaded_redactor, "version: v1\nentities: {EMAIL_ADDRESS: {operator: hash}}")
    acme = b.redact_now("acme", ["x@example.org"])[0].texts[0]
    b.policies.override("other", b.policy("acme"))
    other = b.redact_now("other", ["x@example.org"])[0].texts[0]
    assert acme.startswith("<EMAIL_ADDRESS:") and other.startswith("<EMAIL_ADDRESS:")
    assert acme != other


def test_pseudonymize_keeps_originals_only_for_the_vault(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(tmp_path, loaded_redactor, "version: v1\nentities: {PERSON: {operator: pseudonymize}}")
    applied, policy = b.redact_now("acme", ["My name is Jane Roe, write me a greeting"])
    assert applied.texts == ["My name is <PERSON_1>, write me a greeting"]
    assert applied.originals == {"<PERSON_1>": "Jane Roe"}
    assert policy.uses_pseudonyms


def test_allow_and_deny_lists(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(
        tmp_path,
        loaded_redactor,
        "version: v1\nentities: {EMAIL_ADDRESS: {}}\nallow: [support@sluice.example]\ndeny: [Project Falcon]",
    )
    text = b.redact_now("acme", ["Mail support@sluice.example or x@example.org about project falcon."])[0]
    assert text.texts == ["Mail support@sluice.example or <EMAIL_ADDRESS_1> about <DENY_LIST_1>."]


def test_run_time_override_replaces_and_resets(tmp_path: Path, loaded_redactor: Redactor) -> None:
    b = _boundary(tmp_path, loaded_redactor, "version: v1\nentities: {EMAIL_ADDRESS: {}}")
    b.policies.override("acme", parse_tenant_policy("version: v2\nentities: {PHONE_NUMBER: {}}", "acme"))
    assert b.policy("acme").version == "v2"
    b.policies.override("acme", None)
    assert b.policy("acme").version == "v1"


async def test_a_policy_that_opts_out_passes_text_unanalysed(tmp_path: Path) -> None:
    """`redact: false` needs no model and no entities; text, counts and vault stay empty of findings."""
    path = tmp_path / "policies.yaml"
    path.write_text("tenants:\n  acme:\n    version: off-1\n    redact: false\n")
    b = boundary_from_settings(load_settings(state_dir=tmp_path, redaction_policies_file=path))
    for applied, policy in (b.redact_now("acme", [TEXT]), await b.redact("acme", [TEXT])):
        assert applied.texts == [TEXT]
        assert applied.entity_counts == {} and applied.originals == {}
        assert policy.version == "off-1"
    assert stream_redactor_for(b, "acme", load_settings(state_dir=tmp_path)) is None


def test_an_analysing_policy_still_needs_the_model(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("tenants:\n  acme:\n    version: v1\n    entities: {PERSON: {}}\n")
    b = boundary_from_settings(load_settings(state_dir=tmp_path, redaction_policies_file=path))
    with pytest.raises(RedactionError):
        b.redact_now("acme", [TEXT])


def test_default_policy_file_is_in_the_package() -> None:
    assert (DEFAULTS_DIR / "policies.yaml").is_file()
