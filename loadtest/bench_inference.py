"""`make bench-inference`: the worker path's cost over the bare llama.cpp engine.

The same mix runs twice: 16 concurrent streams, 64-token outputs (greedy, a
prompt that does not stop early), with the same engine settings (slots,
threads):

1. direct: 16 `engine.stream()` calls at once in this process;
2. end to end: a real inference worker process on a private Kafka broker; the
   16 PromptAssembled are produced to sluice.prompts.v1 at once and the replies
   read from a sluice.tokens.v1 partition, as a gateway would.

Throughput = output tokens / (first request sent to last stream ended).
TTFT = request sent (stream() called, or prompt produced) to its first token
(first TokenEvent, or first chunk read back). Requests beyond the engine's
capacity wait in both cases (in the slot queue, or in Kafka), so both TTFTs
include that wait. Output redaction is off unless --output-redaction (its cost
is measured by bench-redaction).

With 16 streams on 2 slots, most of either TTFT is waiting for a slot, so the
p50 difference mostly mirrors throughput. What the worker itself adds to a
request's first token is measured separately: one request alone on an idle
engine, on each path ("single request TTFT").

The reply reader long-polls (fetch_max_wait_ms 500, Kafka's default): the
broker answers as soon as a chunk arrives, so it adds no latency, and it does
not spend the CPU the engine needs on empty fetches every few ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from services.inference.engine import Sampling
from services.inference.engines import build_engine
from services.inference.llamacpp_engine import default_n_threads
from services.prompts.chat_template import ChatTemplate
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, Settings, load_settings
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.models import smollm2_gguf_path
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topics import PROMPTS
from tests.inference.worker_helpers import (
    MODEL,
    ReplyReader,
    completions,
    produce,
    prompt_event,
    start_worker,
)
from tests.metering.helpers import kill_hard, wait_until

PROMPT = "Count from 1 to 500, separated by commas."
REPLY_PARTITION = 0


async def direct(
    settings: Settings, template: ChatTemplate, streams: int, tokens: int
) -> tuple[float, list[float], int]:
    engine = build_engine(MODEL, settings.catalog.models[MODEL], settings)
    await engine.start()
    try:
        prompt = template.render([("user", PROMPT)])
        await _drain(engine.stream("warm-up", prompt, Sampling(8, 0.0, 1.0)))

        async def one(i: int, began: float) -> tuple[float, int]:
            stream = engine.stream(f"bench-{i}", prompt, Sampling(tokens, 0.0, 1.0))
            first = None
            async for event in stream:
                if event.tokens and first is None:
                    first = time.perf_counter()
            return (first or time.perf_counter()) - began, stream.result.completion_tokens

        began = time.perf_counter()
        results = await asyncio.gather(*(one(i, began) for i in range(streams)))
        elapsed = time.perf_counter() - began
    finally:
        await engine.close()
    produced = sum(n for _, n in results)
    return produced / elapsed, [t for t, _ in results], produced


async def _drain(stream: object) -> None:
    async for _ in stream:  # type: ignore[attr-defined]
        pass


async def end_to_end(
    settings: Settings, template: ChatTemplate, streams: int, tokens: int
) -> tuple[float, list[float], int]:
    warm = prompt_event(template, PROMPT, 8, REPLY_PARTITION)
    events = [prompt_event(template, PROMPT, tokens, REPLY_PARTITION) for _ in range(streams)]
    ids = [e.envelope.request_id for e in events]
    async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
        await produce(settings.bootstrap, PROMPTS, [warm])
        await reader.all_ended([warm.envelope.request_id], 300)
        began = time.perf_counter()
        await produce(settings.bootstrap, PROMPTS, events)
        replies = await reader.all_ended(ids, 600)
        elapsed = time.perf_counter() - began
    found = await completions(settings.bootstrap, ids)
    produced = sum(found[i][0].usage.completion_tokens for i in ids)
    streamed = sum(e.chunk.tokens for i in ids for e in replies.events[i] if e.WhichOneof("body") == "chunk")
    assert streamed == produced, (streamed, produced)
    # The reader's clock is time.monotonic; `began` is perf_counter: convert through now.
    offset = time.monotonic() - time.perf_counter()
    ttfts = [replies.arrived[i] - (began + offset) for i in ids]
    return produced / elapsed, ttfts, produced


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-redaction", action="store_true")
    args = parser.parse_args()
    template = ChatTemplate(smollm2_gguf_path())
    with tempfile.TemporaryDirectory() as tmp:
        external = os.environ.get("SLUICE_KAFKA_BOOTSTRAP")
        port, controller, grpc_port = free_ports(3)
        broker = None
        if not external:
            broker = LocalBroker(REPO_ROOT, Path(tmp) / "kafka", port=port, controller_port=controller)
            broker.start()
        try:
            if broker is not None:
                broker.wait_ready(timeout=120)
            settings = load_settings(
                kafka_bootstrap=external or broker.bootstrap,  # type: ignore[union-attr]
                state_dir=Path(tmp) / "state",
                inference_port=grpc_port,
                metrics_port_offset=free_offset([grpc_port]),
                inference_slots=args.slots,
                inference_threads=args.threads,
                output_redaction=args.output_redaction,
                log_level="warning",
            )
            Stack(settings).apply_topics()
            direct_rate, direct_ttft, direct_tokens = asyncio.run(
                direct(settings, template, args.streams, args.tokens)
            )
            _, direct_alone, _ = asyncio.run(direct(settings, template, 1, args.tokens))
            worker = start_worker(settings, "bench", grpc_port, Path(tmp) / "worker.log")
            try:
                wait_until(lambda: Stack(settings).healthy("inference"), 300, "the worker to serve")
                e2e_rate, e2e_ttft, e2e_tokens = asyncio.run(
                    end_to_end(settings, template, args.streams, args.tokens)
                )
                _, e2e_alone, _ = asyncio.run(end_to_end(settings, template, 1, args.tokens))
            finally:
                kill_hard(worker)
        finally:
            if broker is not None:
                broker.stop()
    p50_direct, p50_e2e = statistics.median(direct_ttft), statistics.median(e2e_ttft)
    threads = args.threads or default_n_threads(args.slots)
    print(
        f"inference: {args.streams} concurrent streams x {args.tokens} output tokens, "
        f"SmolLM2-135M llama.cpp, {args.slots} slots, {os.cpu_count()} vCPU, "
        f"output redaction {'on' if args.output_redaction else 'off'}\n"
        f"  {'path':<28}{'tokens':>8}{'tokens/s':>11}{'p50 TTFT ms':>14}\n"
        f"  {'engine direct':<28}{direct_tokens:>8}{direct_rate:>11.1f}{p50_direct * 1000:>14.1f}\n"
        f"  {'worker via Kafka (e2e)':<28}{e2e_tokens:>8}{e2e_rate:>11.1f}{p50_e2e * 1000:>14.1f}\n"
        f"  ratio e2e/direct: {e2e_rate / direct_rate:.1%} (target >= 95%)\n"
        f"  p50 TTFT added: {(p50_e2e - p50_direct) * 1000:.1f} ms (target <= 5 ms)\n"
        f"  single request TTFT: direct {direct_alone[0] * 1000:.1f} ms, e2e {e2e_alone[0] * 1000:.1f} ms, "
        f"added {(e2e_alone[0] - direct_alone[0]) * 1000:.1f} ms\n"
        f"  engine: {args.slots} slots x {threads} llama.cpp thread(s) each on both paths; "
        f"reply reader long-polls (fetch_max_wait_ms {IDLE_POLL_MS})"
    )


if __name__ == "__main__":
    main()
