"""Output redaction analysed in shared batches: concurrent streams, one analysis each round.

The inference worker's streams await `StreamRedactor.push_async`, which goes
through the boundary's MicroBatcher. The analyzer here is the real one, wrapped
only to count its calls (one call = one nlp.pipe batch).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

import pytest
from threadpoolctl import threadpool_info

from services.redaction.analyzer import Job, RedactionError, Redactor
from services.redaction.boundary import (
    Boundary,
    boundary_from_settings,
    output_redactor,
    redact_chunk_async,
)
from services.redaction.streaming import StreamRedactor, _context_tail
from sluice.config import Settings
from sluice.kafka import RequestFailed
from tests.redaction.planted_answers import PEOPLE, answer, pieces


class CountingFindMany:
    """The real analyzer's find_many, counting how many jobs each call (batch) held."""

    def __init__(self, redactor: Redactor, fail_on: str | None = None) -> None:
        self.real = redactor.find_many
        self.jobs_per_call: list[int] = []
        self.fail_on = fail_on

    def __call__(self, jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        self.jobs_per_call.append(len(jobs))
        if self.fail_on and any(self.fail_on in text for job in jobs for text in job.texts):
            raise RedactionError("PII analysis failed: RuntimeError")
        return self.real(jobs, **kwargs)


@pytest.fixture
def counted(loaded_redactor: Redactor, monkeypatch: pytest.MonkeyPatch) -> CountingFindMany:
    counting = CountingFindMany(loaded_redactor)
    monkeypatch.setattr(loaded_redactor, "find_many", counting)
    return counting


@pytest.fixture
def fresh(settings: Settings, loaded_redactor: Redactor) -> Boundary:
    """A boundary of its own: its MicroBatcher belongs to this test's event loop."""
    made = boundary_from_settings(settings)
    made.loaded(loaded_redactor)
    return made


async def stream_through(stream: StreamRedactor, chunks: list[str]) -> list[str]:
    released = [await redact_chunk_async(stream, chunk, final=False) for chunk in chunks]
    released.append(await redact_chunk_async(stream, "", final=True))
    return released


async def test_concurrent_streams_share_batches_and_split_entities_never_escape(
    fresh: Boundary, counted: CountingFindMany
) -> None:
    streams = [output_redactor(fresh, "demo", 64) for _ in PEOPLE]
    sizes = [1, 2, 3, 1, 2, 3]
    results = await asyncio.gather(
        *(
            stream_through(stream, pieces(answer(name, email), size))
            for stream, (name, email), size in zip(streams, PEOPLE, sizes, strict=True)
        )
    )
    for released, (name, email) in zip(results, PEOPLE, strict=True):
        whole = "".join(released)
        assert whole.startswith(
            "Sure! I spoke with <PERSON> yesterday; write to <EMAIL_ADDRESS> or call <PHONE_NUMBER>"
        )
        assert whole.endswith(", thanks.")
        for secret in (name, email, "7946 0958"):
            assert secret not in whole
            # No released piece holds a recognisable part of a value either.
            assert all(secret[: len(secret) // 2 + 1] not in piece for piece in released)
    # The streams were analysed together: the first round was one batch of all of them,
    # and there were fewer analyzer calls than analyses.
    assert max(counted.jobs_per_call) == len(PEOPLE)
    assert len(counted.jobs_per_call) < sum(counted.jobs_per_call)


@pytest.mark.parametrize("size", [1, 4, 9])
async def test_the_batched_path_releases_exactly_what_the_synchronous_one_does(
    fresh: Boundary, size: int
) -> None:
    text = (
        answer("Jane Roe", "jane.roe@example.org")
        + " Dr. Ana Silva lives in Paris. Key AKIAIOSFODNN7EXAMPLE ok."
    )
    sync = output_redactor(fresh, "demo", 64)
    expected = [sync.push(chunk) for chunk in pieces(text, size)] + [sync.finish()]
    assert await stream_through(output_redactor(fresh, "demo", 64), pieces(text, size)) == expected
    assert "AKIA" not in "".join(expected) and "Jane" not in "".join(expected)


async def test_overlapping_pushes_on_one_stream_are_taken_in_turn(fresh: Boundary) -> None:
    text = answer("Jane Roe", "jane.roe@example.org")
    sync = output_redactor(fresh, "demo", 64)
    expected = "".join([sync.push(chunk) for chunk in pieces(text, 6)] + [sync.finish()])
    stream = output_redactor(fresh, "demo", 64)
    released = await asyncio.gather(*(stream.push_async(chunk) for chunk in pieces(text, 6)))
    assert "".join(released) + await stream.push_async("", final=True) == expected


async def test_one_stream_failing_its_analysis_fails_closed_and_the_others_go_on(
    fresh: Boundary, loaded_redactor: Redactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingFindMany(loaded_redactor, fail_on="POISON")
    monkeypatch.setattr(loaded_redactor, "find_many", counting)
    good = [output_redactor(fresh, "demo", 64) for _ in range(3)]
    bad = output_redactor(fresh, "demo", 64)
    text = answer("Jane Roe", "jane.roe@example.org")
    results = await asyncio.gather(
        *(stream_through(stream, pieces(text, 5)) for stream in good),
        stream_through(bad, pieces("this stream says POISON soon and then Jane Roe", 5)),
        return_exceptions=True,
    )
    failure = results[-1]
    assert isinstance(failure, RequestFailed) and failure.code == "UNAVAILABLE"
    assert str(failure) == "output redaction: PII analysis failed: RuntimeError"
    for released in results[:-1]:
        assert isinstance(released, list) and "Jane Roe" not in "".join(released)
        assert "".join(released).endswith(", thanks.")
    assert max(counting.jobs_per_call) > 1  # the poisoned batch was shared, then retried alone


async def test_past_the_deadline_or_without_a_model_the_stream_fails_closed(
    settings: Settings, fresh: Boundary
) -> None:
    fresh.deadline_s = 0.0
    stream = output_redactor(fresh, "demo", 64)
    with pytest.raises(RequestFailed) as late:
        await redact_chunk_async(stream, "Hello Jane Roe, how are you? ", final=False)
    assert late.value.code == "DEADLINE_EXCEEDED"
    assert str(late.value) == "output redaction: deadline: PII analysis did not finish in time"

    unloaded = boundary_from_settings(settings)
    with pytest.raises(RequestFailed) as missing:
        await redact_chunk_async(output_redactor(unloaded, "demo", 64), "some words here ", final=True)
    assert missing.value.code == "UNAVAILABLE"
    assert str(missing.value) == "output redaction: redaction model is not loaded"


async def test_the_deadline_bounds_a_streams_analysis_not_its_wait_for_a_turn(
    fresh: Boundary, loaded_redactor: Redactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loaded_redactor.find_many

    def slow_for_one_stream(jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        if any("SLOWPOKE" in text for job in jobs for text in job.texts):
            time.sleep(2 * fresh.deadline_s)  # an analysis that overruns its deadline
        return real(jobs, **kwargs)

    monkeypatch.setattr(loaded_redactor, "find_many", slow_for_one_stream)
    fresh.deadline_s = 1.0
    slow = asyncio.create_task(
        redact_chunk_async(output_redactor(fresh, "demo", 64), "SLOWPOKE says hi ", False)
    )
    await asyncio.sleep(0.2)  # its batch is running now
    queued = asyncio.create_task(
        redact_chunk_async(output_redactor(fresh, "demo", 64), "plain words here ", False)
    )
    with pytest.raises(RequestFailed) as late:
        await slow
    assert late.value.code == "DEADLINE_EXCEEDED"
    # Waited longer than the deadline for its turn, then analysed within it: released, not failed.
    assert await queued == "plain words here "


def test_context_keeps_whole_words_only() -> None:
    assert _context_tail("short text") == "short text"
    long = "alpha " * 20 + "omega"  # 125 characters
    tail = _context_tail(long)
    assert len(tail) <= 80 and long.endswith(tail) and tail.split()[0] in ("alpha", "omega")
    assert _context_tail("x" * 200) == "x" * 80  # one long word: the last 80 characters


def test_the_analyzer_multiplies_on_one_blas_thread(loaded_redactor: Redactor) -> None:
    """OpenBLAS's spinning helper threads cost the analyzer 4-7x its CPU on a busy machine."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        pytest.skip("OPENBLAS_NUM_THREADS is set: the operator's choice stands")
    blas = threadpool_info()
    assert [b for b in blas if b["user_api"] == "blas"], "numpy's BLAS is not loaded"
    assert all(b["num_threads"] == 1 for b in blas if b["user_api"] == "blas"), blas
