"""`python -m loadtest.loadgen --target grpc|kafka|openai --rps 20 --duration 60 --out DIR`.

grpc and kafka default to the local stack (`make up`): its gateway address,
its broker and the demo tenant's key. openai needs `--base-url` (for example
the fixed-timing upstream, `python -m loadtest.upstream`).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from loadtest.loadgen.grpc_target import GrpcTarget
from loadtest.loadgen.kafka_target import KafkaIngressTarget
from loadtest.loadgen.mix import PromptMix
from loadtest.loadgen.openai_target import OpenAITarget
from loadtest.loadgen.records import RunResult
from loadtest.loadgen.runner import run_load
from loadtest.loadgen.target import Target
from loadtest.report import write_report


def build_target(args: argparse.Namespace) -> Target:
    if args.target == "openai":
        if not args.base_url:
            raise SystemExit("--base-url is required for --target openai")
        return OpenAITarget(args.base_url, args.model or "fixed-timing", args.api_key or None)
    from sluice import tls
    from sluice.cli import demo_key
    from sluice.config import load_settings
    from sluice.kafka_security import client_options

    settings = load_settings()
    key = args.api_key or demo_key(settings)
    if args.target == "grpc":
        address = args.address or settings.grpc_target("gateway")
        return GrpcTarget(address, key, args.model, credentials=tls.channel_credentials(settings))
    return KafkaIngressTarget(
        args.bootstrap or settings.bootstrap,
        key,
        tenant=args.tenant,
        model=args.model,
        reply_topic=args.reply_topic or f"replies.{args.tenant}.loadtest",
        kafka_options=client_options(settings),
    )


async def run(args: argparse.Namespace) -> RunResult:
    target = build_target(args)
    mix = PromptMix(pii_fraction=args.pii_fraction, max_tokens=args.max_tokens)
    try:
        return await run_load(
            target, rps=args.rps, duration_s=args.duration, mix=mix, seed=args.seed, progress=not args.quiet
        )
    finally:
        await target.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("grpc", "kafka", "openai"), required=True)
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--out", type=Path, default=Path("loadtest-out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pii-fraction", type=float, default=0.3, help="share of prompts with planted PII")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the target's")
    parser.add_argument("--model", default="", help="default: Sluice's default model / fixed-timing")
    parser.add_argument("--api-key", default="", help="default: the local demo tenant's key (grpc, kafka)")
    parser.add_argument("--address", default="", help="gateway host:port (grpc)")
    parser.add_argument("--bootstrap", default="", help="Kafka bootstrap (kafka)")
    parser.add_argument("--tenant", default="demo", help="the key's tenant (kafka)")
    parser.add_argument("--reply-topic", default="", help="default: replies.<tenant>.loadtest (kafka)")
    parser.add_argument("--base-url", default="", help="e.g. http://127.0.0.1:8099/v1 (openai)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    write_report(result, args.out, title=f"{args.target} at {args.rps:g} rps")
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
