"""`sluice redact`: what the privacy boundary makes of a text, under the caller's tenant policy.

`sluice redact TEXT` prints the redacted text (`--json`: text, entities and
counts). `sluice redact -` reads one text per line from stdin and prints one
JSON result per line, in input order; the lines are sent concurrently so the
service batches them. `sluice policy set TENANT FILE` publishes a policy
override on sluice.policies.v1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from sluice import tls
from sluice.cli import Commands, as_dict, demo_key, print_json
from sluice.config import Settings
from sluice.kafka_security import client_options
from sluice.v1 import redaction_pb2, redaction_pb2_grpc

# Lines in flight at once for `sluice redact -`: enough for the service to batch.
_CONCURRENCY = 32


def _result(response: redaction_pb2.RedactResponse) -> dict[str, Any]:
    result = as_dict(response)
    result.setdefault("text", "")
    return result


async def _redact_lines(
    settings: Settings, lines: Iterable[str], metadata: tuple[tuple[str, str], ...], language: str
) -> int:
    failures = 0
    async with tls.aio_channel(settings, settings.grpc_target("redaction")) as channel:
        stub = redaction_pb2_grpc.RedactorStub(channel)
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def one(text: str) -> dict[str, Any]:
            async with gate:
                try:
                    request = redaction_pb2.RedactRequest(text=text, language=language)
                    return _result(await stub.Redact(request, metadata=metadata))
                except grpc.aio.AioRpcError as exc:
                    return {"error": {"code": exc.code().name, "message": exc.details()}}

        tasks = [asyncio.create_task(one(line.rstrip("\r\n"))) for line in lines]
        for task in tasks:  # in input order, each as soon as it and those before it are done
            result = await task
            failures += "error" in result
            print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if failures else 0


def cmd_redact(settings: Settings, args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {args.api_key or demo_key(settings)}"),)
    if args.text == "-":
        return asyncio.run(_redact_lines(settings, sys.stdin, metadata, args.language))
    with tls.channel(settings, settings.grpc_target("redaction")) as channel:
        response = redaction_pb2_grpc.RedactorStub(channel).Redact(
            redaction_pb2.RedactRequest(text=args.text, language=args.language), metadata=metadata
        )
    if getattr(args, "json", False):
        print_json(_result(response))
    else:
        print(response.text)
    return 0


def cmd_policy_set(settings: Settings, args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer

    from services.redaction.boundary import parse_tenant_policy
    from services.redaction.policy import POLICIES, PolicyError
    from sluice import envelope as envelopes
    from sluice.v1 import privacy_pb2

    text = Path(args.file).read_text() if args.file else ""
    if text:
        try:
            parse_tenant_policy(text, args.tenant)  # refuse here rather than dead-letter later
        except PolicyError as exc:
            print(f"sluice policy: {exc}", file=sys.stderr)
            return 2
    update = privacy_pb2.PolicyUpdate(
        tenant=args.tenant,
        policy_yaml=text,
        envelope=envelopes.new_envelope(
            request_id=envelopes.new_request_id(), tenant=args.tenant, producer="sluice-cli"
        ),
    )

    async def publish() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap, **client_options(), enable_idempotence=True, acks="all"
        )
        await producer.start()
        try:
            await producer.send_and_wait(POLICIES, update.SerializeToString(), key=args.tenant.encode())
        finally:
            await producer.stop()

    asyncio.run(publish())
    print(f"policy for {args.tenant} {'published' if text else 'reset to the start-up file'}")
    return 0


def register(commands: Commands) -> None:
    redact = commands.add(
        "redact", cmd_redact, "redact a text (or stdin lines with '-') as the boundary would"
    )
    redact.add_argument("text", help="the text, or '-' for one text per line from stdin (JSON lines out)")
    redact.add_argument("--language", default="", help="defaults to the tenant policy's language")
    redact.add_argument("--api-key", default="", help="defaults to the local demo tenant's key")
    policy = commands.group("policy", "tenant redaction policies")
    set_ = commands.add("set", cmd_policy_set, "publish a tenant's policy override", into=policy)
    set_.add_argument("tenant")
    set_.add_argument("file", nargs="?", default="", help="policy YAML; omit to drop the override")
