"""Metering test tools: completions with known usage in, the committed ledger out.

Tests feed metering through its input contract (CompletionFinished on
sluice.completions.v1) and read its output contract (sluice.usage.v1), so they
exercise the real service without the model in the loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.metering.reader import read_committed
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka_security import client_options
from sluice.stack import Stack
from sluice.topics import BUDGETS, COMPLETIONS, USAGE
from sluice.v1 import billing_pb2, envelope_pb2, events_pb2
from streams.budget_rules import budget_key
from streams.metering_budgets import POLICIES

FINISHES = (
    events_pb2.FINISH_REASON_STOP,
    events_pb2.FINISH_REASON_LENGTH,
    events_pb2.FINISH_REASON_ERROR,
    events_pb2.FINISH_REASON_CANCELLED,
)


def completion(
    tenant: str,
    prompt: int,
    output: int,
    *,
    cached: int = 0,
    model: str = "smollm2-135m-instruct",
    finish: events_pb2.FinishReason.ValueType = events_pb2.FINISH_REASON_STOP,
    request_id: str | None = None,
    attempt: int = 1,
    duration_ms: int = 0,
) -> events_pb2.CompletionFinished:
    return events_pb2.CompletionFinished(
        envelope=envelopes.new_envelope(
            request_id=request_id or envelopes.new_request_id(),
            tenant=tenant,
            producer="test",
            attempt=attempt,
        ),
        model=model,
        finish_reason=finish,
        usage=envelope_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=output, cached_tokens=cached, total_tokens=prompt + output
        ),
        duration_ms=duration_ms,
        worker="test",
    )


def varied_completions(tenant: str, count: int) -> list[events_pb2.CompletionFinished]:
    """Every finish reason, zero-token ones, cached tokens and an unpriced model among them."""
    events = []
    for i in range(count):
        prompt = (i * 37) % 900
        events.append(
            completion(
                tenant,
                prompt,
                0 if i % 11 == 0 else (i * 13) % 300,
                cached=prompt // 3 if i % 4 == 0 else 0,
                finish=FINISHES[i % len(FINISHES)],
                model="no-such-model" if i % 50 == 7 else "smollm2-135m-instruct",
            )
        )
    return events


async def produce(bootstrap: str, events: Iterable[events_pb2.CompletionFinished]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        pending = [
            await producer.send(COMPLETIONS, e.SerializeToString(), key=e.envelope.request_id.encode())
            for e in events
        ]
        for future in pending:
            await future
    finally:
        await producer.stop()


async def committed(bootstrap: str) -> int:
    """Completions the pricer has committed (its group's offsets): the input offsets commit in
    the transactions of the charges, so this counts committed ledger entries (and dead letters)
    at the cost of one request, instead of reading the ledger."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets("sluice-metering")
    except KafkaError:  # no group yet: nothing committed
        return 0
    finally:
        await admin.close()
    return sum(o.offset for tp, o in offsets.items() if tp.topic == COMPLETIONS and o.offset > 0)


async def charges(bootstrap: str, tenant: str) -> dict[tuple[str, int], list[events_pb2.UsageCharged]]:
    """Committed completion charges of `tenant` per (request_id, attempt): duplicates stay visible."""
    found: dict[tuple[str, int], list[events_pb2.UsageCharged]] = defaultdict(list)
    async for record in read_committed(bootstrap, USAGE):
        charge = events_pb2.UsageCharged.FromString(record.value or b"")
        if charge.envelope.tenant == tenant and charge.kind == billing_pb2.CHARGE_KIND_COMPLETION:
            found[(charge.envelope.request_id, charge.envelope.attempt)].append(charge)
    return found


async def set_budget(bootstrap: str, budget: billing_pb2.Budget) -> None:
    """Publish a budget policy as SetBudget does, without needing the API up."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        policy = billing_pb2.BudgetPolicy(budget=budget)
        await producer.send_and_wait(POLICIES, policy.SerializeToString(), key=budget_key(budget).encode())
    finally:
        await producer.stop()


async def budget_state(bootstrap: str, budget: billing_pb2.Budget) -> events_pb2.BudgetState | None:
    """The newest committed state of `budget` on sluice.budgets.v1, if any."""
    newest = None
    async for record in read_committed(bootstrap, BUDGETS):
        if record.key == budget_key(budget).encode() and record.value:
            newest = events_pb2.BudgetState.FromString(record.value)
    return newest


def metric(settings: Settings, service: str, name: str, **labels: str) -> float:
    """A counter's value from a service's /metrics page (0 when absent)."""
    url = f"http://{settings.host}:{settings.metrics_port(service)}/metrics"  # type: ignore[arg-type]
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_metering(stack: Stack, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A metering process of our own (not the session stack's), logging into the stack's log dir."""
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(Path(stack.log_dir) / "metering.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "metering"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**stack.child_env(), **(env or {})},
        start_new_session=True,
    )


def kill_hard(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(check: object, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
