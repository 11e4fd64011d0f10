"""Restoring pseudonyms in the answer, for the caller who sent the originals.

Redaction seals a request's placeholder -> original mapping with the tenant's
key and puts it on this gateway's reply partition before any chunk. Only the
gateway holding the waiting call opens it (tenant, request id and expiry are
authenticated), keeps it in memory for that call only, and never logs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.redaction.streaming import PlaceholderRestorer
from services.redaction.vault import Keyring, VaultError
from sluice.logs import get_logger
from sluice.v1 import privacy_pb2

log = get_logger()


@dataclass
class Restoration:
    """One call's restorer: a pass-through until its vault arrives."""

    keyring: Keyring | None
    tenant: str
    request_id: str
    _originals: dict[str, str] = field(default_factory=dict)
    _restorer: PlaceholderRestorer = field(default_factory=lambda: PlaceholderRestorer({}))

    def open(self, vault: privacy_pb2.PseudonymVault) -> None:
        if self.keyring is None:
            return
        try:
            originals = self.keyring.open(vault, self.tenant, self.request_id)
        except VaultError as exc:
            log.warning("pseudonyms not restored", reason=str(exc))
            return
        self._originals = originals
        self._restorer = PlaceholderRestorer(originals)

    def restart(self) -> None:
        """The answer starts over (a re-run attempt): drop any held-back text."""
        self._restorer = PlaceholderRestorer(self._originals)

    def push(self, delta: str) -> str:
        return self._restorer.push(delta)

    def finish(self) -> str:
        return self._restorer.finish()
