"""A fixed-timing OpenAI-compatible upstream: the yardstick every load-test target is measured against.

The same server is called bare, through Sluice (inference `openai` engine) and
through a peer gateway, so the difference in latency is what each gateway adds.
For that the upstream's own timing must be exact and known:

* time to first token `ttft_ms`, then one token every `itl_ms`, `tokens` tokens;
  a request's `max_tokens` (or `max_completion_tokens`) lowers the count (never raises it);
* token i is due at the absolute deadline `start + ttft + i * itl`, where `start`
  is when the request's body was read, so a late wake-up does not push back
  the tokens after it (no cumulative sleeps). How late each token actually went
  out is recorded, and `GET /stats` reports it with the process's CPU seconds:
  the benchmark uses those to prove the upstream was far from saturated
  (a non-streamed answer is one sample, at its last token's deadline).
  Measured cost: about 2.2 ms CPU per 32-token streamed request, most of it
  the socket write per token, as in any token-streaming server.

Token i's text is `" tok<i>"`. Prompt tokens in the usage are counted by one
documented rule, `prompt_token_count`: whitespace-separated words of the prompt
(or of every message's content, for chat), at least 1.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (`stream` true or
false; a final usage chunk when `stream_options.include_usage` is true),
`GET /v1/models`, `GET /health`, `GET /stats` (`POST /stats/reset` zeroes it).

Run: `python -m loadtest.upstream --host 127.0.0.1 --port P --ttft-ms 50 --itl-ms 10 --tokens 32`,
or from Python `with run_upstream(UpstreamConfig(...)) as base_url:` (its own process, so
its CPU time is its own and it does not compete with the load generator's event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parent.parent
# Lateness samples kept for the percentiles; past this the oldest half is dropped.
MAX_LATENESS_SAMPLES = 2_000_000


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (run_upstream)
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    tokens: int = 32
    model: str = "fixed-timing"


def prompt_token_count(text: str) -> int:
    """The usage's prompt_tokens: whitespace-separated words, at least 1 (deterministic, no tokenizer)."""
    return max(1, len(text.split()))


def token_text(i: int) -> str:
    return f" tok{i}"


@dataclass
class Stats:
    """What /stats reports: load served, concurrency, token lateness and CPU."""

    started: int = 0
    served: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    tokens: int = 0
    lateness_s: list[float] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    cpu_at_reset: float = 0.0

    def late(self, seconds: float) -> None:
        self.lateness_s.append(seconds)
        if len(self.lateness_s) > MAX_LATENESS_SAMPLES:
            del self.lateness_s[: MAX_LATENESS_SAMPLES // 2]

    def report(self, config: UpstreamConfig) -> dict[str, Any]:
        late = np.asarray(self.lateness_s, dtype=float) * 1000.0
        lateness = {"count": int(late.size), "p50": 0.0, "p99": 0.0, "max": 0.0}
        if late.size:
            lateness.update(
                p50=float(np.percentile(late, 50)), p99=float(np.percentile(late, 99)), max=float(late.max())
            )
        cpu = cpu_seconds()
        return {
            "config": asdict(config),
            "requests_started": self.started,
            "requests_served": self.served,
            "requests_failed": self.failed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens_emitted": self.tokens,
            "token_lateness_ms": lateness,
            "cpu_seconds": cpu - self.cpu_at_reset,
            "cpu_seconds_total": cpu,
            "wall_seconds": time.monotonic() - self.since,
        }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class _Request:
    chat: bool
    stream: bool
    include_usage: bool
    tokens: int
    finish_reason: str
    prompt_tokens: int
    model: str


class BadRequest(ValueError):
    pass


def _parse(body: Any, chat: bool, config: UpstreamConfig) -> _Request:
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: must be a non-empty list")
        text = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            raise BadRequest("prompt: must be a string")
        text = prompt
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    tokens = config.tokens
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise BadRequest("max_tokens: must be a positive integer")
        tokens = min(tokens, limit)
    options = body.get("stream_options") or {}
    return _Request(
        chat=chat,
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        tokens=tokens,
        finish_reason="length" if tokens < config.tokens else "stop",
        prompt_tokens=prompt_token_count(text),
        model=str(body.get("model") or config.model),
    )


def _usage(req: _Request) -> dict[str, int]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.tokens,
        "total_tokens": req.prompt_tokens + req.tokens,
    }


def _choice(req: _Request, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.stats = Stats()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.report)
        app.router.add_post("/stats/reset", self.reset)
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, _: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "loadtest"}
        return web.json_response({"object": "list", "data": [model]})

    async def report(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats.report(self.config))

    async def reset(self, _: web.Request) -> web.Response:
        self.stats = Stats(cpu_at_reset=cpu_seconds())
        return web.json_response({"reset": True})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        try:
            req = _parse(await request.json(), chat, self.config)
        except (BadRequest, json.JSONDecodeError) as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "code": None}
            return web.json_response({"error": error}, status=400)
        start = loop.time()
        stats = self.stats
        stats.started += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if req.stream:
                response = await self._stream(request, req, start)
            else:
                response = await self._whole(req, start)
            stats.served += 1
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            stats.failed += 1
            raise
        finally:
            stats.in_flight -= 1

    async def _until(self, deadline: float) -> None:
        """Sleep to an absolute loop-time deadline and record how late the wake-up was."""
        loop = asyncio.get_running_loop()
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.stats.late(max(0.0, loop.time() - deadline))

    def _deadline(self, start: float, i: int) -> float:
        return start + (self.config.ttft_ms + i * self.config.itl_ms) / 1000.0

    async def _stream(self, request: web.Request, req: _Request, start: float) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        ident = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        for i in range(req.tokens):
            await self._until(self._deadline(start, i))
            finish = req.finish_reason if i == req.tokens - 1 else None
            chunk: dict[str, Any] = {**head, "choices": [_choice(req, token_text(i), finish, first=i == 0)]}
            if req.include_usage:
                chunk["usage"] = None
            await response.write(_sse(chunk))
            self.stats.tokens += 1
        if req.include_usage:
            await response.write(_sse({**head, "choices": [], "usage": _usage(req)}))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response

    async def _whole(self, req: _Request, start: float) -> web.Response:
        await self._until(self._deadline(start, req.tokens - 1))
        self.stats.tokens += req.tokens
        text = "".join(token_text(i) for i in range(req.tokens))
        choice: dict[str, Any]
        if req.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": req.finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": req.finish_reason, "logprobs": None}
        body = {
            "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "usage": _usage(req),
        }
        return web.json_response(body)


def serve(config: UpstreamConfig) -> None:
    """Run in this process until interrupted (the CLI and run_upstream's subprocess)."""
    web.run_app(
        Upstream(config).app(),
        host=config.host,
        port=config.port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=1.0,
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def fetch_stats(base_url: str) -> dict[str, Any]:
    """GET /stats of a running upstream, given its base URL (".../v1")."""
    root = base_url.removesuffix("/v1")
    result: dict[str, Any] = httpx.get(f"{root}/stats", timeout=10).json()
    return result


def reset_stats(base_url: str) -> None:
    httpx.post(f"{base_url.removesuffix('/v1')}/stats/reset", timeout=10).raise_for_status()


@contextmanager
def run_upstream(config: UpstreamConfig, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Start the upstream in a subprocess (its own core time) and yield its base URL, ".../v1"."""
    port = config.port or _free_port(config.host)
    command = [
        sys.executable,
        "-m",
        "loadtest.upstream",
        f"--host={config.host}",
        f"--port={port}",
        f"--ttft-ms={config.ttft_ms}",
        f"--itl-ms={config.itl_ms}",
        f"--tokens={config.tokens}",
        f"--model={config.model}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    root = f"http://{config.host}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"upstream exited with code {process.returncode} before it was healthy")
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"upstream not healthy on {root} after {startup_timeout_s} s")
            time.sleep(0.05)
        yield f"{root}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="time to first token")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="delay between tokens")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per answer")
    parser.add_argument("--model", default="fixed-timing")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.ttft_ms < 0 or args.itl_ms < 0:
        parser.error("--tokens must be >= 1, --ttft-ms and --itl-ms >= 0")
    serve(UpstreamConfig(args.host, args.port, args.ttft_ms, args.itl_ms, args.tokens, args.model))


if __name__ == "__main__":
    main()
