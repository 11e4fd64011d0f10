"""The local stack: broker (unless SLUICE_KAFKA_BOOTSTRAP is set), topics, six services.

Each service is its own process with its log under <state>/logs and its pid
under <state>/pids, so `sluice down` and `sluice status` work from any shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from sluice import tls
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, SERVICES, ServiceName, Settings
from sluice.topic_admin import ApplyReport, apply
from sluice.topics import load_plan


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stack:
    settings: Settings

    @property
    def pid_dir(self) -> Path:
        return self.settings.state_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    def broker(self) -> LocalBroker | None:
        if self.settings.kafka_bootstrap:
            return None
        return LocalBroker(
            REPO_ROOT,
            self.settings.state_dir,
            port=self.settings.local_kafka_port,
            controller_port=self.settings.local_kafka_port + 1,
        )

    def start_broker(self) -> None:
        broker = self.broker()
        if broker is not None:
            broker.start()
            broker.wait_ready(timeout=120)

    def apply_topics(self) -> ApplyReport:
        return asyncio.run(apply(self.settings.bootstrap, load_plan(self.settings.topics_file)))

    def child_env(self) -> dict[str, str]:
        """The services see exactly the settings this stack was made with."""
        env = dict(os.environ)
        for key, value in self.settings.model_dump(exclude_unset=True).items():
            if isinstance(value, SecretStr):  # its str() is "**********": pass the secret itself
                value = value.get_secret_value()
            if value is not None:
                env[f"SLUICE_{key.upper()}"] = str(value)
        env["SLUICE_KAFKA_BOOTSTRAP"] = self.settings.bootstrap
        env["SLUICE_STATE_DIR"] = str(self.settings.state_dir)
        return env

    def start_service(self, name: ServiceName) -> int:
        pid = self.pid(name)
        if pid is not None:
            return pid
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sluice.cli", "serve", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
                start_new_session=True,
            )
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def pid(self, name: str) -> int | None:
        path = self.pid_dir / f"{name}.pid"
        try:
            pid = int(path.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        # A reaped child of ours may linger as a zombie: treat it as gone.
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = 0
        return None if waited == pid else pid

    def healthy(self, name: ServiceName, timeout: float = 1.0) -> bool:
        with tls.channel(self.settings, self.settings.grpc_target(name)) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.RpcError:
                return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_healthy(self, names: tuple[ServiceName, ...] = SERVICES, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                if self.pid(name) is None:
                    raise StackError(f"{name} exited during start-up; see {self.log_dir / name}.log")
                if self.healthy(name):
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout:.0f}s: {', '.join(waiting)}")
            time.sleep(0.5)

    def up(self) -> None:
        self.start_broker()
        self.apply_topics()
        for name in SERVICES:
            self.start_service(name)
        self.wait_healthy()

    def stop_services(self, timeout: float = 40.0, names: tuple[ServiceName, ...] = SERVICES) -> None:
        pids = {name: pid for name in names if (pid := self.pid(name)) is not None}
        for pid in pids.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(self.pid(n) is not None for n in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, pid in pids.items():
            if self.pid(name) is not None:
                _signal(pid, signal.SIGKILL)
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def down(self) -> None:
        self.stop_services()
        broker = self.broker()
        if broker is not None:
            broker.stop()

    def status(self) -> dict[str, str]:
        rows: dict[str, str] = {}
        broker = self.broker()
        if broker is None:
            rows["kafka"] = f"external {self.settings.bootstrap}"
        else:
            rows["kafka"] = f"running {broker.bootstrap}" if broker.is_running() else "stopped"
        for name in SERVICES:
            if self.pid(name) is None:
                rows[name] = "stopped"
            else:
                state = "serving" if self.healthy(name) else "starting"
                rows[name] = f"{state} {self.settings.grpc_target(name)}"
        return rows


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)
