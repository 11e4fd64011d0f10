"""The registry lives only on sluice.templates.v1: it survives restarts of the service and the broker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, Settings, load_settings
from sluice.ports import free_ports
from sluice.stack import Stack
from sluice.v1 import prompts_pb2, prompts_pb2_grpc, templates_pb2
from tests.e2e.test_prompts_registry import create, label, unique


def restart_prompts(stack: Stack) -> None:
    pid = stack.pid("prompts")
    assert pid is not None
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while stack.pid("prompts") is not None:
        assert time.monotonic() < deadline, "prompts did not stop on SIGTERM"
        time.sleep(0.2)
    stack.start_service("prompts")
    stack.wait_healthy(("prompts",), timeout=180)


def snapshot(settings: Settings, name: str) -> tuple[list[tuple[int, str]], list[tuple[str, list[int]]], int]:
    with grpc.insecure_channel(settings.grpc_target("prompts")) as channel:
        stub = prompts_pb2_grpc.PromptsStub(channel)
        listed = stub.ListVersions(prompts_pb2.ListVersionsRequest(name=name), timeout=10)
        production = stub.GetTemplate(
            prompts_pb2.GetTemplateRequest(ref=templates_pb2.TemplateRef(name=name, label="production")),
            timeout=10,
        )
    return (
        [(v.version, v.messages[0].content) for v in listed.versions],
        [(p.label, [v.version for v in p.variants]) for p in listed.labels],
        production.version.version,
    )


def populate(settings: Settings, name: str) -> None:
    with grpc.insecure_channel(settings.grpc_target("prompts")) as channel:
        stub = prompts_pb2_grpc.PromptsStub(channel)
        for text in ("first {{ q }}", "second {{ q }}", "third {{ q }}"):
            create(stub, name, text)
        label(stub, name, "production", (3, 100))
        label(stub, name, "production", (2, 100))  # a rollback: compaction keeps only this pointer
        label(stub, name, "exp", (1, 50), (3, 50))


EXPECTED = (
    [(1, "first {{ q }}"), (2, "second {{ q }}"), (3, "third {{ q }}")],
    [("exp", [1, 3]), ("production", [2])],
    2,
)


def test_registry_survives_a_restart_of_the_prompts_service(stack: Stack) -> None:
    name = unique("durable")
    populate(stack.settings, name)
    assert snapshot(stack.settings, name) == EXPECTED
    restart_prompts(stack)
    assert snapshot(stack.settings, name) == EXPECTED
    # ... and it keeps numbering after what it replayed.
    with grpc.insecure_channel(stack.settings.grpc_target("prompts")) as channel:
        assert create(prompts_pb2_grpc.PromptsStub(channel), name, "fourth").version == 4


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """Not the session broker: this test stops and starts its broker."""
    port, controller = free_ports(2)
    broker = LocalBroker(REPO_ROOT, tmp_path / "kafka", port=port, controller_port=controller)
    broker.start()
    try:
        broker.wait_ready(timeout=120)
        yield broker
    finally:
        broker.stop()


def test_registry_survives_a_restart_of_the_broker(own_broker: LocalBroker, tmp_path: Path) -> None:
    low, high = sorted(free_ports(2))
    settings = load_settings(
        kafka_bootstrap=own_broker.bootstrap,
        state_dir=tmp_path / "state",
        prompts_port=low,
        metrics_port_offset=high - low,
    )
    stack = Stack(settings)
    stack.apply_topics()
    name = unique("durable")
    try:
        stack.start_service("prompts")
        stack.wait_healthy(("prompts",), timeout=180)
        populate(settings, name)
        assert snapshot(settings, name) == EXPECTED
        stack.stop_services()

        own_broker.stop()
        own_broker.start()
        own_broker.wait_ready(timeout=120)

        stack.start_service("prompts")
        stack.wait_healthy(("prompts",), timeout=180)
        assert snapshot(settings, name) == EXPECTED
    finally:
        stack.stop_services()
