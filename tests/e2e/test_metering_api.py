"""Metering on the running stack: budgets enforced by the gateway, bad input, re-pricing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import yaml

from services.gateway.auth import demo_key_file
from services.gateway.keys import key_id_of
from services.metering.pricing import format_amount
from services.metering.reader import read_committed
from sluice.stack import Stack
from sluice.topics import DLQ, USAGE
from sluice.v1 import (
    billing_pb2,
    envelope_pb2,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)
from tests.metering.helpers import charges, completion, produce, wait_until


@pytest.fixture(scope="module")
def metering(stack: Stack) -> Iterator[metering_pb2_grpc.MeteringStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("metering")) as channel:
        yield metering_pb2_grpc.MeteringStub(channel)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def demo_key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


def generate(gateway: gateway_pb2_grpc.GatewayStub, key: str) -> list[gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(
        messages=[envelope_pb2.ChatMessage(role="user", content="Say hi.")], max_tokens=3
    )
    return list(gateway.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=120))


def budget_state(
    metering: metering_pb2_grpc.MeteringStub, key_id: str, period: int
) -> events_pb2.BudgetState | None:
    for state in metering.GetBudget(metering_pb2.GetBudgetRequest(tenant="demo", key_id=key_id)).budgets:
        if state.budget.period == period:
            return state
    return None


def set_budget(metering: metering_pb2_grpc.MeteringStub, key_id: str, period: int, **limits: int) -> None:
    metering.SetBudget(
        metering_pb2.SetBudgetRequest(
            budget=billing_pb2.Budget(
                tenant="demo", key_id=key_id, period=period, mode=billing_pb2.BUDGET_MODE_HARD, **limits
            )  # type: ignore[arg-type]
        )
    )


def rejection(gateway: gateway_pb2_grpc.GatewayStub, key: str) -> grpc.RpcError | None:
    try:
        generate(gateway, key)
    except grpc.RpcError as exc:
        return exc
    return None


def test_a_hard_budget_blocks_the_next_request_once_crossed(
    stack: Stack, metering: metering_pb2_grpc.MeteringStub, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    key = demo_key(stack)
    key_id = key_id_of(key)
    day = billing_pb2.BUDGET_PERIOD_DAY
    set_budget(metering, key_id, day, limit_nanos=10**15)
    wait_until(lambda: budget_state(metering, key_id, day) is not None, 180, "the budget to be applied")
    # Let the key's spend today settle, then allow exactly one more request.
    spent = -1
    while (now := budget_state(metering, key_id, day).window.spent_nanos) != spent:  # type: ignore[union-attr]
        spent = now
        time.sleep(1.5)
    try:
        set_budget(metering, key_id, day, limit_nanos=spent + 1)
        wait_until(
            lambda: budget_state(metering, key_id, day).budget.limit_nanos == spent + 1,  # type: ignore[union-attr]
            30,
            "the new limit",
        )
        first = generate(gateway, key)
        assert first[-1].cost.nanos > 0  # this charge crosses the limit
        deadline = time.monotonic() + 10
        error = rejection(gateway, key)
        while error is None and time.monotonic() < deadline:
            time.sleep(0.1)
            error = rejection(gateway, key)
        assert error is not None, "the gateway kept accepting requests over a hard budget"
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"limit {format_amount(spent + 1)} USD" in error.details()
        assert "resets at" in error.details() and "daily budget" in error.details()
        retry_after = dict(error.trailing_metadata() or ()).get("retry-after")
        assert retry_after is not None and int(retry_after) > 0
        state = budget_state(metering, key_id, day)
        assert state is not None and state.blocked
    finally:
        set_budget(metering, key_id, day)  # no limits: removes the budget
    wait_until(lambda: rejection(gateway, key) is None, 30, "the budget removal to unblock the key", 0.5)


def test_a_request_rate_limit_rejects_a_burst(
    stack: Stack, metering: metering_pb2_grpc.MeteringStub, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    key = demo_key(stack)
    key_id = key_id_of(key)
    minute = billing_pb2.BUDGET_PERIOD_MINUTE
    set_budget(metering, key_id, minute, limit_requests=1)
    try:
        wait_until(lambda: budget_state(metering, key_id, minute) is not None, 180, "the rate limit")
        time.sleep(1)  # the gateway reads the state from sluice.budgets.v1
        errors = [rejection(gateway, key) for _ in range(3)]
        limited = [e for e in errors if e is not None]
        assert limited and limited[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in limited[0].details() and "limit 1 requests" in limited[0].details()
    finally:
        set_budget(metering, key_id, minute)
    wait_until(lambda: rejection(gateway, key) is None, 90, "the rate limit removal", 0.5)


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        (
            billing_pb2.Budget(tenant="demo", period=billing_pb2.BUDGET_PERIOD_DAY, limit_nanos=-1),
            "budget.limit_nanos",
        ),
        (
            billing_pb2.Budget(tenant="demo", period=billing_pb2.BUDGET_PERIOD_DAY, limit_tokens=-5),
            "budget.limit_tokens",
        ),
        (billing_pb2.Budget(tenant="demo", period=42, limit_nanos=1), "budget.period"),  # type: ignore[arg-type]
        (billing_pb2.Budget(tenant="demo", limit_nanos=1), "budget.period"),
        (billing_pb2.Budget(period=billing_pb2.BUDGET_PERIOD_DAY, limit_nanos=1), "budget.tenant"),
    ],
)
def test_set_budget_refuses_bad_input_naming_the_field(
    metering: metering_pb2_grpc.MeteringStub, budget: billing_pb2.Budget, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        metering.SetBudget(metering_pb2.SetBudgetRequest(budget=budget))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_completion_without_usage_is_dead_lettered_with_the_reason(stack: Stack) -> None:
    bad = completion("dlq-test", 1, 1)
    bad.ClearField("usage")
    asyncio.run(produce(stack.settings.bootstrap, [bad]))

    def letter() -> events_pb2.DeadLetter | None:
        async def find() -> events_pb2.DeadLetter | None:
            async for record in read_committed(stack.settings.bootstrap, DLQ):
                dead = events_pb2.DeadLetter.FromString(record.value or b"")
                if (
                    dead.envelope.request_id == bad.envelope.request_id
                    and dead.consumer_group == "sluice-metering"
                ):
                    return dead
            return None

        return asyncio.run(find())

    # A read stops at the last stable offset, which open transactions hold back: poll.
    found: list[events_pb2.DeadLetter] = []
    wait_until(
        lambda: bool(found) or (found.append(dead) if (dead := letter()) else False), 60, "the dead letter"
    )  # type: ignore[func-returns-value]
    assert found[0].reason.startswith("usage: missing")
    charged = asyncio.run(charges(stack.settings.bootstrap, "dlq-test"))
    assert (bad.envelope.request_id, 1) not in charged


def test_reprice_publishes_corrections_equal_to_the_price_difference(
    stack: Stack, metering: metering_pb2_grpc.MeteringStub, tmp_path: Path
) -> None:
    tenant = f"reprice-{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC) - timedelta(seconds=5)
    events = [completion(tenant, 100 * i, 10 * i, cached=i) for i in range(1, 21)]
    asyncio.run(produce(stack.settings.bootstrap, events))
    wait_until(lambda: len(asyncio.run(charges(stack.settings.bootstrap, tenant))) == 20, 60, "the charges")
    old_total = sum(c[0].cost.nanos for c in asyncio.run(charges(stack.settings.bootstrap, tenant)).values())

    catalog = yaml.safe_load(stack.settings.prices_file.read_text())
    catalog["version"] = f"test-{uuid.uuid4().hex[:6]}"
    catalog["models"]["smollm2-135m-instruct"] = [
        {
            "effective_from": "2026-01-01",
            "input_per_mtok": "0.05",
            "output_per_mtok": "0.11",
            "cached_input_per_mtok": "0.02",
        }
    ]
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(catalog))
    # Per request i: 99i uncached tokens at 50 nanos each, i cached at 20, 10i output at 110.
    new_total = sum(99 * i * 50 + i * 20 + 10 * i * 110 for i in range(1, 21))

    def reprice() -> dict[str, object]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sluice.cli",
                "--json",
                "metering",
                "reprice",
                "--from",
                since.isoformat(),
                "--catalog",
                str(path),
                "--tenant",
                tenant,
            ],
            env=stack.child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    first = reprice()
    assert first["corrections"] == 20 and first["difference_nanos"] == new_total - old_total

    async def corrections() -> list[events_pb2.UsageCharged]:
        return [
            c
            async for r in read_committed(stack.settings.bootstrap, USAGE)
            if (c := events_pb2.UsageCharged.FromString(r.value or b"")).envelope.tenant == tenant
            and c.kind == billing_pb2.CHARGE_KIND_CORRECTION
        ]

    wait_until(lambda: len(asyncio.run(corrections())) >= 20, 60, "the corrections to be readable")
    fixes = asyncio.run(corrections())
    assert len(fixes) == 20 and sum(f.cost.nanos for f in fixes) == new_total - old_total
    assert {f.corrects_version for f in fixes} == {"2026-11-29.1"}
    assert reprice()["corrections"] == 0  # idempotent: the ledger already matches the catalog

    def net() -> int:
        rows = metering.GetUsage(metering_pb2.GetUsageRequest(tenant=tenant)).rows
        return sum(row.cost.nanos for row in rows) if sum(r.corrections for r in rows) == 20 else -1

    wait_until(lambda: net() == new_total, 60, "the ledger view to include the corrections")


def test_usage_export_writes_the_ledger_as_csv_and_parquet(stack: Stack, tmp_path: Path) -> None:
    import csv

    import pyarrow.parquet as pq

    tenant = f"export-{uuid.uuid4().hex[:8]}"
    events = [completion(tenant, 40 * i, 5 * i) for i in range(1, 4)]
    asyncio.run(produce(stack.settings.bootstrap, events))
    seen: dict[tuple[str, int], list[events_pb2.UsageCharged]] = {}
    wait_until(
        lambda: len(seen.update(asyncio.run(charges(stack.settings.bootstrap, tenant))) or seen) == 3,
        60,
        "the charges",
    )  # type: ignore[func-returns-value]
    total = sum(c[0].cost.nanos for c in seen.values())

    def export(fmt: str) -> list[dict[str, object]]:
        out = tmp_path / f"ledger.{fmt}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sluice.cli",
                "usage",
                "export",
                "--format",
                fmt,
                "--tenant",
                tenant,
                "--output",
                str(out),
            ],
            env=stack.child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        if fmt == "csv":
            with out.open() as handle:
                return list(csv.DictReader(handle))
        return list(pq.read_table(out).to_pylist())

    for fmt in ("csv", "parquet"):
        rows = export(fmt)
        for _ in range(30):  # a read stops at the last stable offset: retry until complete
            if len(rows) >= 3:
                break
            time.sleep(1)
            rows = export(fmt)
        assert len(rows) == 3 and {r["kind"] for r in rows} == {"completion"}
        assert sum(int(r["cost_nanos"]) for r in rows) == total
