"""Prompts metrics. Labels are bounded and content-free (no template text, no variables)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CACHE_LOOKUPS = Counter("sluice_prompts_cache_lookups_total", "Render+tokenize cache lookups", ["result"])
CACHE_HIT_RATIO = Gauge(
    "sluice_prompts_cache_hit_ratio", "Share of render+tokenize lookups served from the cache"
)
ASSEMBLY_SECONDS = Histogram(
    "sluice_prompts_assembly_seconds",
    "Time to validate, render, apply the chat template, tokenize and fit one request",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
FITTED = Counter("sluice_prompts_fit_total", "What fitting the context window did", ["action"])
REGISTRY_TEMPLATES = Gauge("sluice_prompts_registry_templates", "Templates in the registry")
