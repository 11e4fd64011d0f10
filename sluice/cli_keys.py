"""`sluice keys …`: create, list and revoke API keys on sluice.keys.v1.

The operator's CLI writes straight to the compacted topic (whoever runs it has
the cluster), so there is no admin RPC to guard; every gateway, redaction and
audit process follows the topic and applies the change within a poll.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import TypeVar

import structlog

from services.gateway import keys
from services.gateway.auth import KeyStore
from services.gateway.ingress import IngressSigning
from sluice.cli import Commands, demo_key, print_json
from sluice.config import Settings
from sluice.v1 import keys_pb2

T = TypeVar("T")
KAFKA_WAIT_S = 30.0


def _run(settings: Settings, work: Awaitable[T]) -> T:
    # Progress lines (e.g. Kafka retries) go to stderr, so stdout stays the answer alone.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(work, KAFKA_WAIT_S)
        except TimeoutError:
            raise SystemExit(
                f"sluice: Kafka at {settings.bootstrap} did not answer in {KAFKA_WAIT_S:.0f}s"
            ) from None

    return asyncio.run(bounded())


async def _snapshot(bootstrap: str) -> dict[str, keys_pb2.ApiKey]:
    """Every key's newest record, read to the topic's current end."""
    store = KeyStore(bootstrap)
    task = asyncio.create_task(store.run())
    try:
        await store.ready.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return store.records


def _models(settings: Settings, names: str) -> list[str]:
    canonical = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        model = settings.catalog.resolve(name)
        if model is None:
            raise SystemExit(
                f"sluice: --models: unknown model {name!r} (known: {', '.join(settings.catalog.models)})"
            )
        canonical.append(model)
    return canonical


def cmd_create(settings: Settings, args: argparse.Namespace) -> int:
    key_id, key = keys.new_key()
    try:
        record = keys.key_record(
            key_id=key_id,
            inner_digest=keys.digest(key),
            tenant=args.tenant,
            role=args.role,
            models=_models(settings, args.models),
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            description=args.description,
        )
    except ValueError as exc:
        raise SystemExit(f"sluice: {exc}") from None
    _run(settings, keys.publish(settings.bootstrap, [record]))
    # For Kafka producers that sign (docs/ingress.md); `sluice ingress secret` shows it again.
    ingress_secret = IngressSigning.from_settings(settings).secret(key_id).hex()
    if getattr(args, "json", False):
        print_json(
            {
                "key_id": key_id,
                "tenant": args.tenant,
                "role": args.role,
                "api_key": key,
                "ingress_secret": ingress_secret,
            }
        )
    else:
        print(f"key_id: {key_id}  tenant: {args.tenant}  role: {args.role}")
        print(f"api key (shown once, store it now): {key}")
        print(f"kafka ingress signing secret: {ingress_secret}")
    return 0


def _row(record: keys_pb2.ApiKey) -> dict[str, object]:
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "role": keys.role_name(record.role),
        "models": list(record.allowed_models),
        "requests_per_minute": record.rate_limit.requests_per_minute,
        "tokens_per_minute": record.rate_limit.tokens_per_minute,
        "created_at": record.created_at.ToJsonString() if record.HasField("created_at") else None,
        "revoked_at": record.revoked_at.ToJsonString() if record.HasField("revoked_at") else None,
        "description": record.description,
    }


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    records = _run(settings, _snapshot(settings.bootstrap)).values()
    rows = [
        _row(r) for r in sorted(records, key=lambda r: (r.tenant, r.key_id)) if args.tenant in ("", r.tenant)
    ]
    if getattr(args, "json", False):
        print_json(rows)
        return 0
    print(f"{'key_id':<13} {'tenant':<16} {'role':<8} {'rpm':>5} {'tpm':>7}  {'state':<8} models")
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        models = ",".join(row["models"]) or "*"  # type: ignore[arg-type]
        print(
            f"{row['key_id']:<13} {row['tenant']:<16} {row['role']:<8} {row['requests_per_minute']:>5} "
            f"{row['tokens_per_minute']:>7}  {state:<8} {models}"
        )
    return 0


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def revoke() -> keys_pb2.ApiKey | None:
        record = (await _snapshot(settings.bootstrap)).get(args.key_id)
        if record is not None and not record.HasField("revoked_at"):
            record.revoked_at.CopyFrom(keys.now_stamp())
            await keys.publish(settings.bootstrap, [record])
        return record

    record = _run(settings, revoke())
    if record is None:
        raise SystemExit(f"sluice: key_id: no key {args.key_id!r}")
    if getattr(args, "json", False):
        print_json(_row(record))
    else:
        print(f"revoked {record.key_id} (tenant {record.tenant}) at {record.revoked_at.ToJsonString()}")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    key = demo_key(settings)
    if getattr(args, "json", False):
        print_json({"tenant": "demo", "api_key": key, "key_id": keys.key_id_of(key)})
    else:
        print(key)
    return 0


def cmd_id(settings: Settings, args: argparse.Namespace) -> int:
    """The key id metering and audit name a key by (budgets per key use it)."""
    print(keys.key_id_of(args.api_key or demo_key(settings)))
    return 0


def register(commands: Commands) -> None:
    group = commands.group("keys", "API keys on sluice.keys.v1")
    create = commands.add("create", cmd_create, "make a key; it is printed once", into=group)
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=tuple(keys.ROLES), default="user")
    create.add_argument("--models", default="", help="comma-separated allow-list; default: every model")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    create.add_argument("--description", default="")
    listing = commands.add("list", cmd_list, "list keys (never the keys or their hashes)", into=group)
    listing.add_argument("--tenant", default="")
    revoke = commands.add("revoke", cmd_revoke, "revoke a key on every replica", into=group)
    revoke.add_argument("key_id")
    commands.add("demo", cmd_demo, "print the local demo tenant's API key", into=group)
    ident = commands.add("id", cmd_id, "print the key id of a key (default: the demo key)", into=group)
    ident.add_argument("--api-key", default="")
