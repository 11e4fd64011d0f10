"""`sluice ingress secret` prints what a producer signs with, only for the holder of the key."""

from __future__ import annotations

import json
import subprocess
import sys

from sluice.config import Settings
from sluice.stack import Stack
from tests.ingress.conftest import IngressKey


def sluice(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = Stack(settings).child_env()
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_secret_is_the_stored_hash_of_the_key(stack_settings: Settings, demo: IngressKey) -> None:
    done = sluice(stack_settings, "--json", "ingress", "secret", "--api-key", demo.key)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == {"key_id": demo.key_id, "tenant": "demo", "secret": bytes(demo.record.key_hash).hex()}


def test_a_wrong_key_gets_nothing(stack_settings: Settings, demo: IngressKey) -> None:
    forged = demo.key[:-4] + "AAAA"
    done = sluice(stack_settings, "ingress", "secret", "--api-key", forged)
    assert done.returncode != 0 and "unknown or revoked" in done.stderr and done.stdout == ""
