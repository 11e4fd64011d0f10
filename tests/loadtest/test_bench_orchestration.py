"""bench-overhead end to end at a tiny load: upstream, full Sluice, LiteLLM, report, loss audit.

Numbers are not asserted (no timed assertions); the test proves the orchestration
runs on real parts and writes what docs/loadtest.md promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_overhead
from sluice.config import SERVICES, Settings
from tests.conftest import paused


# Two stacks start in turn (Sluice's six services, then LiteLLM); on a loaded machine that is slow.
@pytest.mark.timeout(1500)
def test_bench_overhead_runs_sluice_and_litellm_against_one_upstream(
    topics_ready: str, stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's broker stands in for the bench's own (SLUICE_KAFKA_BOOTSTRAP is honoured);
    # the session stack, if other tests started it, would share the bench stack's consumer groups.
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP", topics_ready)
    out = tmp_path / "overhead"
    with paused(stack_settings, *SERVICES):
        code = bench_overhead.main(
            [
                "--rps",
                "2",
                "--duration",
                "3",
                "--warmup",
                "1",
                "--targets",
                "bd",
                "--tokens",
                "8",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    report = json.loads((out / "rps-2" / "report.json").read_text())
    assert set(report["targets"]) == {
        bench_overhead.UPSTREAM,
        bench_overhead.SLUICE_FULL,
        bench_overhead.LITELLM,
    }
    for name, summary in report["targets"].items():
        # Errors are possible on a loaded machine (and are counted in the report); some must succeed.
        assert summary["sent"] > 0 and summary["ok"] > 0, (name, summary["errors_by_status"])
        # Every answer has the upstream's length, whichever way it went.
        assert summary["output_tokens"] == 8 * summary["ok"], name
        assert "upstream_verdict" in summary["extra"] and summary["generator"]["cpu_s"] > 0
    audit = report["targets"][bench_overhead.SLUICE_FULL]["extra"]["loss_audit"]
    assert audit["ok"] and audit["requests"] == report["targets"][bench_overhead.SLUICE_FULL]["sent"]
    # Where the CPU went: every service and the (local) broker spent some per request.
    cpu = report["targets"][bench_overhead.SLUICE_FULL]["extra"]["cpu_ms_per_request"]
    assert set(cpu) == {*SERVICES, "kafka broker"} and all(ms > 0 for ms in cpu.values()), cpu
    assert set(report["added"]) == {bench_overhead.SLUICE_FULL, bench_overhead.LITELLM}
    assert all(Path(p).stat().st_size > 0 for p in report["plots"].values())
    table = (out / "overhead.md").read_text()
    assert "2-core" in table or "core machine" in table
    assert f"| 2 | {bench_overhead.SLUICE_FULL} |" in table and f"| 2 | {bench_overhead.LITELLM} |" in table
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    sluice_row = next(r for r in rows if r["target"] == bench_overhead.SLUICE_FULL)
    assert "ratio_ttft_p99" in sluice_row
