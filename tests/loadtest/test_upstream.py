"""The fixed-timing upstream: exact token counts, real SSE framing, the usage chunk, /stats.

It runs as its own process (run_upstream), as the benchmark starts it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loadtest.upstream import UpstreamConfig, fetch_stats, prompt_token_count, reset_stats, run_upstream

TOKENS = 7


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with run_upstream(UpstreamConfig(ttft_ms=5, itl_ms=1, tokens=TOKENS, model="fixed")) as base_url:
        yield base_url


def sse_events(base_url: str, path: str, body: dict[str, Any]) -> tuple[str, list[str]]:
    """The raw text of a streamed answer and its `data:` payloads, in order."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream ends with a complete event"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payloads.append(event.removeprefix("data: "))
    return raw, payloads


def chat(content: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": "fixed", "messages": [{"role": "user", "content": content}], "stream": True, **extra}


def test_chat_stream_has_exact_tokens_sse_framing_and_a_usage_chunk(upstream: str) -> None:
    _, payloads = sse_events(upstream, "/chat/completions", chat(stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert len(tokens) == TOKENS
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == "".join(
        f" tok{i}" for i in range(TOKENS)
    )
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * (TOKENS - 1) + ["stop"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": TOKENS, "total_tokens": 3 + TOKENS}


def test_no_usage_chunk_unless_asked(upstream: str) -> None:
    _, payloads = sse_events(upstream, "/chat/completions", chat())
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == TOKENS
    assert all("usage" not in c for c in chunks)


def test_max_tokens_lowers_the_count_but_never_raises_it(upstream: str) -> None:
    body = {"prompt": "a b", "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    _, payloads = sse_events(upstream, "/completions", body)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" tok0", " tok1", " tok2"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    whole = httpx.post(f"{upstream}/completions", json={"prompt": "a", "max_tokens": 1000}, timeout=30).json()
    assert whole["usage"]["completion_tokens"] == TOKENS
    assert whole["choices"][0]["text"] == "".join(f" tok{i}" for i in range(TOKENS))
    assert whole["choices"][0]["finish_reason"] == "stop"


def test_non_streaming_chat_and_models(upstream: str) -> None:
    body = httpx.post(f"{upstream}/chat/completions", json={**chat(), "stream": False}, timeout=30).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].split() == [f"tok{i}" for i in range(TOKENS)]
    assert body["usage"]["prompt_tokens"] == 3
    models = httpx.get(f"{upstream}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["fixed"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/chat/completions", {"messages": []}, "messages"),
        ("/completions", {"prompt": 5}, "prompt"),
        ("/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    upstream: str, path: str, body: dict[str, Any], field: str
) -> None:
    response = httpx.post(f"{upstream}{path}", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(f"{field}:")


def test_prompt_tokens_rule() -> None:
    assert prompt_token_count("  one\ttwo\nthree ") == 3
    assert prompt_token_count("") == 1


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[str]:
    """A first token 5 s away, so streams the test opens stay open until it has looked at /stats."""
    with run_upstream(UpstreamConfig(ttft_ms=5000, itl_ms=1, tokens=TOKENS)) as base_url:
        yield base_url


async def test_stats_count_lateness_per_token_and_concurrent_streams(slow_upstream: str) -> None:
    upstream = slow_upstream
    reset_stats(upstream)
    streams = 12
    async with httpx.AsyncClient(timeout=60) as client:
        # Headers go out at once, tokens only after the TTFT: all streams are open together here.
        opened = [client.stream("POST", f"{upstream}/chat/completions", json=chat()) for _ in range(streams)]
        responses = await asyncio.gather(*(s.__aenter__() for s in opened))
        held = await asyncio.to_thread(fetch_stats, upstream)
        bodies = [await r.aread() for r in responses]
        for s in opened:
            await s.__aexit__(None, None, None)
    assert all(b.count(b"data: ") == TOKENS + 1 for b in bodies)
    stats = await asyncio.to_thread(fetch_stats, upstream)
    assert held["in_flight"] == streams and held["tokens_emitted"] == 0
    assert stats["max_in_flight"] == streams and stats["in_flight"] == 0
    assert stats["requests_served"] == streams
    assert stats["tokens_emitted"] == streams * TOKENS
    lateness = stats["token_lateness_ms"]
    assert lateness["count"] == streams * TOKENS
    assert 0 <= lateness["p50"] <= lateness["p99"] <= lateness["max"]
    assert stats["cpu_seconds"] > 0
