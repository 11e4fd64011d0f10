"""Inference: runs assembled prompts on each model pool's engine and streams tokens back.

Each model pool is one consumer group (`sluice-inference-<pool>`) on
sluice.prompts.v1 and, with spare capacity only, sluice.prompts-batch.v1. A
pool keeps up to its engine's capacity of prompts in flight and pauses its
partitions when full, so waiting prompts stay in Kafka. Cancels come from
sluice.control.v1; started/finished markers on sluice.inference-attempts.v1
make a crashed worker's prompts re-run as the next attempt. See docs/inference.md.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import TopicPartition

from services.inference import metrics
from services.inference.attempts import AttemptBook
from services.inference.control import CancelBoard, ControlReader
from services.inference.engine import Engine, EngineLoadError
from services.inference.engines import build_engine
from services.inference.worker import PoolWorker
from services.redaction.boundary import Boundary, load_output_boundary
from sluice.config import ConfigError, Settings
from sluice.kafka_inflight import InFlightConsumer
from sluice.logs import get_logger
from sluice.service import Consumer, Context, GrpcApi, Runtime, Service
from sluice.topics import PROMPTS, PROMPTS_BATCH
from sluice.v1 import inference_pb2, inference_pb2_grpc

log = get_logger()


@dataclass
class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    engines: dict[str, Engine]

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    name=name, engine=engine.kind, context_tokens=engine.context_tokens, slots=engine.capacity
                )
                for name, engine in self.engines.items()
            ]
        )


def served_pools(settings: Settings) -> list[str]:
    """Canonical pool names this worker serves (SLUICE_INFERENCE_POOLS, default: all models)."""
    catalog = settings.catalog
    if not settings.inference_pools:
        return list(catalog.models)
    pools = []
    for name in settings.inference_pools:
        canonical = catalog.resolve(name)
        if canonical is None or not name:
            raise ConfigError(f"SLUICE_INFERENCE_POOLS: {name!r} is not a model or alias in the catalog")
        pools.append(canonical)
    return list(dict.fromkeys(pools))


class InferenceService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "inference"
        if settings.inference_drain_grace_s + 5 > settings.drain_timeout_s:
            # serve() cancels consumers after drain_timeout_s: the hand-back must fit inside it.
            raise ConfigError(
                f"SLUICE_INFERENCE_DRAIN_GRACE_S: {settings.inference_drain_grace_s} must be at least "
                f"5 s below SLUICE_DRAIN_TIMEOUT_S ({settings.drain_timeout_s})"
            )
        self.worker = settings.inference_worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.engines: dict[str, Engine] = {}
        self.output_boundary: Boundary | None = None
        self.board = CancelBoard(memory_s=settings.inference_cancel_memory_s)
        self.attempts: AttemptBook | None = None

    async def prepare(self) -> None:
        pools = served_pools(self.settings)
        self.output_boundary = await load_output_boundary(self.settings)
        for pool in pools:
            try:
                self.engines[pool] = await self._start_engine(pool)
            except EngineLoadError as exc:
                await self._unhealthy(pool, exc)
            log.info(
                "model loaded",
                model=pool,
                engine=self.engines[pool].kind,
                capacity=self.engines[pool].capacity,
            )

    async def _unhealthy(self, pool: str, exc: EngineLoadError) -> None:
        """Stay up but NOT_SERVING, outside every consumer group, until SIGTERM.

        `serve` reports SERVING and connects consumers only after `prepare`
        returns, so never returning keeps this worker's partitions with healthy
        workers, while health checks, the log and the metric say why. Exiting
        instead would hide the reason behind a restart loop.
        """
        metrics.ENGINE_LOAD_FAILED.labels(pool).set(1)
        log.error(
            "engine failed to load",
            model=pool,
            error=str(exc),
            action="NOT_SERVING, not joining the consumer group, until stopped",
        )
        await asyncio.Event().wait()

    async def _start_engine(self, pool: str) -> Engine:
        engine = build_engine(pool, self.settings.catalog.models[pool], self.settings)
        await engine.start()
        return engine

    async def _restart_engine(self, failed: Engine) -> Engine:
        pool = next(name for name, engine in self.engines.items() if engine is failed)
        await failed.close()
        self.engines[pool] = await self._start_engine(pool)
        log.info("engine restarted", model=pool)
        return self.engines[pool]

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                InferenceServicer(self.engines),
                inference_pb2_grpc.add_InferenceServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[Consumer]:
        self.attempts = AttemptBook(runtime.settings.bootstrap, runtime.codec, runtime.producer, self.worker)
        self.attempts.check_partitions(PROMPTS, PROMPTS_BATCH)
        consumers = []
        for pool, engine in self.engines.items():
            worker = PoolWorker(
                pool,
                self.settings,
                engine,
                runtime.producer,
                self.worker,
                self.board,
                self.attempts,
                self.output_boundary,
                restart_engine=self._restart_engine,
            )
            consumers.append(self._consumer(runtime, worker))
        return consumers

    def _consumer(self, runtime: Runtime, worker: PoolWorker) -> InFlightConsumer:
        attempts = self.attempts
        assert attempts is not None

        async def reassigned(tps: set[TopicPartition]) -> None:
            attempts.reassigned(tps)

        return InFlightConsumer(
            service=self.name,
            group_id=f"sluice-inference-{worker.pool}",
            topics=[PROMPTS],
            background_topics=[PROMPTS_BATCH],
            handler=worker.handle,
            codec=runtime.codec,
            bootstrap=runtime.settings.bootstrap,
            producer=runtime.producer,
            capacity=worker.capacity,
            grace_s=self.settings.inference_drain_grace_s,
            session_timeout_ms=self.settings.inference_session_timeout_ms,
            on_assigned=reassigned,
            on_revoked=reassigned,
        )

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        reader = ControlReader(runtime.settings.bootstrap, runtime.codec, self.board, self.worker)
        return [asyncio.create_task(reader.run(), name="control-reader")]

    async def close(self) -> None:
        if self.attempts is not None:
            await self.attempts.close()
        for engine in self.engines.values():
            await engine.close()


def build(settings: Settings) -> Service:
    return InferenceService(settings)
