"""An OpenAI-compatible streaming endpoint over httpx: the bare upstream, or a peer gateway (LiteLLM).

`POST {base_url}/chat/completions` with `stream: true` and
`stream_options.include_usage`; each SSE chunk with content is a token event,
and the usage chunk, when the server sends one, gives the output token count.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from loadtest.loadgen.mix import LoadRequest
from loadtest.loadgen.records import RequestRecord, Timing
from loadtest.loadgen.target import TargetBase, error_text


class OpenAITarget(TargetBase):
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        name: str = "openai",
        timeout_s: float = 120.0,
        max_tokens: int | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._max_tokens = max_tokens
        self._client: httpx.AsyncClient | None = None

    def info(self) -> dict[str, Any]:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model}

    async def start(self) -> None:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self._timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000),
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _body(self, request: LoadRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        max_tokens = request.max_tokens or self._max_tokens
        if max_tokens:
            body["max_tokens"] = max_tokens
        return body

    async def send(self, request: LoadRequest) -> RequestRecord:
        await self.start()
        assert self._client is not None
        timing = Timing(request.index, request.pii_planted)
        usage_tokens: int | None = None
        finished = False
        try:
            async with aconnect_sse(
                self._client, "POST", "/chat/completions", json=self._body(request)
            ) as sse:
                if sse.response.status_code != 200:
                    await sse.response.aread()
                    return timing.finish(str(sse.response.status_code), "HTTP error")
                async for event in sse.aiter_sse():
                    if event.data.strip() == "[DONE]":
                        break
                    chunk = json.loads(event.data)
                    if chunk.get("error"):
                        return timing.finish("stream_error", "error event in the stream")
                    if chunk.get("usage"):
                        usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    for choice in chunk.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            timing.token_event()
                        finished = finished or bool(choice.get("finish_reason"))
        except (httpx.HTTPError, SSEError, json.JSONDecodeError) as exc:
            return timing.finish(error_text(exc), "transport or stream failure")
        if not finished:
            return timing.finish("incomplete", "stream ended without a finish reason")
        return timing.finish(output_tokens=usage_tokens)
