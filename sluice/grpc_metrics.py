"""Request rate, errors by status and latency of every gRPC method, from one interceptor.

The availability and error-rate SLOs are computed from `sluice_grpc_requests_total`;
the time-to-first-token SLO from `sluice_grpc_time_to_first_token_seconds`, observed
when a server stream first sends a response whose `delta` (generated text) is not
empty, so it measures what the caller waits for, redaction and queueing included.
Labels are the method's full name and the status code: fixed sets, no content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "sluice_grpc_requests_total", "gRPC calls handled, by final status code", ["service", "method", "code"]
)
REQUEST_SECONDS = Histogram(
    "sluice_grpc_request_seconds",
    "gRPC call duration, whole stream included",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
FIRST_TOKEN_SECONDS = Histogram(
    "sluice_grpc_time_to_first_token_seconds",
    "Time from a streaming call's start to its first response with generated text",
    ["service", "method"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)


def _code(context: Any, error: BaseException | None) -> str:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio reports the numeric code after an abort
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK" if error is None else grpc.StatusCode.UNKNOWN.name


def _has_text(response: Any) -> bool:
    return bool(getattr(response, "delta", ""))


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times every call of the service's gRPC server."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.lstrip("/")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))  # type: ignore[attr-defined, no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, handler.stream_unary))  # type: ignore[attr-defined, no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(method, handler.unary_stream))  # type: ignore[attr-defined, no-any-return]
        return handler._replace(stream_stream=self._stream(method, handler.stream_stream))  # type: ignore[attr-defined, no-any-return]

    def _record(self, method: str, started: float, context: Any, error: BaseException | None) -> None:
        REQUESTS.labels(self.service, method, _code(context, error)).inc()
        REQUEST_SECONDS.labels(self.service, method).observe(time.perf_counter() - started)

    def _unary(self, method: str, behavior: Any) -> Any:
        async def observed(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(method, started, context, error)

        return observed

    def _stream(self, method: str, behavior: Any) -> Any:
        async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            error: BaseException | None = None
            waiting_for_text = True
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        if waiting_for_text and _has_text(response):
                            waiting_for_text = False
                            FIRST_TOKEN_SECONDS.labels(self.service, method).observe(
                                time.perf_counter() - started
                            )
                        yield response
                else:  # a handler that writes with context.write() and returns
                    await result
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(method, started, context, error)

        return observed
