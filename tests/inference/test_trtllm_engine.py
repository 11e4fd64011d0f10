"""TrtLlmEngine over the fake `tensorrt_llm` (tests/inference/fake_tensorrt_llm; see its docstring).

The fake goes on sys.path only inside these tests (the `trtllm` fixture), which
also proves the adapter imports tensorrt_llm only when it is selected.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.inference.engine import EngineLoadError, GenerationResult, Sampling, TokenEvent
from services.inference.trtllm_engine import TrtLlmEngine
from sluice.engine_specs import TrtllmSettings
from tests.inference.engine_fixtures import fake_tensorrt_llm, trtllm_checkpoint

pytestmark = pytest.mark.timeout(120)

CONTEXT = 1024


@pytest.fixture
def trtllm() -> Iterator[None]:
    with fake_tensorrt_llm():
        yield


@pytest_asyncio.fixture
async def engine(trtllm: None, tmp_path: Path) -> AsyncIterator[TrtLlmEngine]:
    eng = TrtLlmEngine(
        TrtllmSettings(model_dir=str(trtllm_checkpoint(tmp_path / "ckpt")), max_batch_size=2), CONTEXT
    )
    await eng.start()
    yield eng
    await eng.close()


async def _collect(
    engine: TrtLlmEngine, prompt: str, sampling: Sampling, rid: str
) -> tuple[list[TokenEvent], GenerationResult, float, float]:
    stream = engine.stream(rid, prompt, sampling)
    events: list[TokenEvent] = []
    first = 0.0
    async for ev in stream:
        first = first or time.perf_counter()
        events.append(ev)
    return events, stream.result, first, time.perf_counter()


async def test_not_installed_is_a_load_error(tmp_path: Path) -> None:
    assert "tensorrt_llm" not in sys.modules
    eng = TrtLlmEngine(TrtllmSettings(model_dir=str(trtllm_checkpoint(tmp_path / "ckpt"))), CONTEXT)
    with pytest.raises(EngineLoadError, match="tensorrt_llm package is not installed"):
        await eng.start()
    assert not (await eng.health()).ok


async def test_bad_model_dir_is_a_load_error(trtllm: None, tmp_path: Path) -> None:
    eng = TrtLlmEngine(TrtllmSettings(model_dir=str(tmp_path / "missing")), CONTEXT)
    with pytest.raises(EngineLoadError, match="missing"):
        await eng.start()


async def test_loads_with_catalog_settings(engine: TrtLlmEngine, tmp_path: Path) -> None:
    llm = engine._llm
    assert (llm.max_batch_size, llm.max_seq_len) == (2, CONTEXT)
    assert engine.model_version.startswith("ckpt-") and len(engine.model_version) == len("ckpt-") + 12
    assert (engine.kind, engine.capacity, engine.context_tokens) == ("trtllm", 2, CONTEXT)
    assert (await engine.health()).ok


async def test_sampling_params_mapping(engine: TrtLlmEngine) -> None:
    greedy = engine._sampling_params(Sampling(8, 0.0, 0.5))
    assert (greedy.max_tokens, greedy.top_k, greedy.temperature, greedy.top_p, greedy.stop) == (
        8, 1, None, None, None,
    )  # fmt: skip
    sampled = engine._sampling_params(Sampling(8, 0.7, 0.9, stop=("\n",)))
    assert (sampled.top_k, sampled.temperature, sampled.top_p, sampled.stop) == (None, 0.7, 0.9, ["\n"])


async def test_streams_deltas_with_exact_usage(engine: TrtLlmEngine) -> None:
    events, result, _, _ = await _collect(engine, "Tell me about rivers.", Sampling(64, 0.0, 1.0), "a")
    ids = [e.token_id for e in events if e.token_id is not None]
    text = "".join(e.text for e in events)
    # Deltas, not the cumulative text: the pieces add up to the decoded tokens exactly.
    assert text == engine._llm.tokenizer.decode(ids)
    assert result.finish_reason == "stop"  # the fake model emitted its end token before max_tokens
    assert result.completion_tokens == len(ids) == sum(e.tokens for e in events)
    assert result.prompt_tokens == engine.count_tokens("Tell me about rivers.")
    assert result.cached_tokens == 0


async def test_prefix_reuse_reports_cached_tokens(engine: TrtLlmEngine) -> None:
    system = "You are a careful assistant who answers questions about rivers. " * 3
    _, first, _, _ = await _collect(engine, system + "Nile?", Sampling(4, 0.0, 1.0), "p1")
    _, second, _, _ = await _collect(engine, system + "Amazon?", Sampling(4, 0.0, 1.0), "p2")
    assert first.cached_tokens == 0
    shared = len(engine.tokenize(system))
    assert 0 < second.cached_tokens <= shared and second.cached_tokens % 32 == 0
    assert second.prompt_tokens == engine.count_tokens(system + "Amazon?")  # cached tokens are still billed


async def test_stop_string_across_tokens_is_never_shown(engine: TrtLlmEngine) -> None:
    prompt = "Describe the water."
    events, _, _, _ = await _collect(engine, prompt, Sampling(64, 0.0, 1.0), "s1")
    pieces = [e.text for e in events]
    stop = pieces[2][-2:] + pieces[3][:2]  # spans the 3rd and 4th tokens
    expected = "".join(pieces)[: "".join(pieces).find(stop)]
    events, result, _, _ = await _collect(engine, prompt, Sampling(64, 0.0, 1.0, stop=(stop,)), "s2")
    assert "".join(e.text for e in events) == expected
    assert (result.finish_reason, result.stop_sequence) == ("stop", stop)
    assert result.completion_tokens == sum(e.tokens for e in events) >= 4


async def test_requests_past_the_batch_wait_in_the_engine_queue(engine: TrtLlmEngine) -> None:
    sampling = Sampling(8, 0.0, 1.0)
    runs = await asyncio.gather(*(_collect(engine, f"River {n}?", sampling, f"q{n}") for n in range(3)))
    (_, a, a_first, a_end), (_, b, b_first, b_end), (_, c, c_first, _) = runs
    assert all(r.finish_reason in ("stop", "length") and r.completion_tokens > 0 for r in (a, b, c))
    assert a_first < b_end and b_first < a_end  # the first two share the batch
    assert c_first > min(a_end, b_end)  # the third got in when one left
    assert engine.in_flight == 0


async def test_abort_before_start_never_reaches_the_engine(engine: TrtLlmEngine) -> None:
    stream = engine.stream("early", "River?", Sampling(8, 0.0, 1.0))
    await engine.abort("early")
    assert [ev async for ev in stream] == []
    assert (stream.result.finish_reason, stream.result.completion_tokens) == ("cancelled", 0)
    assert engine.in_flight == 0


async def test_closed_engine_refuses(engine: TrtLlmEngine) -> None:
    await engine.close()
    assert not (await engine.health()).ok
    with pytest.raises(RuntimeError, match="closed"):
        engine.stream("late", "River?", Sampling(8, 0.0, 1.0))
