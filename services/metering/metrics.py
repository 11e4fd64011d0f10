"""Metering metrics: spend and tokens by tenant and model, for the cost dashboard.

Tenants and models are bounded sets an operator configures, so they may be labels;
the ledger (sluice.usage.v1), not these counters, is the record of what was charged:
a charge in an aborted transaction is counted here and charged again on retry.
"""

from __future__ import annotations

from prometheus_client import Counter

COST = Counter("sluice_cost_total", "Money charged, in currency units", ["tenant", "model", "currency"])
TOKENS = Counter("sluice_charged_tokens_total", "Tokens charged", ["tenant", "model", "kind"])


def count_charge(tenant: str, model: str, nanos: int, currency: str, prompt: int, completion: int) -> None:
    COST.labels(tenant, model, currency).inc(nanos / 1e9)
    TOKENS.labels(tenant, model, "prompt").inc(prompt)
    TOKENS.labels(tenant, model, "completion").inc(completion)
