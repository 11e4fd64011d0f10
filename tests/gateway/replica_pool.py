"""Extra gateway replicas as real processes: own gRPC port and own reply partition each.

They share the stack's Kafka, state dir (the demo key) and every other service,
exactly as replicas behind one load balancer would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.ports import free_ports
from sluice.stack import Stack


@dataclass
class Replica:
    port: int
    partition: int
    process: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ReplicaPool:
    stack: Stack
    replicas: list[Replica] = field(default_factory=list)

    def start(self, partition: int, **settings: str) -> Replica:
        port, metrics = sorted(free_ports(2))  # the offset must be positive
        env = self.stack.child_env()
        env.update(
            SLUICE_GATEWAY_PORT=str(port),
            SLUICE_GATEWAY_REPLY_PARTITION=str(partition),
            # A metrics port of its own: the stack's offset would collide with another service's.
            SLUICE_METRICS_PORT_OFFSET=str(metrics - port),
            **{f"SLUICE_{k.upper()}": v for k, v in settings.items()},
        )
        log = open(self.stack.log_dir / f"gateway-replica-{partition}-{port}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "serve", "gateway"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        replica = Replica(port, partition, process)
        self.replicas.append(replica)
        self._wait_serving(replica)
        return replica

    def _wait_serving(self, replica: Replica, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(replica.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if replica.process.poll() is not None:
                    raise RuntimeError(f"gateway replica on partition {replica.partition} exited")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway replica on partition {replica.partition} not serving")
                time.sleep(0.5)

    def stop(self, replica: Replica, timeout: float = 40) -> None:
        """SIGTERM (a clean drain), then SIGKILL if it does not exit."""
        if replica.process.poll() is None:
            os.killpg(replica.process.pid, signal.SIGTERM)
            try:
                replica.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(replica.process.pid, signal.SIGKILL)
                replica.process.wait()
        self.replicas.remove(replica)

    def stop_all(self) -> None:
        for replica in list(self.replicas):
            self.stop(replica)
