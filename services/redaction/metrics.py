"""Redaction metrics: PII found, by entity type (a fixed set from the recognizers)."""

from __future__ import annotations

from prometheus_client import Counter

ENTITIES = Counter("sluice_redaction_entities_total", "PII entities found and redacted", ["entity_type"])
