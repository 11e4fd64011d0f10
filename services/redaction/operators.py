"""Turning findings into redacted text under a tenant policy's operators."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.redaction.analyzer import Finding
from services.redaction.policy import TenantPolicy

__all__ = ["Applied", "apply_policy", "render"]


@dataclass
class Applied:
    """Redacted texts, findings per text, distinct values per type, and pseudonyms to seal."""

    texts: list[str]
    findings: list[list[Finding]]
    entity_counts: dict[str, int]
    # placeholder -> original, only for operator `pseudonymize`; sealed before it leaves.
    originals: dict[str, str] = field(default_factory=dict)


def _digest(salt: bytes, value: str) -> str:
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:12]


def render(entity_type: str, value: str, policy: TenantPolicy, salt: bytes, number: int | None) -> str:
    """The replacement for one value; `number` None gives an unnumbered placeholder."""
    operator = policy.rule(entity_type).operator
    if operator == "mask":
        return policy.mask_char * len(value)
    if operator == "drop":
        return ""
    if operator == "hash":
        return f"<{entity_type}:{_digest(salt, value)}>"
    return f"<{entity_type}_{number}>" if number is not None else f"<{entity_type}>"


def apply_policy(
    texts: Sequence[str], findings: Sequence[Sequence[Finding]], policy: TenantPolicy, salt: bytes
) -> Applied:
    """Number placeholders by first appearance (same value, same placeholder) and splice."""
    numbers: dict[tuple[str, str], int] = {}
    counts: dict[str, int] = {}
    originals: dict[str, str] = {}
    redacted: list[str] = []
    for text, spans in zip(texts, findings, strict=True):
        parts: list[str] = []
        cursor = 0
        for span in spans:
            value = text[span.start : span.end]
            key = (span.entity_type, value)
            if key not in numbers:
                counts[span.entity_type] = counts.get(span.entity_type, 0) + 1
                numbers[key] = counts[span.entity_type]
            replacement = render(span.entity_type, value, policy, salt, numbers[key])
            if policy.rule(span.entity_type).operator == "pseudonymize":
                originals[replacement] = value
            parts.append(text[cursor : span.start])
            parts.append(replacement)
            cursor = span.end
        parts.append(text[cursor:])
        redacted.append("".join(parts))
    return Applied(
        texts=redacted, findings=[list(f) for f in findings], entity_counts=counts, originals=originals
    )
