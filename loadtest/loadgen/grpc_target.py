"""Sluice's gRPC API: `sluice.v1.Gateway/Generate`, server-streaming, with the caller's API key.

The first response carries the request id; each response with text is a token
event; the last carries usage and cost, so end-to-end latency here includes
the charge (as the caller sees it). A response with `restarted_attempt` means a
worker died and the answer starts over; the record counts it.
"""

from __future__ import annotations

import itertools
from typing import Any

import grpc

from loadtest.loadgen.mix import LoadRequest
from loadtest.loadgen.records import RequestRecord, Timing
from loadtest.loadgen.target import TargetBase, error_text
from sluice.v1 import envelope_pb2, gateway_pb2, gateway_pb2_grpc


class GrpcTarget(TargetBase):
    def __init__(
        self,
        address: str,
        api_key: str,
        model: str = "",
        *,
        name: str = "sluice-grpc",
        timeout_s: float = 120.0,
        max_tokens: int | None = None,
        channels: int = 1,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`model` empty means Sluice's default model; `channels` > 1 spreads streams over connections;
        `credentials` for a gateway serving TLS (sluice.tls.channel_credentials)."""
        self.name = name
        self.address = address
        self.model = model
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_s = timeout_s
        self._max_tokens = max_tokens
        self._count = channels
        self._credentials = credentials
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: itertools.cycle[gateway_pb2_grpc.GatewayStub] | None = None

    def info(self) -> dict[str, Any]:
        return {"kind": "grpc", "address": self.address, "model": self.model or "(default)"}

    async def start(self) -> None:
        if not self._channels:
            self._channels = [self._channel() for _ in range(self._count)]
            self._stubs = itertools.cycle([gateway_pb2_grpc.GatewayStub(c) for c in self._channels])

    def _channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, self._credentials)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        self._channels, self._stubs = [], None

    def _request(self, request: LoadRequest) -> gateway_pb2.GenerateRequest:
        message = gateway_pb2.GenerateRequest(
            model=self.model,
            messages=[envelope_pb2.ChatMessage(role="user", content=request.prompt)],
        )
        max_tokens = request.max_tokens or self._max_tokens
        if max_tokens:
            message.max_tokens = max_tokens
        return message

    async def send(self, request: LoadRequest) -> RequestRecord:
        await self.start()
        assert self._stubs is not None
        stub = next(self._stubs)
        timing = Timing(request.index, request.pii_planted)
        last: gateway_pb2.GenerateResponse | None = None
        try:
            call: Any = stub.Generate(  # a grpc.aio stream (the stubs are typed for sync grpc)
                self._request(request), metadata=self._metadata, timeout=self._timeout_s
            )
            async for response in call:
                if response.request_id and not timing.record.request_id:
                    timing.record.request_id = response.request_id
                if response.restarted_attempt:
                    timing.restart()
                if response.delta:
                    timing.token_event()
                last = response
        except grpc.aio.AioRpcError as exc:
            return timing.finish(exc.code().name, exc.details() or "")
        except Exception as exc:  # a broken channel must not end the run
            return timing.finish(error_text(exc), "client failure")
        if last is None or not last.finish_reason:
            return timing.finish("incomplete", "stream ended without a finish reason")
        return timing.finish(output_tokens=last.usage.completion_tokens or None)
