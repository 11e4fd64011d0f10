"""The one shape every Sluice service has.

A gRPC server with health and reflection, Kafka consumers in the service's own
group, a Prometheus endpoint, JSON logs, and a drain on SIGTERM: stop taking
work, finish and commit what is in hand, then close.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # public re-export
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from sluice import kafka_security, logs, tls, tracing
from sluice.config import ServiceName, Settings
from sluice.grpc_metrics import MetricsInterceptor
from sluice.kafka import EventConsumer, start_producer
from sluice.lag import export_lag
from sluice.topics import Codec, load_plan

log = logs.get_logger()

# What every RPC handler receives; aliased so servicers need not repeat the generics.
Context = grpc.aio.ServicerContext[Any, Any]


class Consumer(Protocol):
    """What `serve` runs and drains: EventConsumer, or InFlightConsumer for concurrent work."""

    group_id: str

    async def run(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class GrpcApi:
    """A servicer and how to register it; `name` is its full service name for reflection."""

    name: str
    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]


@dataclass
class Runtime:
    """What a service gets from the platform once it is connected."""

    settings: Settings
    service: ServiceName
    codec: Codec
    producer: AIOKafkaProducer

    def consumer(
        self, topics: Sequence[str], handler: Any, group_id: str | None = None, **kwargs: Any
    ) -> EventConsumer:
        return EventConsumer(
            service=self.service,
            group_id=group_id or f"sluice-{self.service}",
            topics=topics,
            handler=handler,
            codec=self.codec,
            bootstrap=self.settings.bootstrap,
            producer=self.producer,
            **kwargs,
        )


@dataclass
class Service:
    """Subclasses load their heavy parts in `prepare` and wire Kafka in `connect`."""

    settings: Settings
    name: ServiceName = field(init=False)
    transactional_id: str | None = field(init=False, default=None)

    async def prepare(self) -> None:
        """Load models and state before the service reports SERVING."""

    def apis(self) -> Sequence[GrpcApi]:
        return ()

    def server_options(self) -> Sequence[tuple[str, Any]]:
        """gRPC server options (e.g. the gateway's receive limit); none by default."""
        return ()

    async def connect(self, runtime: Runtime) -> Sequence[Consumer]:
        return ()

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        """Long-running tasks other than consumers (e.g. the gateway's reply reader)."""
        return ()

    async def close(self) -> None:
        """Release what `prepare` loaded."""


async def serve(service: Service) -> None:
    settings = service.settings
    name = service.name
    kafka_security.configure(settings)  # every client this service builds uses its settings
    start_http_server(settings.metrics_port(name), addr=settings.host)

    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), MetricsInterceptor(name)],
        options=service.server_options(),
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [api.name for api in service.apis()]
    for api in service.apis():
        api.register(api.servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.grpc_port(name)}"
    if tls.open_port(server, address, settings) == 0:
        raise SystemExit(f"{name}: cannot listen on {address} (SLUICE_{name.upper()}_PORT)")
    await _set_status(health_servicer, names, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("grpc listening", address=address, metrics_port=settings.metrics_port(name))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def start_up() -> tuple[AIOKafkaProducer, list[Consumer], list[asyncio.Task[None]]]:
        await service.prepare()
        producer = await start_producer(settings.bootstrap, name, service.transactional_id)
        runtime = Runtime(settings, name, Codec(load_plan(settings.topics_file)), producer)
        consumers = list(await service.connect(runtime))
        background = list(await service.background(runtime))
        return producer, consumers, background

    # SIGTERM must work even while we are still waiting for Kafka.
    starting = asyncio.create_task(start_up())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopper], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop(grace=0)
        await service.close()
        log.info("stopped before start-up finished")
        return
    producer, consumers, background = starting.result()
    consuming = [asyncio.create_task(c.run(), name=f"consumer:{c.group_id}") for c in consumers]
    groups = {c.group_id: tuple(getattr(c, "topics", ())) for c in consumers}
    background.append(asyncio.create_task(export_lag(settings.bootstrap, name, groups), name="lag"))
    await _set_status(health_servicer, names, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", consumers=[c.group_id for c in consumers])

    done, _ = await asyncio.wait([stopper, *consuming, *background], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            log.error("task died, shutting down", task=task.get_name(), error=repr(task.exception()))

    log.info("draining")
    await _set_status(health_servicer, names, health_pb2.HealthCheckResponse.NOT_SERVING)
    for consumer in consumers:
        await consumer.stop()
    await server.stop(grace=settings.drain_timeout_s / 2)
    if consuming:
        _, unfinished = await asyncio.wait(consuming, timeout=settings.drain_timeout_s)
        for task in unfinished:
            task.cancel()
    for task in background:
        task.cancel()
    await asyncio.gather(*consuming, *background, return_exceptions=True)
    await producer.stop()
    await service.close()
    log.info("stopped")


async def _set_status(servicer: health_aio.HealthServicer, names: Sequence[str], status: Any) -> None:
    await servicer.set("", status)
    for name in names:
        await servicer.set(name, status)


def run(service: Service) -> None:
    logs.configure(service.name, service.settings.log_level)
    tracing.configure(service.name, service.settings)
    asyncio.run(serve(service))
