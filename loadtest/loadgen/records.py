"""What one load-test request and one run leave behind, and how they round-trip through JSON.

Times are seconds. `scheduled_s` and `sent_s` are offsets from the run's start, so
`sent_s - scheduled_s` is the generator's own lag (an open-loop generator that
falls behind would otherwise hide latency). TTFT and end-to-end latency are
measured from the actual send.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

OK = "ok"


@dataclass
class RequestRecord:
    index: int
    request_id: str = ""  # Sluice's request id, when the target has one
    scheduled_s: float = 0.0
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    status: str = OK  # "ok", a gRPC status name, an HTTP code, or an exception type
    pii_planted: bool = False
    error: str = ""  # short reason; never the prompt
    restarts: int = 0  # times Sluice restarted the answer on another worker

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def lag_s(self) -> float:
        return self.sent_s - self.scheduled_s

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (None with fewer than two tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2 or self.e2e_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.e2e_s - self.ttft_s)


class Timing:
    """Stamps one request's send, tokens and end against the monotonic clock (perf_counter)."""

    def __init__(self, index: int, pii_planted: bool) -> None:
        self.record = RequestRecord(index=index, pii_planted=pii_planted)
        self.start = time.perf_counter()
        self.record.sent_s = self.start  # absolute here; run_load rebases it on the run's start
        self._last: float | None = None

    def token_event(self) -> None:
        """A chunk with text arrived: the first sets TTFT, each later one adds an inter-token gap."""
        now = time.perf_counter()
        if self._last is None:
            self.record.ttft_s = now - self.start
        else:
            self.record.itl_s.append(now - self._last)
        self._last = now

    def restart(self) -> None:
        """The answer starts over (Sluice re-ran it): the text so far is void."""
        self.record.restarts += 1

    def finish(self, status: str = OK, error: str = "", output_tokens: int | None = None) -> RequestRecord:
        self.record.e2e_s = time.perf_counter() - self.start
        self.record.status = status
        self.record.error = error[:300]
        if output_tokens is not None:
            self.record.output_tokens = output_tokens
        elif not self.record.output_tokens:
            self.record.output_tokens = len(self.record.itl_s) + (self.record.ttft_s is not None)
        return self.record


@dataclass
class RunResult:
    target: str
    rps: float
    duration_s: float
    seed: int
    records: list[RequestRecord]
    generator_cpu_s: float
    wall_s: float
    started_unix: float
    planted_pii: list[str] = field(default_factory=list)
    target_info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the upstream's /stats, a loss audit

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.records if r.request_id]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        names = {f.name for f in fields(RequestRecord)}
        records = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]
        return cls(**{**data, "records": records})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls.from_dict(json.loads(path.read_text()))
