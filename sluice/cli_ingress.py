"""`sluice ingress secret`: what a Kafka producer needs to sign its requests (docs/ingress.md).

The signing secret is derived from the server master key and the key id
(`IngressSigning`), so only a process holding that master key can print it:
the operator's CLI, like the gateways and redaction. `--api-key` prints it for
the holder of a key (the key must match its stored hash); `--key-id` is the
admin's way to retrieve the secret of any active key.
"""

from __future__ import annotations

import argparse

from services.gateway import keys
from services.gateway.ingress import IngressSigning
from sluice.cli import Commands, demo_key, print_json
from sluice.cli_keys import _run, _snapshot
from sluice.config import Settings


def cmd_secret(settings: Settings, args: argparse.Namespace) -> int:
    key = "" if args.key_id else args.api_key or demo_key(settings)
    key_id = args.key_id or keys.key_id_of(key)
    record = _run(settings, _snapshot(settings.bootstrap)).get(key_id)
    if record is None or record.HasField("revoked_at") or (key and not keys.matches(record, key)):
        raise SystemExit("sluice: unknown or revoked API key")
    secret = IngressSigning.from_settings(settings).secret(key_id).hex()
    if args.json:
        print_json({"key_id": key_id, "tenant": record.tenant, "secret": secret})
    else:
        print(f"key_id: {key_id}\ntenant: {record.tenant}\nsecret: {secret}")
    return 0


def register(commands: Commands) -> None:
    group = commands.group("ingress", "Kafka producers: requests straight to sluice.requests.v1")
    secret = commands.add("secret", cmd_secret, "print a key's id and signing secret", into=group)
    which = secret.add_mutually_exclusive_group()
    which.add_argument("--api-key", default="", help="default: the local demo tenant's key")
    which.add_argument("--key-id", default="", help="admin: any active key's secret, by key id")
