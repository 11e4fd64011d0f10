"""The load generator's Sluice targets against the real stack (real Kafka, Presidio, model):
gRPC Generate through the gateway, and the same traffic through the Kafka ingress."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.loadgen import OK, GrpcTarget, KafkaIngressTarget, PromptMix, RunResult, run_load
from loadtest.report import write_report
from services.gateway.auth import demo_key_file
from sluice import tls
from sluice.kafka_security import client_options
from sluice.stack import Stack

MAX_TOKENS = 6
# Seed 3 at 1 rps for 3.5 s: three requests, the first and last with planted PII.
LOAD = {"rps": 1.0, "duration_s": 3.5, "seed": 3, "progress": False}
MIX = PromptMix(pii_fraction=0.5, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


def check_streamed(result: RunResult) -> None:
    assert len(result.records) == 3
    assert [r.pii_planted for r in result.records] == [True, False, True]
    assert len(result.planted_pii) >= 4
    for record in result.records:
        assert record.status == OK, (record.status, record.error)
        assert len(record.request_id) >= 16
        assert 0 < record.output_tokens <= MAX_TOKENS
        assert record.ttft_s is not None and record.e2e_s is not None
        assert 0 < record.ttft_s <= record.e2e_s
        assert all(gap >= 0 for gap in record.itl_s)
    assert len({r.request_id for r in result.records}) == 3


async def test_grpc_target_streams_generate_through_the_gateway(
    stack: Stack, key: str, tmp_path: Path
) -> None:
    address = stack.settings.grpc_target("gateway")
    credentials = tls.channel_credentials(stack.settings)
    async with GrpcTarget(address, key, credentials=credentials) as target:
        result = await run_load(target, mix=MIX, **LOAD)  # type: ignore[arg-type]
    check_streamed(result)
    report = write_report(result, tmp_path)
    assert report["targets"]["sluice-grpc"]["ok"] == 3
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0


async def test_grpc_target_records_a_refused_key_by_its_status(stack: Stack) -> None:
    address = stack.settings.grpc_target("gateway")
    credentials = tls.channel_credentials(stack.settings)
    async with GrpcTarget(address, "sk-sluice-not-a-key", credentials=credentials) as target:
        result = await run_load(target, mix=MIX, **LOAD)  # type: ignore[arg-type]
    assert {r.status for r in result.records} == {"UNAUTHENTICATED"}
    assert all(r.ttft_s is None for r in result.records)


async def test_kafka_ingress_target_reads_tokens_and_completion_from_its_reply_topic(
    stack: Stack, key: str
) -> None:
    target = KafkaIngressTarget(
        stack.settings.bootstrap,
        key,
        tenant="demo",
        reply_topic="replies.demo.loadtest-test",
        kafka_options=client_options(stack.settings),
    )
    async with target:
        result = await run_load(target, mix=MIX, **LOAD)  # type: ignore[arg-type]
    check_streamed(result)
    assert result.target_info["reply_topic"] == "replies.demo.loadtest-test"
