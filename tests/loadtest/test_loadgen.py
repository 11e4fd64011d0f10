"""The load generator against the real fixed-timing upstream, and its report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.loadgen import OK, OpenAITarget, PromptMix, RequestRecord, RunResult, poisson_schedule, run_load
from loadtest.report import added, added_latency, summarize, write_report
from loadtest.upstream import UpstreamConfig, fetch_stats, run_upstream
from sluice.ports import free_ports

TOKENS = 6
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with run_upstream(UpstreamConfig(ttft_ms=10, itl_ms=2, tokens=TOKENS)) as base_url:
        yield base_url


def test_poisson_schedule_is_seeded_open_loop_and_inside_the_window() -> None:
    first = poisson_schedule(50, 20, seed=7)
    assert first == poisson_schedule(50, 20, seed=7)
    assert first != poisson_schedule(50, 20, seed=8)
    assert first == sorted(first) and first[0] > 0 and first[-1] < 20
    # 1000 arrivals expected; a Poisson count's standard deviation is about 32.
    assert 850 < len(first) < 1150
    gaps = np.diff(first)
    assert abs(gaps.mean() - 1 / 50) < 0.004  # exponential gaps with mean 1/rps
    with pytest.raises(ValueError):
        poisson_schedule(0, 10)


def test_prompt_mix_plants_unique_pii_in_the_chosen_fraction_deterministically() -> None:
    mix = PromptMix(pii_fraction=0.4)
    requests = mix.build(400, seed=3)
    assert requests == mix.build(400, seed=3)
    planted = [r for r in requests if r.pii_planted]
    assert 100 < len(planted) < 220
    for request in planted:
        assert len(request.pii) == 4
        assert all(value in request.prompt for value in request.pii)
    emails = [r.pii[1] for r in planted]
    assert len(set(emails)) == len(emails), "each planted email belongs to one request"
    assert all(not r.pii and r.prompt in mix.prompts for r in requests if not r.pii_planted)
    assert not any(r.pii_planted for r in PromptMix(pii_fraction=0).build(50))
    with pytest.raises(ValueError, match="pii_fraction"):
        PromptMix(pii_fraction=1.5)


async def test_run_against_the_upstream_records_every_request_and_writes_the_report(
    upstream: str, tmp_path: Path
) -> None:
    rps, duration, seed = 8.0, 3.0, 11
    mix = PromptMix(pii_fraction=0.5)
    async with OpenAITarget(upstream, "fixed-timing") as target:
        result = await run_load(target, rps=rps, duration_s=duration, mix=mix, seed=seed, progress=True)
    schedule = poisson_schedule(rps, duration, seed)
    assert len(result.records) == len(schedule) > 0
    assert [r.scheduled_s for r in result.records] == schedule
    assert [r.index for r in result.records] == list(range(len(schedule)))
    for record in result.records:
        assert record.status == OK, record
        assert record.output_tokens == TOKENS
        assert len(record.itl_s) == TOKENS - 1
        assert record.ttft_s is not None and record.e2e_s is not None
        assert 0 < record.ttft_s <= record.e2e_s
        assert record.sent_s >= record.scheduled_s  # never early
    sent = mix.build(len(schedule), seed)
    expected_pii = sorted({v for r in sent for v in r.pii})  # names and phones may repeat
    assert result.planted_pii == expected_pii and expected_pii
    assert [r.pii_planted for r in result.records] == [r.pii_planted for r in sent]
    assert result.generator_cpu_s > 0 and result.wall_s >= schedule[-1]

    result.extra["upstream"] = fetch_stats(upstream)
    report = write_report({"upstream": result}, tmp_path, title="test run")
    for name in ("latency_cdf.png", "latency_over_time.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    summary = written["targets"]["upstream"]
    assert summary["sent"] == summary["ok"] == len(schedule) and summary["errors"] == 0
    for metric in ("ttft_ms", "e2e_ms", "itl_ms", "tokens_per_s"):
        assert summary[metric]["p50"] <= summary[metric]["p95"] <= summary[metric]["p99"]
    assert summary["generator"]["cpu_s"] == result.generator_cpu_s
    assert summary["extra"]["upstream"]["requests_served"] >= len(schedule)
    again = RunResult.load(tmp_path / "records" / "upstream.json")
    assert again == result


async def test_failures_become_records_with_a_status(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    async with OpenAITarget(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5) as target:
        result = await run_load(target, rps=5, duration_s=1, mix=PromptMix(), seed=1, progress=False)
    assert result.records and result.errors == len(result.records)
    assert {r.status for r in result.records} == {"ClientConnectorError"}
    summary = write_report(result, tmp_path)["targets"]["openai"]
    assert summary["errors_by_status"] == {"ClientConnectorError": len(result.records)}
    assert summary["ttft_ms"]["p50"] is None


async def test_http_errors_are_recorded_by_code(upstream: str) -> None:
    async with OpenAITarget(upstream, "m", max_tokens=-1) as target:  # the upstream refuses max_tokens < 1
        result = await run_load(target, rps=5, duration_s=1, mix=PromptMix(max_tokens=-1), progress=False)
    assert {r.status for r in result.records} == {"400"}


def _run(name: str, ttfts_ms: list[float], extra_ms: float) -> RunResult:
    records = [
        RequestRecord(index=i, ttft_s=t / 1000, e2e_s=(t + extra_ms) / 1000, output_tokens=2, itl_s=[0.001])
        for i, t in enumerate(ttfts_ms)
    ]
    return RunResult(name, 1.0, 1.0, 0, records, generator_cpu_s=0.1, wall_s=1.0, started_unix=0.0)


def test_added_latency_is_percentile_by_percentile() -> None:
    base = _run("bare", [float(v) for v in range(1, 101)], 100.0)
    slower = _run("gateway", [v + 5.0 for v in range(1, 101)], 130.0)
    extra = added_latency(slower, base)
    assert extra["ttft_ms"] == pytest.approx({"p50": 5.0, "p95": 5.0, "p99": 5.0})
    assert extra["e2e_ms"] == pytest.approx({"p50": 35.0, "p95": 35.0, "p99": 35.0})
    assert added(summarize(base), summarize(base)) == {"p50": 0.0, "p95": 0.0, "p99": 0.0}


def test_report_with_a_baseline_has_the_added_table(tmp_path: Path) -> None:
    base, slower = _run("bare", [10.0, 20.0], 50.0), _run("gateway", [15.0, 25.0], 50.0)
    report = write_report({"bare": base, "gateway": slower}, tmp_path, baseline="bare")
    assert report["added"]["gateway"]["ttft_ms"]["p50"] == pytest.approx(5.0)
    assert "bare" not in report["added"]
    with pytest.raises(ValueError, match="baseline"):
        write_report({"gateway": slower}, tmp_path, baseline="bare")
