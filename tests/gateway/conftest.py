"""Gateway tenancy fixtures: the real stack, keys made with the real CLI, and calls."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from google.protobuf.message import Message

from services.gateway.auth import demo_key_file
from services.metering.reader import topic_partitions
from sluice.stack import Stack
from sluice.v1 import envelope_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.replica_pool import ReplicaPool

M = TypeVar("M", bound=Message)


def sluice(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `sluice` command against the test stack."""
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def create_key(stack: Stack, tenant: str, *options: str) -> dict[str, str]:
    done = sluice(stack, "--json", "keys", "create", "--tenant", tenant, *options)
    assert done.returncode == 0, done.stderr
    created: dict[str, str] = json.loads(done.stdout)
    return created


def request(text: str = "Say hi", **fields: Any) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[envelope_pb2.ChatMessage(role="user", content=text)],
        **fields,
    )


def generate(
    channel: grpc.Channel, key: str | None, req: gateway_pb2.GenerateRequest, timeout: float = 180
) -> list[gateway_pb2.GenerateResponse]:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return list(gateway_pb2_grpc.GatewayStub(channel).Generate(req, metadata=metadata, timeout=timeout))


def first_of(
    channel: grpc.Channel, key: str, req: gateway_pb2.GenerateRequest, timeout: float | None = 60
) -> tuple[gateway_pb2.GenerateResponse, Any]:
    """Admission without waiting for the model: the stream's first message, and the call to cancel."""
    call = gateway_pb2_grpc.GatewayStub(channel).Generate(
        req, metadata=(("authorization", f"Bearer {key}"),), timeout=timeout
    )
    return next(call), call


def admission(channel: grpc.Channel, key: str, req: gateway_pb2.GenerateRequest) -> grpc.RpcError | None:
    """None if the call was admitted (then cancelled at once), else its error."""
    try:
        first_of(channel, key, req)[1].cancel()
    except grpc.RpcError as error:
        return error
    return None


def rejected(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def eventually(what: str, check: Callable[[], Any], seconds: float = 30) -> Any:
    """Poll `check` until it returns something truthy; the bound is generous, never asserted tight."""
    end = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


async def _records(bootstrap: str, topic: str, key: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[bytes] = []
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(r.value for r in records if r.key == key.encode() and r.value is not None)
        return found
    finally:
        await consumer.stop()


def on_topic(stack: Stack, topic: str, key: str, message: type[M]) -> list[M]:
    """Every record of `topic` keyed `key`, decoded."""
    return [message.FromString(v) for v in asyncio.run(_records(stack.settings.bootstrap, topic, key))]


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as ch:
        yield ch


@pytest.fixture(scope="module")
def demo_key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


@pytest.fixture(scope="module")
def pool(stack: Stack) -> Iterator[ReplicaPool]:
    """Two more gateway replicas (reply partitions 1 and 2) beside the stack's own."""
    replicas = ReplicaPool(stack)
    try:
        replicas.start(1)
        replicas.start(2)
        yield replicas
    finally:
        replicas.stop_all()
