"""`sluice ingress secret`: what a Kafka producer needs to sign its requests (docs/ingress.md).

The signing secret is the key's salted hash as stored on sluice.keys.v1, so it
is derived here from the key the caller already holds: the key must match the
stored hash, or nothing is printed.
"""

from __future__ import annotations

import argparse

from services.gateway import keys
from services.gateway.ingress import signing_secret
from sluice.cli import Commands, demo_key, print_json
from sluice.cli_keys import _run, _snapshot
from sluice.config import Settings


def cmd_secret(settings: Settings, args: argparse.Namespace) -> int:
    key = args.api_key or demo_key(settings)
    key_id = keys.key_id_of(key)
    record = _run(settings, _snapshot(settings.bootstrap)).get(key_id)
    if record is None or record.HasField("revoked_at") or not keys.matches(record, key):
        raise SystemExit("sluice: unknown or revoked API key")
    secret = signing_secret(record).hex()
    if args.json:
        print_json({"key_id": key_id, "tenant": record.tenant, "secret": secret})
    else:
        print(f"key_id: {key_id}\ntenant: {record.tenant}\nsecret: {secret}")
    return 0


def register(commands: Commands) -> None:
    group = commands.group("ingress", "Kafka producers: requests straight to sluice.requests.v1")
    secret = commands.add("secret", cmd_secret, "print a key's id and signing secret", into=group)
    secret.add_argument("--api-key", default="", help="default: the local demo tenant's key")
