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

Both paths start equally warm: every slot has run a short request first (a
slot's first decode is slow and its KV cache empty), and on the e2e path one
warm-up prompt went to each sluice.prompts.v1 partition, so the worker has read
every partition's attempt markers once, as a long-running worker has. The
bench's producer is connected before any clock starts.

With 16 streams on 2 slots, most of either TTFT is waiting for a slot, so the
p50 difference mostly mirrors the engine's speed in each run, which drifts by
hundreds of ms of p50 between runs (loadtest/slot_chains.py). What the worker
path adds to a request's first token is therefore also read off its
completions, with the engine's own time taken out ("worker adds"): the hand-off
gaps on the request's slot chain plus its first-token delivery. The bench also
times one request alone on the same warm engine after the mix, on each path
("single request TTFT").

CPU is reported per 1,000 output tokens for every process on each path (from
/proc/<pid>/stat, so it is meaningful on a busy machine where wall tok/s is
not): direct = this process (llama.cpp) + the idle broker; end to end = the
worker (llama.cpp + its Python; "worker event loop" is its main thread alone:
consuming, chunking, producing), the broker, and this process (producer and
reply reader). llama.cpp alone saturates both cores of the 2-vCPU dev box, so
every CPU-second the rest spends comes out of the engine's throughput. Part
of that cost is per second, not per token (the broker's and the worker's
background work, long polls); the bench prints it too ("idle CPU-s per
second", after the run), because on a loaded machine the run lasts longer and
that part inflates the per-token figures.

The machine's speed drifts between runs (the bare engine's own CPU per token
varied by 10% from one run to the next here), so the pair runs `--rounds`
times (default 3), direct then end to end, one worker process up throughout
(idle during direct runs: about 0.02 CPU-s per second), and the results are
the medians of the rounds.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.process_cpu import CpuMeter
from loadtest.slot_chains import Generation, SlotChains, added_before_first_token
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
from sluice.topics import PROMPTS, load_plan
from tests.inference.worker_helpers import (
    MODEL,
    ReplyReader,
    completions,
    new_producer,
    produce,
    prompt_event,
    start_worker,
)
from tests.metering.helpers import kill_hard, wait_until

PROMPT = "Count from 1 to 500, separated by commas."
REPLY_PARTITION = 0
IDLE_S = 5.0


def per_k_tokens(spent: dict[str, float], tokens: int, parts: Sequence[str]) -> str:
    """CPU-s per 1,000 tokens of each entry; the total sums only `parts` (whole processes)."""
    shown = [f"{name} {seconds * 1000 / tokens:.2f}" for name, seconds in spent.items()]
    total = sum(spent[name] for name in parts) * 1000 / tokens
    return ", ".join(shown) + f"; total {total:.2f}"


def ms_p50(seconds: Sequence[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} ms"


@dataclass
class Run:
    """One path's results: the mix's throughput and TTFTs, then one request alone."""

    rate: float
    ttfts: list[float]
    tokens: int
    alone_ttft: float
    # What the worker path added before each first token, engine time taken out (e2e only).
    chains: SlotChains | None = None


async def direct(
    settings: Settings, template: ChatTemplate, streams: int, tokens: int, meter: CpuMeter
) -> Run:
    engine = build_engine(MODEL, settings.catalog.models[MODEL], settings)
    await engine.start()
    prompt = template.render([("user", PROMPT)])

    async def one(request_id: str, max_tokens: int, began: float) -> tuple[float, int]:
        stream = engine.stream(request_id, prompt, Sampling(max_tokens, 0.0, 1.0))
        first = None
        async for event in stream:
            if event.tokens and first is None:
                first = time.perf_counter()
        return (first or time.perf_counter()) - began, stream.result.completion_tokens

    try:
        # Warm every slot (a slot's first decode is slow and its KV cache empty),
        # as end_to_end warms the worker's.
        await asyncio.gather(*(one(f"warm-{i}", 8, 0.0) for i in range(engine.capacity)))
        meter.start()
        began = time.perf_counter()
        results = await asyncio.gather(*(one(f"bench-{i}", tokens, began) for i in range(streams)))
        elapsed = time.perf_counter() - began
        meter.stop()
        alone, _ = await one("alone", tokens, time.perf_counter())
    finally:
        await engine.close()
    produced = sum(n for _, n in results)
    return Run(produced / elapsed, [t for t, _ in results], produced, alone)


async def end_to_end(
    settings: Settings, template: ChatTemplate, streams: int, tokens: int, meter: CpuMeter
) -> Run:
    partitions = load_plan(settings.topics_file).topics[PROMPTS].partitions
    # One warm-up prompt per partition: warms both slots, and the worker reads each
    # partition's attempt markers once (a long-running worker already has).
    warm = [prompt_event(template, PROMPT, 8, REPLY_PARTITION) for _ in range(partitions)]
    events = [prompt_event(template, PROMPT, tokens, REPLY_PARTITION) for _ in range(streams)]
    alone = prompt_event(template, PROMPT, tokens, REPLY_PARTITION)
    ids = [e.envelope.request_id for e in events]
    producer = new_producer(settings.bootstrap)  # connected before any clock starts
    await producer.start()
    try:
        async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
            await produce(settings.bootstrap, PROMPTS, warm, list(range(partitions)), producer)
            await reader.all_ended([w.envelope.request_id for w in warm], 300)
            meter.start()
            began = time.perf_counter()
            sent_wall = time.time()
            await produce(settings.bootstrap, PROMPTS, events, producer=producer)
            replies = await reader.all_ended(ids, 600)
            elapsed = time.perf_counter() - began
            meter.stop()
            sent = time.monotonic()
            await produce(settings.bootstrap, PROMPTS, [alone], producer=producer)
            await reader.all_ended([alone.envelope.request_id], 300)
    finally:
        await producer.stop()
    found = await completions(settings.bootstrap, ids)
    produced = sum(found[i][0].usage.completion_tokens for i in ids)
    streamed = sum(e.chunk.tokens for i in ids for e in replies.events[i] if e.WhichOneof("body") == "chunk")
    assert streamed == produced, (streamed, produced)
    # The reader's clock is time.monotonic; `began` is perf_counter: convert through now.
    offset = time.monotonic() - time.perf_counter()
    ttfts = [replies.arrived[i] - (began + offset) for i in ids]
    to_wall = time.time() - time.monotonic()
    chains = added_before_first_token(
        {i: Generation.of(found[i][0], replies.arrived[i] + to_wall) for i in ids},
        sent_wall,
        settings.inference_slots,
    )
    alone_ttft = replies.arrived[alone.envelope.request_id] - sent
    return Run(produced / elapsed, ttfts, produced, alone_ttft, chains)


@dataclass
class Round:
    """One direct run and the end-to-end run right after it, with the CPU each spent."""

    direct: Run
    e2e: Run
    direct_cpu: CpuMeter
    e2e_cpu: CpuMeter

    @property
    def ratio(self) -> float:
        return self.e2e.rate / self.direct.rate

    @property
    def ttft_added_s(self) -> float:
        return statistics.median(self.e2e.ttfts) - statistics.median(self.direct.ttfts)

    @property
    def chains(self) -> SlotChains:
        assert self.e2e.chains is not None
        return self.e2e.chains

    @property
    def worker_added_s(self) -> float:
        return statistics.median(self.chains.added.values())

    @property
    def alone_added_s(self) -> float:
        return self.e2e.alone_ttft - self.direct.alone_ttft


def one_round(
    settings: Settings,
    template: ChatTemplate,
    args: argparse.Namespace,
    worker: int,
    brokers: dict[str, tuple[int, int | None]],
) -> Round:
    here = os.getpid()
    direct_cpu = CpuMeter({"bench (llama.cpp)": (here, None), **brokers})
    engine = asyncio.run(direct(settings, template, args.streams, args.tokens, direct_cpu))
    e2e_cpu = CpuMeter(
        {
            "worker": (worker, None),
            "worker event loop": (worker, worker),
            **brokers,
            "bench (producer, reader)": (here, None),
        }
    )
    e2e = asyncio.run(end_to_end(settings, template, args.streams, args.tokens, e2e_cpu))
    return Round(engine, e2e, direct_cpu, e2e_cpu)


def summed(meters: Sequence[CpuMeter]) -> dict[str, float]:
    return {name: sum(m.spent[name] for m in meters) for name in meters[0].spent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="direct/e2e pairs; results are their medians")
    parser.add_argument("--output-redaction", action="store_true")
    args = parser.parse_args()
    template = ChatTemplate(smollm2_gguf_path())
    rounds: list[Round] = []
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
            brokers: dict[str, tuple[int, int | None]] = {}
            if broker is not None and broker._proc:
                brokers["broker"] = (broker._proc.pid, None)
            worker = start_worker(settings, "bench", grpc_port, Path(tmp) / "worker.log")
            try:
                wait_until(lambda: Stack(settings).healthy("inference"), 300, "the worker to serve")
                for _ in range(args.rounds):
                    rounds.append(one_round(settings, template, args, worker.pid, brokers))
                idle = CpuMeter({name: rounds[0].e2e_cpu.targets[name] for name in ("worker", *brokers)})
                idle.start()
                time.sleep(IDLE_S)
                idle.stop()
            finally:
                kill_hard(worker)
        finally:
            if broker is not None:
                broker.stop()
    report(args, rounds, idle)


def report(args: argparse.Namespace, rounds: Sequence[Round], idle: CpuMeter) -> None:
    threads = args.threads or default_n_threads(args.slots)
    processes = ("worker", "broker", "bench (producer, reader)")
    lines = [
        f"inference: {args.streams} concurrent streams x {args.tokens} output tokens, "
        f"SmolLM2-135M llama.cpp, {args.slots} slots, {os.cpu_count()} vCPU, "
        f"output redaction {'on' if args.output_redaction else 'off'}, {len(rounds)} rounds "
        "(direct then end to end)",
        f"  {'round':<7}{'direct tok/s':>14}{'e2e tok/s':>11}{'ratio':>8}"
        f"{'p50 TTFT added ms':>19}{'worker adds p50 ms':>20}{'single added ms':>17}",
    ]
    for n, r in enumerate(rounds, start=1):
        lines.append(
            f"  {n:<7}{r.direct.rate:>14.1f}{r.e2e.rate:>11.1f}{r.ratio:>8.1%}"
            f"{r.ttft_added_s * 1000:>19.1f}{r.worker_added_s * 1000:>20.1f}{r.alone_added_s * 1000:>17.1f}"
        )
    direct_tokens = sum(r.direct.tokens for r in rounds)
    e2e_tokens = sum(r.e2e.tokens for r in rounds)
    lines += [
        f"  median ratio e2e/direct: {statistics.median(r.ratio for r in rounds):.1%} (target >= 95%)",
        f"  median p50 TTFT added: {statistics.median(r.ttft_added_s for r in rounds) * 1000:.1f} ms "
        f"(target <= 5 ms; with {args.streams} streams on {args.slots} slots it mostly mirrors "
        "each run's engine speed)",
        f"  median p50 the worker path adds before a first token (hand-off gaps on its slot chain + "
        f"first-token delivery, engine time taken out): "
        f"{statistics.median(r.worker_added_s for r in rounds) * 1000:.1f} ms (target <= 5 ms); "
        f"p50 hand-off gap {ms_p50([g for r in rounds for g in r.chains.handoffs])}, "
        f"p50 first-token delivery {ms_p50([d for r in rounds for d in r.chains.deliveries])}",
        f"  median single request TTFT added (warm slots, after the mix): "
        f"{statistics.median(r.alone_added_s for r in rounds) * 1000:.1f} ms",
        "  CPU-s per 1,000 output tokens, all rounds, direct: "
        + per_k_tokens(
            summed([r.direct_cpu for r in rounds]), direct_tokens, list(rounds[0].direct_cpu.targets)
        ),
        "  CPU-s per 1,000 output tokens, all rounds, e2e: "
        + per_k_tokens(summed([r.e2e_cpu for r in rounds]), e2e_tokens, processes),
        f"  idle CPU-s per second (after the rounds, {IDLE_S:.0f} s): "
        + ", ".join(f"{name} {spent / IDLE_S:.3f}" for name, spent in idle.spent.items()),
        f"  engine: {args.slots} slots x {threads} llama.cpp thread(s) each on both paths; "
        f"reply reader long-polls (fetch_max_wait_ms {IDLE_POLL_MS}); the worker idles during direct runs",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
