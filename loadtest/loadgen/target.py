"""What every load-test target does: send one request, stream its answer, return a record.

A target is long-lived (one gRPC channel, one Kafka producer and reply reader,
one HTTP client), started once and reused across runs at several rates, so
connection set-up is not measured as request latency. `send` never raises:
every failure becomes a record with a status.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from loadtest.loadgen.mix import LoadRequest
from loadtest.loadgen.records import RequestRecord


@runtime_checkable
class Target(Protocol):
    name: str

    async def start(self) -> None:
        """Connect; idempotent (run_load calls it)."""

    async def send(self, request: LoadRequest) -> RequestRecord:
        """Send one request and read its whole answer; never raises."""

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """What the report says about the target (address, model; never secrets)."""


class TargetBase:
    """start/close as an async context manager, for the concrete targets."""

    name = "target"

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> TargetBase:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def error_text(exc: BaseException) -> str:
    """An exception as a short reason: its type only, since messages may quote the request."""
    return type(exc).__name__
