"""A periodic check that the indexed audit chain still verifies, exported as a metric.

`sluice audit verify` answers when someone asks; this answers all the time, so the
"audit chain broken" alert fires without anyone asking. The walk is incremental:
each round verifies only the records indexed since the last, in constant memory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import Gauge

from services.audit import chain
from services.audit.store import AuditStore
from sluice.logs import get_logger

log = get_logger()

CHAIN_VALID = Gauge(
    "sluice_audit_chain_valid", "1 while every indexed audit record verifies; 0 once a link breaks"
)
CHAIN_VERIFIED = Gauge(
    "sluice_audit_chain_verified_records", "Audit records the periodic chain check has verified"
)


class ChainWatch:
    """Verifies newly indexed records every `interval_s`; remembers where it stopped."""

    def __init__(self, location: Path | str, interval_s: float) -> None:
        self.location, self.interval_s = location, interval_s
        self.walk = chain.ChainWalk()
        self.walk.start_after(None)
        self.next_offset = 0

    def check(self) -> bool:
        """Feed every record indexed since the last check; False once the chain is broken."""
        if self.walk.valid:
            store = AuditStore(self.location)
            try:
                for offset, record in store.walk(self.next_offset):
                    self.next_offset = offset + 1
                    if not self.walk.feed(record, offset):
                        broken = self.walk
                        log.error("audit chain broken", seq=broken.broken_seq, offset=broken.broken_offset)
                        break
            finally:
                store.close()
        CHAIN_VALID.set(1 if self.walk.valid else 0)
        CHAIN_VERIFIED.set(self.walk.checked)
        return self.walk.valid

    async def run(self) -> None:
        CHAIN_VALID.set(1)
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # a failed check is retried; it must not stop the writer
                log.warning("audit chain check failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval_s)
