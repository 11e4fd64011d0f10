"""Per-tenant audit policy: whether the trail keeps (redacted) content. Default: it does not.

Read from a YAML file that operators may edit while the service runs, e.g.

    tenants:
      demo: {store_content: true}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from sluice.logs import get_logger

log = get_logger()


class TenantPolicy(BaseModel):
    store_content: bool = False


class PolicyFile(BaseModel):
    tenants: dict[str, TenantPolicy] = {}


@dataclass
class Policies:
    """Re-read when the file's mtime changes (one stat per event); a broken file keeps the last good one."""

    path: Path
    _loaded: PolicyFile = field(default_factory=PolicyFile)
    _mtime: float = -1.0

    def for_tenant(self, tenant: str) -> TenantPolicy:
        self._refresh()
        return self._loaded.tenants.get(tenant, TenantPolicy())

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._loaded, self._mtime = PolicyFile(), 0.0
            return
        if mtime == self._mtime:
            return
        try:
            self._loaded = PolicyFile.model_validate(yaml.safe_load(self.path.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as exc:
            log.error(
                "audit policy file is invalid; keeping the last good one", path=str(self.path), error=str(exc)
            )
        self._mtime = mtime
