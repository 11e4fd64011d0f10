"""`sluice ingress secret` prints what a producer signs with: for the holder of the key, or for an
admin by key id; never the stored hash, which anyone reading sluice.keys.v1 sees."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

from pydantic import SecretStr

from services.gateway.ingress import IngressSigning
from sluice.config import Settings
from sluice.stack import Stack
from tests.ingress.conftest import IngressKey


def sluice(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = Stack(settings).child_env()
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_secret_is_derived_from_the_master_key_not_the_stored_hash(
    stack_settings: Settings, demo: IngressKey
) -> None:
    done = sluice(stack_settings, "--json", "ingress", "secret", "--api-key", demo.key)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    expected = IngressSigning.from_settings(stack_settings).secret(demo.key_id).hex()
    assert printed == {"key_id": demo.key_id, "tenant": "demo", "secret": expected}
    assert expected != bytes(demo.record.key_hash).hex()
    # Another key gets another secret; another master key, another secret too.
    assert IngressSigning.from_settings(stack_settings).secret("0123456789ab").hex() != expected
    other = SecretStr(base64.b64encode(b"k" * 32).decode())
    other_master = stack_settings.model_copy(update={"redaction_master_key": other})
    assert IngressSigning.from_settings(other_master).secret(demo.key_id).hex() != expected


def test_an_admin_retrieves_a_keys_secret_by_id(stack_settings: Settings, demo: IngressKey) -> None:
    done = sluice(stack_settings, "--json", "ingress", "secret", "--key-id", demo.key_id)
    assert done.returncode == 0, done.stderr
    expected = IngressSigning.from_settings(stack_settings).secret(demo.key_id).hex()
    assert json.loads(done.stdout)["secret"] == expected
    missing = sluice(stack_settings, "ingress", "secret", "--key-id", "0123456789ab")
    assert missing.returncode != 0 and "unknown or revoked" in missing.stderr


def test_keys_create_shows_the_signing_secret_once(stack_settings: Settings) -> None:
    done = sluice(stack_settings, "--json", "keys", "create", "--tenant", "demo")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    expected = IngressSigning.from_settings(stack_settings).secret(created["key_id"]).hex()
    assert created["ingress_secret"] == expected


def test_a_wrong_key_gets_nothing(stack_settings: Settings, demo: IngressKey) -> None:
    forged = demo.key[:-4] + "AAAA"
    done = sluice(stack_settings, "ingress", "secret", "--api-key", forged)
    assert done.returncode != 0 and "unknown or revoked" in done.stderr and done.stdout == ""
