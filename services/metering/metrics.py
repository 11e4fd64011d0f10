"""Metering metrics: spend and tokens by tenant and model, for the cost dashboard.

Tenants and models are bounded sets an operator configures, so they may be labels;
the ledger (sluice.usage.v1), not these counters, is the record of what was charged:
a charge in an aborted transaction is counted here and charged again on retry.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter

COST = Counter("sluice_cost_total", "Money charged, in currency units", ["tenant", "model", "currency"])
TOKENS = Counter("sluice_charged_tokens_total", "Tokens charged", ["tenant", "model", "kind"])


@cache
def _children(tenant: str, model: str, currency: str) -> tuple[Counter, Counter, Counter]:
    """The labelled counters of one (tenant, model): looked up once, not on every charge,
    because a label lookup costs about as much as pricing the charge."""
    return (
        COST.labels(tenant, model, currency),
        TOKENS.labels(tenant, model, "prompt"),
        TOKENS.labels(tenant, model, "completion"),
    )


def count_charge(tenant: str, model: str, nanos: int, currency: str, prompt: int, completion: int) -> None:
    cost, prompt_tokens, completion_tokens = _children(tenant, model, currency)
    cost.inc(nanos / 1e9)
    prompt_tokens.inc(prompt)
    completion_tokens.inc(completion)
