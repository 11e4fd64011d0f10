"""The pseudonym vault: AES-GCM under tenant keys derived from one master key."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from services.redaction.vault import MASTER_KEY_FILE, Keyring, VaultError, load_master_key

ORIGINALS = {"<PERSON_1>": "Jane Roe", "<EMAIL_ADDRESS_1>": "jane@example.org"}


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring(load_master_key(None, tmp_path))


def test_round_trip_for_the_same_tenant_and_request(keyring: Keyring) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=60)
    assert b"Jane Roe" not in vault.SerializeToString()
    assert keyring.open(vault, "acme", "r1") == ORIGINALS


@pytest.mark.parametrize(("tenant", "request_id"), [("other", "r1"), ("acme", "r2")])
def test_another_tenant_or_request_cannot_open_it(keyring: Keyring, tenant: str, request_id: str) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=60)
    with pytest.raises(VaultError, match=r"^pseudonyms: vault belongs to another"):
        keyring.open(vault, tenant, request_id)


def test_a_relabelled_vault_does_not_authenticate(keyring: Keyring) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=60)
    vault.tenant, vault.request_id = "other", "r2"
    with pytest.raises(VaultError, match="does not authenticate"):
        keyring.open(vault, "other", "r2")


def test_an_extended_expiry_does_not_authenticate(keyring: Keyring) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=60)
    vault.expires_at_unix_ms += 3_600_000
    with pytest.raises(VaultError, match="does not authenticate"):
        keyring.open(vault, "acme", "r1")


def test_an_expired_vault_is_refused(keyring: Keyring) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=-1)
    with pytest.raises(VaultError, match="expired"):
        keyring.open(vault, "acme", "r1")


def test_a_tampered_ciphertext_is_refused(keyring: Keyring) -> None:
    vault = keyring.seal("acme", "r1", ORIGINALS, ttl_s=60)
    vault.ciphertext = bytes([vault.ciphertext[0] ^ 1]) + vault.ciphertext[1:]
    with pytest.raises(VaultError):
        keyring.open(vault, "acme", "r1")


def test_master_key_file_is_private_and_stable(tmp_path: Path) -> None:
    first = load_master_key(None, tmp_path)
    assert load_master_key(None, tmp_path) == first
    mode = (tmp_path / MASTER_KEY_FILE).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    # Two processes (redaction, gateway) derive the same tenant keys from it.
    assert Keyring(first).key("acme", "pseudonyms") == Keyring(load_master_key(None, tmp_path)).key(
        "acme", "pseudonyms"
    )
    assert Keyring(first).key("acme", "pseudonyms") != Keyring(first).key("other", "pseudonyms")


def test_configured_master_key_is_validated(tmp_path: Path) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    assert load_master_key(key, tmp_path) == bytes(range(32))
    with pytest.raises(ValueError, match=r"^SLUICE_REDACTION_MASTER_KEY: must decode to 32 bytes"):
        load_master_key(base64.b64encode(b"short").decode(), tmp_path)
    with pytest.raises(ValueError, match=r"^SLUICE_REDACTION_MASTER_KEY: not valid base64"):
        load_master_key("not base64!!", tmp_path)
