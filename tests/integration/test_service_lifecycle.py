"""A service's life outside the happy path: broker down at start-up, and SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sluice.config import load_settings
from sluice.ports import free_ports
from sluice.stack import Stack


def start(name: str, env_overrides: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    settings = load_settings(**{k: v for k, v in env_overrides.items()})
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "serve", name],
            env=Stack(settings).child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"raw": line})
    return out


def test_broker_down_at_start_up_retries_with_backoff_then_stops_on_sigterm(tmp_path: Path) -> None:
    dead_port, grpc_port, offset_base = free_ports(3)
    log = tmp_path / "metering.log"
    proc = start(
        "metering",
        {
            "kafka_bootstrap": f"127.0.0.1:{dead_port}",
            "state_dir": str(tmp_path),
            "metering_port": grpc_port,
            "metrics_port_offset": offset_base - grpc_port if offset_base > grpc_port else 1,
        },
        log,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            retries = [entry for entry in lines(log) if entry.get("event") == "kafka unreachable, retrying"]
            if len(retries) >= 3:
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert len(retries) >= 3, log.read_text()
        delays = [float(str(r["retry_in_s"])) for r in retries]
        assert delays == sorted(delays) and delays[-1] > delays[0], "backoff must grow"
        assert "Traceback" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_sigterm_drains_and_exits_cleanly(topics_ready: str, tmp_path: Path) -> None:
    grpc_port, metrics = free_ports(2)
    log = tmp_path / "audit.log"
    settings = {
        "kafka_bootstrap": topics_ready,
        "state_dir": str(tmp_path),
        "audit_port": grpc_port,
        "metrics_port_offset": metrics - grpc_port if metrics > grpc_port else 1,
    }
    proc = start("audit", settings, log)
    try:
        stack = Stack(load_settings(**settings))  # type: ignore[arg-type]
        deadline = time.monotonic() + 120
        while not stack.healthy("audit") and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert stack.healthy("audit")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        events = [entry.get("event") for entry in lines(log)]
        assert events.index("draining") < events.index("stopped")
    finally:
        proc.kill()
