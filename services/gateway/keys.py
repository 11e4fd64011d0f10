"""API key material: making a key, naming it, and the salted hash that is all we keep.

A key reads `sk-sluice-<key_id>.<secret>`: the 12-hex-digit id in the text lets
every reader find the one record to check without scanning. Keys made before
sluice.keys.v1 (and the tenants.json digests they were stored as) carry no id;
theirs is the first 12 hex digits of the key's SHA-256, the same id metering
already groups their usage by.

The stored hash is SHA-256(salt || SHA-256(key)) with a random salt per key.
The secret has 192 random bits, so a slow password hash would add nothing; the
inner digest lets a tenants.json entry (which holds only SHA-256(key)) be
migrated without ever having the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from sluice.kafka import start_producer
from sluice.topics import KEYS
from sluice.v1 import keys_pb2

PREFIX = "sk-sluice-"
HASH_SCHEME = "sha256(salt||sha256(key))"
ROLES = {
    "user": keys_pb2.KEY_ROLE_USER,
    "auditor": keys_pb2.KEY_ROLE_AUDITOR,
    "admin": keys_pb2.KEY_ROLE_ADMIN,
}
_WITH_ID = re.compile(rf"^{PREFIX}([0-9a-f]{{12}})\.[A-Za-z0-9_-]{{20,}}$")
KEY_ID = re.compile(r"^[0-9a-f]{12}$")


def role_name(role: keys_pb2.KeyRole.ValueType) -> str:
    for name, value in ROLES.items():
        if value == role:
            return name
    return "unspecified"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id_of(key: str) -> str:
    """The id a key names itself by, or (older keys) the prefix of its SHA-256."""
    match = _WITH_ID.match(key)
    return match.group(1) if match else digest(key).hex()[:12]


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key); the key is shown to its owner once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}.{secrets.token_urlsafe(24)}"


def salted(inner_digest: bytes, salt: bytes) -> bytes:
    return hashlib.sha256(salt + inner_digest).digest()


def matches(record: keys_pb2.ApiKey, key: str) -> bool:
    return hmac.compare_digest(salted(digest(key), record.salt), record.key_hash)


def now_stamp() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def key_record(
    *,
    key_id: str,
    inner_digest: bytes,
    tenant: str,
    role: str = "user",
    models: Sequence[str] = (),
    requests_per_minute: int = 0,
    tokens_per_minute: int = 0,
    description: str = "",
) -> keys_pb2.ApiKey:
    """The record for a key whose SHA-256 is `inner_digest`; raises ValueError naming a bad field."""
    if not tenant or "/" in tenant:
        raise ValueError("tenant: must be non-empty and must not contain '/'")
    if role not in ROLES:
        raise ValueError(f"role: must be one of {', '.join(ROLES)}")
    if requests_per_minute < 0 or tokens_per_minute < 0:
        raise ValueError("rate limit: must not be negative")
    salt = secrets.token_bytes(16)
    return keys_pb2.ApiKey(
        key_id=key_id,
        tenant=tenant,
        role=ROLES[role],
        salt=salt,
        key_hash=salted(inner_digest, salt),
        hash_scheme=HASH_SCHEME,
        allowed_models=list(models),
        rate_limit=keys_pb2.KeyRateLimit(
            requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute
        ),
        created_at=now_stamp(),
        description=description,
    )


async def publish(
    bootstrap: str, records: Sequence[keys_pb2.ApiKey], producer: AIOKafkaProducer | None = None
) -> None:
    """Write key records to sluice.keys.v1 and wait until the broker has them."""
    own = producer is None
    active = producer or await start_producer(bootstrap, "gateway")
    try:
        for record in records:
            await active.send_and_wait(KEYS, record.SerializeToString(), key=record.key_id.encode())
    finally:
        if own:
            await active.stop()
