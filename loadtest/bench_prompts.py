"""`make bench-prompts`: prompt assemblies per second on one core, with p50/p99.

The measured unit is the prompts request path for one RequestRedacted event:
decode the request, resolve the template version and experiment arm, validate
the variables (JSON Schema), render the 3-message template in the sandbox,
apply SmolLM2's chat template, count tokens with its real tokenizer, fit the
2,048-token context, and build + serialize the PromptAssembled event. Kafka
I/O is not included (it is the shared consumer loop's cost, not assembly's).

Scenarios (each request has its own request_id, tenant user and question):
- ``shared-doc``: the same 1,500-token context document on every request (a
  RAG document that recurs); variables differ, so the render+fit cache misses.
- ``repeat``: identical template, variables and document: the LRU hit path.
- ``cold-doc``: a different 1,500-token document on every request; no cache helps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from services.prompts.assembly import Assembler
from services.prompts.registry import Registry
from services.prompts.service import from_redacted
from sluice import envelope as envelopes
from sluice.config import load_settings
from sluice.v1 import envelope_pb2, events_pb2, templates_pb2

WORDS = tuple(
    [
        "river",
        "valley",
        "mill",
        "water",
        "north",
        "south",
        "bank",
        "bridge",
        "current",
        "flood",
        "season",
        "rain",
        "stone",
        "village",
        "farmer",
        "boat",
        "trade",
        "market",
        "grain",
        "harbor",
        "delta",
        "source",
        "spring",
        "stream",
        "channel",
        "lock",
        "weir",
        "dam",
        "fish",
        "salmon",
        "trout",
        "meadow",
        "forest",
        "hill",
        "road",
        "cart",
        "wheel",
        "miller",
        "flour",
        "bread",
        "winter",
        "summer",
        "ice",
        "melt",
        "shore",
        "reed",
        "heron",
    ]
)
SCHEMA = {
    "type": "object",
    "required": ["product", "question"],
    "properties": {"product": {"type": "string", "maxLength": 64}, "question": {"type": "string"}},
    "additionalProperties": False,
}


def template() -> templates_pb2.TemplateVersion:
    return templates_pb2.TemplateVersion(
        name="support",
        version=1,
        event_id="bench",
        messages=[
            envelope_pb2.ChatMessage(
                role="system", content="You are the support assistant for {{ product }}. Be brief and exact."
            ),
            envelope_pb2.ChatMessage(
                role="user",
                content="Documents:{% for d in documents %}\n[{{ loop.index }}] {{ d }}{% endfor %}",
            ),
            envelope_pb2.ChatMessage(role="user", content="{{ question }}"),
        ],
        variables_schema=json.dumps(SCHEMA),
    )


def document(assembler: Assembler, seed: int, tokens: int = 1500) -> str:
    """Prose-like text cut to exactly `tokens` tokens of the real tokenizer."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(tokens // 5):
        words = rng.choices(WORDS, k=rng.randint(6, 14))
        sentences.append(" ".join(words).capitalize() + ".")
    chat = next(iter(assembler.templates.values()))
    return chat.detokenize(chat.text_tokens(" ".join(sentences))[:tokens])


def event(i: int, doc: str, question: str) -> bytes:
    redacted = events_pb2.RequestRedacted(
        envelope=envelopes.new_envelope(request_id=f"bench-{i}", tenant="demo", producer="redaction"),
        model="smollm2-135m-instruct",
        params=events_pb2.GenerationParams(max_tokens=256, temperature=0.7, top_p=0.95),
        user=f"u-{i % 500:020d}",
        template=templates_pb2.TemplateRef(name="support", label="production"),
        variables={"product": "Sluice", "question": question},
        context=[doc],
    )
    return redacted.SerializeToString()


def handle(assembler: Assembler, raw: bytes) -> bytes:
    """What the prompts consumer does per record, minus Kafka I/O."""
    redacted = events_pb2.RequestRedacted.FromString(raw)
    done = assembler.assemble(from_redacted(redacted))
    out = events_pb2.PromptAssembled(
        envelope=envelopes.follow(redacted.envelope, "prompts"),
        model=done.model,
        prompt=done.fitted.prompt,
        prompt_tokens=done.fitted.prompt_tokens,
        params=redacted.params,
        reply_to=redacted.reply_to,
        template=done.chat_template,
        template_used=done.used,
    )
    out.params.max_tokens = done.max_tokens
    return out.SerializeToString()


def measure(name: str, count: int, make: Callable[[int], bytes], assembler: Assembler) -> dict[str, object]:
    inputs = [make(i) for i in range(count)]
    for i in range(50):  # warm the interpreter on inputs that are not measured
        handle(assembler, make(count + 10_000 + i))
    timings, cpu_timings = [], []
    started, cpu_started = time.perf_counter(), time.thread_time()
    for raw in inputs:
        t0, c0 = time.perf_counter(), time.thread_time()
        handle(assembler, raw)
        timings.append(time.perf_counter() - t0)
        cpu_timings.append(time.thread_time() - c0)
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    timings.sort()
    cpu_timings.sort()
    p99 = int(len(timings) * 0.99) - 1
    return {
        "scenario": name,
        "assemblies": count,
        "per_second": round(count / wall),
        "p50_ms": round(statistics.median(timings) * 1000, 3),
        "p99_ms": round(timings[p99] * 1000, 3),
        "max_ms": round(timings[-1] * 1000, 3),
        # CPU time of this thread: what the numbers would be on an otherwise idle core.
        "per_cpu_second": round(count / cpu),
        "cpu_p99_ms": round(cpu_timings[p99] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    registry = Registry()
    registry.apply(templates_pb2.TemplateEvent(version=template()), 0)
    pointer = templates_pb2.LabelPointer(
        name="support", label="production", variants=[templates_pb2.Variant(version=1, weight=100)]
    )
    registry.apply(templates_pb2.TemplateEvent(label=pointer), 1)
    assembler = Assembler(load_settings(), registry)
    assembler.load()
    shared = document(assembler, seed=1)
    cold_docs = [document(assembler, seed=100 + i) for i in range(min(args.count, 1000))]
    chat = assembler.templates["smollm2-135m-instruct"]
    print(
        f"context document: {len(chat.text_tokens(shared))} tokens; one core of {os.cpu_count()}; "
        f"{platform.machine()}; load average at start: {os.getloadavg()}"
    )

    results = [
        measure(
            "shared-doc",
            args.count,
            lambda i: event(i, shared, f"Question {i}: where is the mill?"),
            assembler,
        ),
        measure("repeat", args.count, lambda i: event(0, shared, "Where is the mill?"), assembler),
        measure(
            "cold-doc",
            len(cold_docs),
            lambda i: event(i, cold_docs[i % len(cold_docs)], f"Question {i}?"),
            assembler,
        ),
    ]
    header = ("scenario", "n", "per second", "p50 ms", "p99 ms", "max ms", "per CPU-s", "CPU p99 ms")
    print(f"{header[0]:<12}" + "".join(f"{h:>11}" for h in header[1:]))
    for r in results:
        print(f"{r['scenario']:<12}" + "".join(f"{v:>11}" for v in list(r.values())[1:]))
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print(f"cache hit ratio over the run: {assembler.cache.hit_ratio():.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    assembler.close()


if __name__ == "__main__":
    main()
