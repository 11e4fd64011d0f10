"""Per-subject, per-period data keys for crypto-shredding stored content.

Content tied to an end-user is encrypted under that subject's data key for the
current period. The keys live wrapped under the master key on a compacted topic
(the source of truth) and in this in-memory ring. Destroying a key makes every
copy of the content unreadable, in old offsets and exports too, while the
ciphertext and the hash chain over it stay intact. Erasure destroys all of a
subject's keys; a tenant's retention destroys whole periods.
"""

from __future__ import annotations

import base64
import os
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sluice.v1 import compliance_pb2

NONCE_BYTES = 12


def subject_of(tenant: str, user: str) -> str:
    """Subjects are per tenant: two tenants' user "42" are different people."""
    return f"{tenant}/{user}"


def load_master_key(configured: str | None, state_dir: Path) -> bytes:
    """The configured key (base64 of 32 bytes), or one generated once under the state dir."""
    if configured:
        key = base64.b64decode(configured, validate=True)
        if len(key) != 32:
            raise ValueError("SLUICE_AUDIT_MASTER_KEY: must be base64 of 32 bytes")
        return key
    path = state_dir / "keys" / "audit-master.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    return base64.b64decode(path.read_text().strip())


def _seal(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        return None


@dataclass(frozen=True)
class DataKey:
    subject: str
    key_id: str
    period: int
    period_s: int
    key: bytes

    @property
    def topic_key(self) -> str:
        return key_topic_key(self.subject, self.period)

    def expires_at(self, retention_s: int) -> int:
        """When the newest content this key can seal is `retention_s` old (seconds since the epoch)."""
        return (self.period + 1) * self.period_s + retention_s

    def destroyed(self) -> compliance_pb2.SubjectKey:
        return compliance_pb2.SubjectKey(
            subject=self.subject,
            key_id=self.key_id,
            period=self.period,
            period_s=self.period_s,
            destroyed=True,
        )


def key_topic_key(subject: str, period: int) -> str:
    """One compacted entry per subject and period: a destroyed key replaces its wrapped copy."""
    return f"{subject}@{period}"


@dataclass
class KeyRing:
    """Every live data key, folded from sluice.audit-keys.v1.

    A subject has one key per period (`period_s` seconds of the writer's clock),
    so content can be shredded by age (drop old periods' keys) as well as by
    person (drop all of a subject's keys).
    """

    master_key: bytes
    period_s: int = 86400
    _keys: dict[str, DataKey] = field(default_factory=dict)  # by key id
    _current: dict[tuple[str, int], str] = field(default_factory=dict)  # (subject, period) -> key id
    # Keys an Erase call hid at once, until the writer destroys them for good.
    _forgotten: dict[str, list[DataKey]] = field(default_factory=dict)

    def apply(self, entry: compliance_pb2.SubjectKey) -> None:
        """Fold one entry of the key topic (newest wins, like compaction)."""
        if entry.destroyed:
            if entry.key_id:
                self._drop(self._keys.get(entry.key_id))
            else:  # a whole subject (entries written before keys had periods)
                for key in self.keys_of(entry.subject):
                    self._drop(key)
            return
        secret = _open(self.master_key, entry.wrapped_key, _aad(entry.subject, entry.key_id))
        if secret is not None:
            data = DataKey(entry.subject, entry.key_id, entry.period, entry.period_s or self.period_s, secret)
            self._keys[entry.key_id] = data
            self._current[(entry.subject, entry.period)] = entry.key_id

    def apply_tombstone(self, topic_key: str) -> None:
        subject, _, period = topic_key.rpartition("@")
        if period.lstrip("-").isdigit():
            key_id = self._current.get((subject, int(period)))
            self._drop(self._keys.get(key_id or ""))
        else:
            for key in self.keys_of(topic_key):
                self._drop(key)

    def _drop(self, key: DataKey | None) -> None:
        if key is None:
            return
        self._keys.pop(key.key_id, None)
        if self._current.get((key.subject, key.period)) == key.key_id:
            del self._current[(key.subject, key.period)]

    def has_key(self, subject: str) -> bool:
        return any(key.subject == subject for key in self._keys.values())

    def keys_of(self, subject: str) -> list[DataKey]:
        return [key for key in self._keys.values() if key.subject == subject]

    def key_for(self, subject: str, now_s: float) -> tuple[DataKey, compliance_pb2.SubjectKey | None]:
        """The subject's key for the period of `now_s`, and its wrapped entry if it is new."""
        period = int(now_s // self.period_s)
        key_id = self._current.get((subject, period))
        if key_id is not None:
            return self._keys[key_id], None
        key_id, key = uuid.uuid4().hex, AESGCM.generate_key(bit_length=256)
        entry = compliance_pb2.SubjectKey(
            subject=subject,
            key_id=key_id,
            wrapped_key=_seal(self.master_key, key, _aad(subject, key_id)),
            period=period,
            period_s=self.period_s,
        )
        self.apply(entry)
        return self._keys[key_id], entry

    def encrypt(self, key: DataKey, plain: str) -> bytes:
        return _seal(key.key, plain.encode(), _aad(key.subject, key.key_id))

    def decrypt(self, subject: str, key_id: str, sealed: bytes) -> str | None:
        """The plain text, or None once that key is destroyed (erasure or retention)."""
        key = self._keys.get(key_id)
        if key is None or key.subject != subject:
            return None
        plain = _open(key.key, sealed, _aad(subject, key_id))
        return None if plain is None else plain.decode()

    def forget(self, subject: str) -> bool:
        """Hide a subject's keys at once (Erase); the writer then destroys them. True if it had any."""
        keys = self.keys_of(subject)
        for key in keys:
            self._drop(key)
        self._forgotten.setdefault(subject, []).extend(keys)
        return bool(keys)

    def destroy(self, subject: str) -> list[compliance_pb2.SubjectKey]:
        """Destroy every key of `subject`, hidden or not: the entries for the key topic."""
        keys = self._forgotten.pop(subject, []) + self.keys_of(subject)
        for key in keys:
            self._drop(key)
        return [key.destroyed() for key in keys]

    def expired(self, tenant: str, retention_s: int, now_s: float) -> list[DataKey]:
        """The tenant's keys whose whole period is older than its retention."""
        prefix = subject_of(tenant, "")
        return [
            key
            for key in self._keys.values()
            if key.subject.startswith(prefix) and key.expires_at(retention_s) <= now_s
        ]

    def destroy_expired(
        self, tenant: str, retention_s: int, as_of_s: float
    ) -> list[compliance_pb2.SubjectKey]:
        """Destroy the tenant's expired keys: the entries for the key topic."""
        keys = self.expired(tenant, retention_s, as_of_s)
        for key in keys:
            self._drop(key)
        return [key.destroyed() for key in keys]


def _aad(subject: str, key_id: str) -> bytes:
    return f"{subject}\x00{key_id}".encode()
