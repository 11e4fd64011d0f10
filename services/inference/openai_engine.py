"""A remote OpenAI-compatible streaming server as an engine (trtllm-serve, vLLM, llama.cpp server).

Each request is one `POST /v1/completions` with the already-templated prompt,
`stream: true` and `stream_options: {include_usage: true}`, read as server-sent
events (httpx + httpx-sse).

* **Usage.** Taken from the final usage chunk when the server sends one
  (trtllm-serve and vLLM do; `prompt_tokens_details.cached_tokens` too). When
  it does not (llama-cpp-python's server ignores `stream_options`), Sluice
  counts: prompt tokens with the model's own tokenizer (the catalog `source`
  GGUF, the one the prompts service fitted the prompt with) and one completion
  token per streamed text chunk (these servers send one chunk per token, but a
  chunk may hold several when text was held back). Such a result says
  `usage_exact=False`.
* **Abort.** Closing the HTTP stream; the servers stop generating when the
  client goes away.
* **Capacity.** `max_concurrency` from the catalog: the worker never sends
  more; the connection pool holds no more than that either.
* **Context.** The prompt is counted locally before sending, so a too-long
  prompt is refused (PromptTooLong) before it takes capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import llama_cpp
from httpx_sse import SSEError, aconnect_sse

from services.inference.engine import (
    EngineLoadError,
    FinishReason,
    GenerationResult,
    Health,
    PromptTooLong,
    Sampling,
    TokenEvent,
)
from services.inference.engine_support import (
    GeneratedStream,
    Generation,
    InFlight,
    TracksInFlight,
    check_prompt_fits,
    validate_sampling,
)
from services.inference.llamacpp_engine import tokenize_prompt
from sluice.engine_specs import OpenAISettings

__all__ = ["OpenAIEngine"]

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


class ServerError(RuntimeError):
    """The server failed a request (5xx, an error event, or a broken stream)."""


class _RemoteGeneration(Generation):
    def __init__(self, engine: OpenAIEngine, prompt: str, prompt_tokens: int, sampling: Sampling) -> None:
        self._engine = engine
        self._prompt = prompt
        self._counted_prompt = prompt_tokens
        self._sampling = sampling
        self._response: httpx.Response | None = None
        self._interrupted = False
        self._chunks = 0
        self._usage: dict[str, Any] | None = None
        self._finish: FinishReason | None = None
        self._stop_sequence: str | None = None

    def _body(self) -> dict[str, Any]:
        s = self._sampling
        body: dict[str, Any] = {
            "model": self._engine.remote_model,
            "prompt": self._prompt,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    async def events(self) -> AsyncIterator[TokenEvent]:
        client = self._engine._require_client()
        try:
            async with aconnect_sse(client, "POST", "/v1/completions", json=self._body()) as source:
                self._response = source.response
                if self._interrupted:
                    return
                if source.response.status_code != 200:
                    await _raise_for_status(source.response)
                async for sse in source.aiter_sse():
                    if sse.data.strip() == "[DONE]":
                        break
                    event = self._parse(sse.data)
                    if event is not None:
                        yield event
                if self._finish is None and not self._interrupted:
                    # llama.cpp's server answers 200 and then ends the stream when the request fails.
                    raise ServerError(f"stream from {self._engine.base_url} ended without a finish reason")
        except (httpx.HTTPError, SSEError) as exc:
            if self._interrupted:
                return  # we closed the stream ourselves (abort)
            raise ServerError(f"stream from {self._engine.base_url} failed: {exc!r}") from exc

    def _parse(self, data: str) -> TokenEvent | None:
        chunk = json.loads(data)
        if "error" in chunk:
            raise ServerError(f"server error event: {_error_kind(chunk['error'])}")
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or ():
            text += choice.get("text") or ""
            reason = choice.get("finish_reason")
            if reason:
                self._finish = _FINISH.get(reason, "cancelled")
                stop = choice.get("stop_reason")
                self._stop_sequence = stop if isinstance(stop, str) else None
        if not text:
            return None
        self._chunks += 1
        return TokenEvent(text, None, 1)

    def interrupt(self) -> None:
        self._interrupted = True
        response = self._response
        if response is not None and not response.is_closed:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing is reading it
                asyncio.get_running_loop().create_task(response.aclose())

    def outcome(self, finished: bool) -> GenerationResult:
        finish: FinishReason = (
            self._finish if finished and self._finish is not None and not self._interrupted else "cancelled"
        )
        usage = self._usage
        if usage is not None:
            details = usage.get("prompt_tokens_details") or {}
            return GenerationResult(
                finish_reason=finish,
                prompt_tokens=int(usage.get("prompt_tokens", self._counted_prompt)),
                completion_tokens=int(usage.get("completion_tokens", self._chunks)),
                cached_tokens=int(details.get("cached_tokens") or 0),
                stop_sequence=self._stop_sequence if finish == "stop" else None,
            )
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=self._counted_prompt,
            completion_tokens=self._chunks,
            stop_sequence=self._stop_sequence if finish == "stop" else None,
            usage_exact=False,
        )


async def _raise_for_status(response: httpx.Response) -> None:
    """A refused request: 4xx is the request's fault (ValueError), anything else the server's.

    The body is never quoted: validation errors echo the request, prompt included.
    """
    body = (await response.aread()).decode("utf-8", errors="replace").lower()
    detail = f"HTTP {response.status_code} from {response.request.url.path}"
    if 400 <= response.status_code < 500:
        if "context" in body or "too long" in body or "exceed" in body:
            raise PromptTooLong(f"server refused the prompt as too long for the context: {detail}")
        raise ValueError(f"server refused the request: {detail}")
    raise ServerError(detail)


def _error_kind(error: object) -> str:
    """Type and code of an error event (its message may quote the prompt)."""
    if isinstance(error, dict):
        return f"type={error.get('type')!s} code={error.get('code')!s}"
    return type(error).__name__


class OpenAIEngine(TracksInFlight):
    """An OpenAI-compatible `/v1/completions` server behind the Engine interface."""

    kind: str = "openai"

    def __init__(
        self,
        settings: OpenAISettings,
        model_name: str,
        context_tokens: int,
        tokenizer_gguf: Path,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the network (tests replaying a recorded stream); None in service."""
        self._settings = settings
        self._transport = transport
        self.base_url = settings.base_url
        self.remote_model = settings.model or model_name
        self.context_tokens = context_tokens
        self.model_version = f"{self.remote_model}@{urlsplit(self.base_url).netloc}"
        self._tokenizer_gguf = tokenizer_gguf
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: llama_cpp.Llama | None = None
        self._closed = False
        self._table = InFlight()

    async def start(self) -> None:
        """Load the local tokenizer, then require the server to answer its health check."""
        if self._client is not None:
            return
        try:
            self._tokenizer = await asyncio.to_thread(
                llama_cpp.Llama, model_path=str(self._tokenizer_gguf), vocab_only=True, verbose=False
            )
        except Exception as exc:
            raise EngineLoadError(f"cannot load the tokenizer {str(self._tokenizer_gguf)!r}: {exc}") from exc
        s = self._settings
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            transport=self._transport,
            timeout=httpx.Timeout(s.read_timeout_s, connect=s.connect_timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency
            ),
        )
        health = await self.health()
        if not health.ok:
            await self._client.aclose()
            self._client = None
            raise EngineLoadError(f"OpenAI-compatible server {self.base_url} is not serving: {health.detail}")
        self.model_version = await self._served_version()

    async def _served_version(self) -> str:
        """`<model id the server reports>@<host>`: which build answered (best effort)."""
        try:
            listing = (await self._require_client().get("/v1/models")).json()
            ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        except (httpx.HTTPError, ValueError, AttributeError):
            return self.model_version
        served = self.remote_model if self.remote_model in ids else (ids[0] if len(ids) == 1 else None)
        if served is None:
            return self.model_version
        return f"{Path(served).name}@{urlsplit(self.base_url).netloc}"

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("engine is closed" if self._closed else "engine is not started")
        return self._client

    def count_tokens(self, prompt: str) -> int:
        if self._tokenizer is None:
            raise RuntimeError("engine is not started")
        return len(tokenize_prompt(self._tokenizer, prompt))

    def stream(self, request_id: str, prompt: str, sampling: Sampling) -> GeneratedStream:
        self._require_client()
        validate_sampling(sampling, self.context_tokens)
        prompt_tokens = self.count_tokens(prompt)
        check_prompt_fits(prompt_tokens, sampling.max_tokens, self.context_tokens)
        generation = _RemoteGeneration(self, prompt, prompt_tokens, sampling)
        return GeneratedStream(request_id, generation, self._table)

    @property
    def capacity(self) -> int:
        return self._settings.max_concurrency

    async def health(self) -> Health:
        if self._client is None:
            return Health(False, "closed" if self._closed else "not started")
        path = self._settings.health_path
        try:
            response = await self._client.get(path, timeout=self._settings.connect_timeout_s)
        except httpx.HTTPError as exc:
            return Health(False, f"GET {path}: {exc!r}")
        if response.status_code != 200:
            return Health(False, f"GET {path}: HTTP {response.status_code}")
        return Health(True, f"{self.in_flight}/{self.capacity} in flight")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.interrupt_all()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        if self._tokenizer is not None:
            self._tokenizer.close()
