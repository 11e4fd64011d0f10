"""Per-tenant keys and the sealed pseudonym vault.

Every tenant key is derived (HKDF-SHA256) from one master key, so the
redaction service and the gateways agree on keys without a key exchange: the
master key comes from SLUICE_REDACTION_MASTER_KEY (base64, 32 bytes) or,
for a local stack, from `<state_dir>/redaction-master.key`, created on first use
with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sluice.config import Settings
from sluice.v1 import privacy_pb2

__all__ = ["MASTER_KEY_FILE", "Keyring", "VaultError", "keyring_from_settings", "load_master_key"]

MASTER_KEY_FILE = "redaction-master.key"
_KEY_BYTES = 32


class VaultError(ValueError):
    """A vault cannot be opened: wrong tenant or request, expired, or tampered with."""


def load_master_key(configured: str | None, state_dir: Path) -> bytes:
    """The configured master key, or the local stack's one (made once, atomically)."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("SLUICE_REDACTION_MASTER_KEY: not valid base64") from None
        if len(key) != _KEY_BYTES:
            raise ValueError(f"SLUICE_REDACTION_MASTER_KEY: must decode to {_KEY_BYTES} bytes")
        return key
    path = state_dir / MASTER_KEY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MASTER_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(_KEY_BYTES))
        try:
            os.link(tmp, path)  # atomic: a concurrent starter's key wins and is used by both
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise ValueError(f"{path}: master key must be {_KEY_BYTES} bytes")
    return key


def keyring_from_settings(settings: Settings) -> Keyring:
    configured = settings.redaction_master_key.get_secret_value() if settings.redaction_master_key else None
    return Keyring(load_master_key(configured, settings.state_dir))


class Keyring:
    """Tenant keys derived from the master key, one per purpose."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self._cache: dict[tuple[str, str], bytes] = {}

    def key(self, tenant: str, purpose: str) -> bytes:
        cached = self._cache.get((tenant, purpose))
        if cached is None:
            hkdf = HKDF(
                algorithm=hashes.SHA256(),
                length=_KEY_BYTES,
                salt=None,
                info=f"sluice/{purpose}/{tenant}".encode(),
            )
            cached = self._cache[(tenant, purpose)] = hkdf.derive(self._master)
        return cached

    def hash_salt(self, tenant: str) -> bytes:
        return self.key(tenant, "hash")

    def seal(
        self, tenant: str, request_id: str, originals: dict[str, str], ttl_s: int
    ) -> privacy_pb2.PseudonymVault:
        expires = int((time.time() + ttl_s) * 1000)
        nonce = secrets.token_bytes(12)
        plain = privacy_pb2.PseudonymMapping(originals=originals).SerializeToString()
        sealed = AESGCM(self.key(tenant, "pseudonyms")).encrypt(
            nonce, plain, _associated(tenant, request_id, expires)
        )
        return privacy_pb2.PseudonymVault(
            tenant=tenant, request_id=request_id, expires_at_unix_ms=expires, nonce=nonce, ciphertext=sealed
        )

    def open(self, vault: privacy_pb2.PseudonymVault, tenant: str, request_id: str) -> dict[str, str]:
        """The mapping, only for the tenant and request it was sealed for and before it expires."""
        if vault.tenant != tenant or vault.request_id != request_id:
            raise VaultError("pseudonyms: vault belongs to another tenant or request")
        if vault.expires_at_unix_ms < time.time() * 1000:
            raise VaultError("pseudonyms: vault expired")
        try:
            plain = AESGCM(self.key(tenant, "pseudonyms")).decrypt(
                vault.nonce, vault.ciphertext, _associated(tenant, request_id, vault.expires_at_unix_ms)
            )
        except (InvalidTag, ValueError):
            raise VaultError("pseudonyms: vault does not authenticate") from None
        mapping = privacy_pb2.PseudonymMapping()
        mapping.ParseFromString(plain)
        return dict(mapping.originals)


def _associated(tenant: str, request_id: str, expires_ms: int) -> bytes:
    return f"{tenant}\0{request_id}\0{expires_ms}".encode()
