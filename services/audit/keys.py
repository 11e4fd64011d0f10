"""Per-subject data keys for crypto-shredding stored content.

Content tied to an end-user is encrypted under that subject's data key. The
keys live wrapped under the master key on a compacted topic (the source of
truth) and in this in-memory ring. Destroying a key makes every copy of the
content unreadable, in old offsets and exports too, while the ciphertext and
the hash chain over it stay intact.
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


@dataclass
class KeyRing:
    """The current data key of each subject, folded from sluice.audit-keys.v1."""

    master_key: bytes
    _current: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def apply(self, entry: compliance_pb2.SubjectKey) -> None:
        """Fold one entry of the key topic (newest wins, like compaction)."""
        if entry.destroyed:
            self._current.pop(entry.subject, None)
            return
        key = _open(self.master_key, entry.wrapped_key, _aad(entry.subject, entry.key_id))
        if key is not None:
            self._current[entry.subject] = (entry.key_id, key)

    def has_key(self, subject: str) -> bool:
        return subject in self._current

    def new_key(self, subject: str) -> compliance_pb2.SubjectKey:
        """A fresh data key for `subject`, wrapped for the key topic (and applied here)."""
        key_id, key = uuid.uuid4().hex, AESGCM.generate_key(bit_length=256)
        entry = compliance_pb2.SubjectKey(
            subject=subject, key_id=key_id, wrapped_key=_seal(self.master_key, key, _aad(subject, key_id))
        )
        self._current[subject] = (key_id, key)
        return entry

    def encrypt(self, subject: str, plain: str) -> tuple[str, bytes]:
        key_id, key = self._current[subject]
        return key_id, _seal(key, plain.encode(), _aad(subject, key_id))

    def decrypt(self, subject: str, key_id: str, sealed: bytes) -> str | None:
        """The plain text, or None once the subject's key (this key id) is destroyed."""
        current = self._current.get(subject)
        if current is None or current[0] != key_id:
            return None
        plain = _open(current[1], sealed, _aad(subject, key_id))
        return None if plain is None else plain.decode()


def _aad(subject: str, key_id: str) -> bytes:
    return f"{subject}\x00{key_id}".encode()
