"""Tenant redaction policies: which entities, how sure, and what replaces them.

Policies come from a YAML file at start and from the compacted topic
sluice.policies.v1 at run time. Both paths go through :func:`parse_policy`, so
an invalid policy is refused the same way, with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "FALLBACK_TENANT",
    "POLICIES",
    "EntityRule",
    "Operator",
    "PolicyBook",
    "PolicyError",
    "TenantPolicy",
    "load_policy_file",
    "parse_policy",
]

FALLBACK_TENANT = "*"
# Compacted, keyed by tenant: run-time policy overrides (sluice.v1.PolicyUpdate).
POLICIES = "sluice.policies.v1"
Operator = Literal["placeholder", "mask", "hash", "drop", "pseudonymize"]
# Entity type reported for deny-list hits.
DENY_LIST_ENTITY = "DENY_LIST"


class PolicyError(ValueError):
    """A policy is invalid or missing; the message starts with the field's path."""


class EntityRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(default=0.35, ge=0, le=1)
    operator: Operator = "placeholder"


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    language: str = "en"
    # False is an explicit opt-out: this tenant's text is passed on unanalysed (e.g. a
    # tenant whose data holds no personal data, or an overhead benchmark). Never a default.
    redact: bool = True
    entities: dict[str, EntityRule] = Field(default_factory=dict)
    # Exact strings never redacted (e.g. the company's own support address).
    allow: list[str] = Field(default_factory=list)
    # Exact strings always redacted (case-insensitive, whole words), as DENY_LIST.
    deny: list[str] = Field(default_factory=list)
    deny_operator: Operator = "placeholder"
    mask_char: str = Field(default="*", min_length=1, max_length=1)
    pseudonym_ttl_s: int = Field(default=3600, gt=0, le=7 * 86400)

    @field_validator("allow", "deny")
    @classmethod
    def _no_blank_terms(cls, terms: list[str]) -> list[str]:
        for i, term in enumerate(terms):
            if not term.strip():
                raise ValueError(f"item {i} must not be blank")
        return terms

    def rule(self, entity_type: str) -> EntityRule:
        if entity_type == DENY_LIST_ENTITY:
            return EntityRule(threshold=0.0, operator=self.deny_operator)
        return self.entities[entity_type]

    @property
    def uses_pseudonyms(self) -> bool:
        return self.deny_operator == "pseudonymize" or any(
            r.operator == "pseudonymize" for r in self.entities.values()
        )

    def deny_pattern(self) -> re.Pattern[str] | None:
        if not self.deny:
            return None
        terms = sorted(self.deny, key=len, reverse=True)
        return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", re.IGNORECASE)


def _field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    return ".".join([prefix, *(str(p) for p in loc)]) if prefix else ".".join(str(p) for p in loc)


def parse_policy(
    raw: Any, *, supported_entities: frozenset[str], supported_languages: frozenset[str], where: str
) -> TenantPolicy:
    """Validate one tenant's policy; `where` prefixes the field path in errors."""
    try:
        policy = TenantPolicy.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise PolicyError(f"{_field_path(where, err['loc'])}: {err['msg']}") from None
    if policy.redact and not policy.entities:
        raise PolicyError(f"{where}.entities: name at least one entity (or set redact: false to opt out)")
    for name in policy.entities:
        if name not in supported_entities:
            supported = ", ".join(sorted(supported_entities))
            raise PolicyError(f"{where}.entities.{name}: unknown entity type (supported: {supported})")
    if policy.language not in supported_languages:
        raise PolicyError(
            f"{where}.language: unsupported language {policy.language!r} "
            f"(supported: {', '.join(sorted(supported_languages))})"
        )
    return policy


def parse_policy_yaml(
    text: str, *, supported_entities: frozenset[str], supported_languages: frozenset[str], where: str
) -> TenantPolicy:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise PolicyError(f"{where}: not valid YAML") from None
    return parse_policy(
        raw, supported_entities=supported_entities, supported_languages=supported_languages, where=where
    )


def load_policy_file(
    path: Path, *, supported_entities: frozenset[str], supported_languages: frozenset[str]
) -> dict[str, TenantPolicy]:
    """All tenants' policies from the start-up file; the first bad field stops the load."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise PolicyError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), dict):
        raise PolicyError("tenants: a mapping of tenant name to policy is required")
    extra = sorted(set(raw) - {"tenants"})
    if extra:
        raise PolicyError(f"{extra[0]}: unknown top-level key")
    return {
        str(tenant): parse_policy(
            body,
            supported_entities=supported_entities,
            supported_languages=supported_languages,
            where=f"tenants.{tenant}",
        )
        for tenant, body in raw["tenants"].items()
    }


@dataclass
class PolicyBook:
    """The policies in force: the start-up file, with run-time overrides on top."""

    base: Mapping[str, TenantPolicy]
    overrides: dict[str, TenantPolicy] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> TenantPolicy:
        for source in (self.overrides, self.base):
            if tenant in source:
                return source[tenant]
        for source in (self.overrides, self.base):
            if FALLBACK_TENANT in source:
                return source[FALLBACK_TENANT]
        raise PolicyError(f"tenant: no redaction policy for tenant {tenant!r}")

    def override(self, tenant: str, policy: TenantPolicy | None) -> None:
        if policy is None:
            self.overrides.pop(tenant, None)
        else:
            self.overrides[tenant] = policy
