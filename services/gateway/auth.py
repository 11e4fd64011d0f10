"""API keys: only their SHA-256 digests are stored, mapped to a tenant."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from sluice.service import Context

DEMO_TENANT = "demo"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(state_dir: Path) -> Path:
    return state_dir / "tenants.json"


def demo_key_file(state_dir: Path) -> Path:
    return state_dir / "keys" / f"{DEMO_TENANT}.key"


def ensure_demo_key(state_dir: Path) -> str:
    """Seed the local `demo` tenant once, so a fresh stack is usable with no set-up."""
    key_path = demo_key_file(state_dir)
    if key_path.exists():
        key = key_path.read_text().strip()
    else:
        key = f"sk-sluice-{DEMO_TENANT}-{secrets.token_urlsafe(24)}"
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
    path = keys_file(state_dir)
    digests: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if digests.get(_digest(key)) != DEMO_TENANT:
        digests[_digest(key)] = DEMO_TENANT
        path.write_text(json.dumps(digests, indent=2, sort_keys=True))
    return key


@dataclass(frozen=True)
class KeyStore:
    digests: dict[str, str]

    @classmethod
    def load(cls, state_dir: Path) -> KeyStore:
        path = keys_file(state_dir)
        return cls(json.loads(path.read_text()) if path.exists() else {})

    async def authenticate(self, context: Context) -> str:
        """The caller's tenant, or abort the call with UNAUTHENTICATED."""
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        tenant = self.tenant_for(str(authorization) if authorization else None)
        if tenant is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: missing or unknown API key (send 'authorization: Bearer <key>')",
            )
        assert tenant is not None
        return tenant

    def tenant_for(self, authorization: str | None) -> str | None:
        """Tenant for an `authorization: Bearer <key>` value, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self.digests.get(_digest(key.strip()))
