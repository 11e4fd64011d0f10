"""Shared fixtures: a real Kafka broker for the session, and the real six-service stack.

If SLUICE_KAFKA_BOOTSTRAP is set, tests use that cluster instead of starting one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import pytest

from services.prompts.chat_template import ChatTemplate
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, SERVICES, ServiceName, Settings, load_settings
from sluice.models import smollm2_gguf_path
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("SLUICE_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port, controller = free_ports(2)
    broker = LocalBroker(REPO_ROOT, tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller)
    broker.start()
    try:
        broker.wait_ready(timeout=120)
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def topics_ready(kafka_bootstrap: str) -> str:
    settings = load_settings(kafka_bootstrap=kafka_bootstrap)
    Stack(settings).apply_topics()
    return kafka_bootstrap


@pytest.fixture(scope="session")
def stack_settings(topics_ready: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    ports = free_ports(len(SERVICES))
    return load_settings(
        kafka_bootstrap=topics_ready,
        state_dir=tmp_path_factory.mktemp("state"),
        metrics_port_offset=free_offset(ports),
        gateway_reply_timeout_s=120,
        traces_exporter="file",  # tests/e2e/test_tracing.py reads <state_dir>/traces
        **{f"{name}_port": port for name, port in zip(SERVICES, ports, strict=True)},
    )


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    """All six services as real processes, as `make run` starts them."""
    running = Stack(stack_settings)
    try:
        for name in SERVICES:
            running.start_service(name)
        running.wait_healthy(timeout=300)
        yield running
    finally:
        running.stop_services()


@contextmanager
def paused(stack_settings: Settings, *names: ServiceName) -> Iterator[None]:
    """Stop these services of the session stack, if it runs, while a test owns their input.

    Tests that run their own consumers in a service's consumer group (or read its
    outputs) would otherwise share the work with the session stack's process.
    """
    running = Stack(stack_settings)
    stopped = tuple(name for name in names if running.pid(name) is not None)
    running.stop_services(names=stopped)
    try:
        yield
    finally:
        for name in stopped:
            running.start_service(name)
        if stopped:
            running.wait_healthy(stopped, timeout=300)


def service_logs(stack: Stack) -> dict[str, str]:
    return {path.stem: path.read_text(errors="replace") for path in Path(stack.log_dir).glob("*.log")}


# The real default model, shared by the inference and prompts tests.
@pytest.fixture(scope="module")
def model_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def template(model_path: Path) -> Iterator[ChatTemplate]:
    t = ChatTemplate(model_path)
    yield t
    t.close()


@pytest.fixture(scope="module")
def vocab_llm(model_path: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()
