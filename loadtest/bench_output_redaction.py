"""Output redaction under concurrent streams: CPU per 1,000 tokens and the latency it adds.

Issue 9's load test found output redaction to be the stage that limits Sluice:
every generation redacts its own tokens, so this bench runs exactly that path
(`ChunkWriter` -> `StreamRedactor` -> `Boundary` -> the real Presidio + spaCy
analyzer) for many generations at once, without the rest of the stack.
Generations start open-loop at `--rps`; each emits `--tokens` tokens (pieces of
the labelled set's texts, which hold planted PII) every `--gap-ms`, like the
load test's fixed-timing upstream. Kafka is replaced by an in-memory recorder
(send returns an acknowledged future) so the figures are the redaction path's
alone.

Reports, per run: CPU-s of this process per 1,000 tokens (user + sys,
analyzer thread included), the added latency per token (token due from the
engine -> the chunk carrying it is sent) and per first token, p50/p99,
analyzer calls and texts per call, and how many planted values reached a chunk
in clear (must be the same with and without the change: privacy unchanged).

    .venv/bin/python -m loadtest.bench_output_redaction --rps 5,20,50 --duration 20
    OPENBLAS_NUM_THREADS=2 .venv/bin/python -m loadtest.bench_output_redaction   # BLAS threads as before
    .venv/bin/python -m loadtest.bench_output_redaction --no-redaction   # the path without redaction

Runs against whatever `services` is on the path, so the code before a change
can be measured with PYTHONPATH pointing at an export of the older tree. On a
machine busy with other work the latencies say little (the analyzer waits for
a core); CPU-s per 1,000 tokens holds up better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.inference.chunks import ChunkWriter
from services.redaction.analyzer import Job, Redactor
from services.redaction.boundary import boundary_from_settings, stream_redactor_for
from sluice.config import load_settings
from sluice.kafka import RequestFailed
from sluice.topics import TOKENS
from sluice.v1 import envelope_pb2, events_pb2

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "redaction_eval.jsonl"


@dataclass
class Recorder:
    """Stands in for the Kafka producer: keeps each chunk and when it left."""

    sent: dict[bytes, list[tuple[float, bytes]]] = field(default_factory=dict)

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[object]:
        self.sent.setdefault(key or b"", []).append((time.perf_counter(), value))
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class Counting:
    """Counts the analyzer's calls and texts (one call = one nlp.pipe batch)."""

    redactor: Redactor
    calls: int = 0
    texts: int = 0

    def find_many(self, jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        self.calls += 1
        self.texts += sum(len(j.texts) for j in jobs)
        return self.redactor.find_many(jobs, **kwargs)


def answers(tokens: int) -> list[tuple[list[str], list[str]]]:
    """(token pieces, planted values) per answer: labelled texts cut into ~4-character tokens."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        pieces = re.findall(r"\s*\S{1,4}", row["text"])
        if len(pieces) < tokens:
            continue
        kept = "".join(pieces[:tokens])
        secrets = [row["text"][e["start"] : e["end"]] for e in row["entities"] if e["end"] <= len(kept)]
        out.append((pieces[:tokens], secrets))
    return out


async def generation(writer: ChunkWriter, pieces: list[str], gap_s: float) -> list[float] | None:
    """Feeds tokens at a fixed rate (like a fixed-timing upstream); each token's due time.

    Latency counts from when the engine had the token (its due time), so a writer
    that holds up the token loop is charged for it. None if output redaction
    failed the generation (closed, as in the worker).
    """
    due = []
    start = time.perf_counter()
    try:
        for i, piece in enumerate(pieces):
            due.append(start + i * gap_s)
            await asyncio.sleep(max(0.0, due[-1] - time.perf_counter()))
            await writer.add(piece, 1)
        await writer.close()
    except RequestFailed as exc:
        FAILURES[str(exc)] = FAILURES.get(str(exc), 0) + 1
        return None
    return due


async def run(args: argparse.Namespace, rps: float, redaction: bool) -> dict[str, Any]:
    settings = load_settings(state_dir="/tmp/sluice-bench-output-redaction", output_redaction=redaction)
    counting = Counting(REDACTOR)
    boundary = boundary_from_settings(settings)
    boundary.loaded(counting)  # type: ignore[arg-type]
    pool = answers(args.tokens)
    rng = random.Random(7)
    recorder = Recorder()
    reply_to = envelope_pb2.ReplyTo(topic=TOKENS, partition=0)
    runs: list[tuple[bytes, list[str], asyncio.Task[list[float] | None]]] = []
    secrets: dict[bytes, list[str]] = {}
    FAILURES.clear()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    at = began
    while at - began < args.duration:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        pieces, planted = rng.choice(pool)
        request_id = uuid.uuid4().hex
        envelope = envelope_pb2.Envelope(request_id=request_id, tenant="bench", attempt=1)
        writer = ChunkWriter(
            recorder,  # type: ignore[arg-type]
            envelope,
            reply_to,
            settings.token_flush_tokens,
            settings.token_flush_ms / 1000,
            redactor=stream_redactor_for(boundary if redaction else None, "bench", settings),
        )
        key = request_id.encode()
        secrets[key] = planted
        runs.append((key, pieces, asyncio.create_task(generation(writer, pieces, args.gap_ms / 1000))))
        at += rng.expovariate(rps)
    await asyncio.gather(*(task for _, _, task in runs))
    wall = time.perf_counter() - began
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    per_token: list[float] = []
    first: list[float] = []
    leaked = failed = 0
    for key, _pieces, task in runs:
        due = task.result()
        if due is None:
            failed += 1
            continue
        chunks = [(t, events_pb2.ReplyEvent.FromString(v).chunk) for t, v in recorder.sent[key]]
        assert [c.seq for _, c in chunks] == list(range(len(chunks))), "chunks out of order"
        assert sum(c.tokens for _, c in chunks) == len(due), "token count lost"
        i = 0
        for sent_at, chunk in chunks:
            for _ in range(chunk.tokens):
                per_token.append(sent_at - due[i])
                i += 1
        first.append(next(t for t, c in chunks if c.delta) - due[0])
        text = "".join(c.delta for _, c in chunks)
        leaked += sum(1 for s in secrets[key] if s in text)
    tokens = len(per_token)
    if not tokens:
        return {"rps": rps, "generations": len(runs), "failed_closed": failed, "failures": dict(FAILURES)}
    return {
        "rps": rps,
        "redaction": redaction,
        "generations": len(runs),
        "failed_closed": failed,
        "failures": dict(FAILURES),
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "cpu_s_per_1k_tokens": round(cpu / tokens * 1000, 3),
        "token_added_ms_p50": round(statistics.median(per_token) * 1000, 1),
        "token_added_ms_p99": round(statistics.quantiles(per_token, n=100)[98] * 1000, 1),
        "first_token_added_ms_p50": round(statistics.median(first) * 1000, 1),
        "first_token_added_ms_p99": round(statistics.quantiles(first, n=100)[98] * 1000, 1),
        "analyzer_calls": counting.calls,
        "texts_per_call": round(counting.texts / counting.calls, 2) if counting.calls else 0,
        "planted_values_in_clear": leaked,
    }


REDACTOR: Redactor
FAILURES: dict[str, int] = {}  # failure message -> generations failed closed with it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rps", default="5,20", help="generations started per second (comma list)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="time between tokens")
    parser.add_argument("--no-redaction", action="store_true", help="measure the path without redaction")
    args = parser.parse_args()
    global REDACTOR
    REDACTOR = Redactor()
    REDACTOR.find(["Warm up: Jane Roe in Paris."], entities=["PERSON"], thresholds={"PERSON": 0.5})
    print(json.dumps({"texts_available": len(answers(args.tokens))}))
    for rps in (float(r) for r in args.rps.split(",")):
        print(json.dumps(asyncio.run(run(args, rps, not args.no_redaction))), flush=True)


if __name__ == "__main__":
    main()
