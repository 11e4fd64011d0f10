"""Per-tenant audit policy: whether the trail keeps (redacted) content, and for how long.

Default: no content. Read from a YAML file that operators may edit while the
service runs, e.g.

    tenants:
      demo: {store_content: true, content_retention: P30D}

`content_retention` is an ISO 8601 duration or a number of seconds; unset means
content is kept until the subject is erased.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from sluice.logs import get_logger

log = get_logger()


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_content: bool = False
    content_retention: timedelta | None = None

    @field_validator("content_retention")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value.total_seconds() < 1:
            raise ValueError("must be at least 1 second")
        return value

    @property
    def retention_s(self) -> int | None:
        return None if self.content_retention is None else int(self.content_retention.total_seconds())


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantPolicy] = {}


class InvalidPolicy(ValueError):
    """The policy file does not validate; the message names the field."""


def parse_policy_file(text: str) -> PolicyFile:
    try:
        return PolicyFile.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as exc:
        raise InvalidPolicy(f"not valid YAML: {exc}") from None
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidPolicy(fields) from None


@dataclass
class Policies:
    """Re-read when the file's mtime changes (one stat per event); a broken file keeps the last good one."""

    path: Path
    _loaded: PolicyFile = field(default_factory=PolicyFile)
    _mtime: float = -1.0

    def check(self) -> None:
        """At start-up an invalid file stops the service, naming the field (later edits only log)."""
        if self.path.exists():
            try:
                parse_policy_file(self.path.read_text())
            except InvalidPolicy as exc:
                raise SystemExit(f"audit policy file {self.path}: {exc}") from None

    def for_tenant(self, tenant: str) -> TenantPolicy:
        self._refresh()
        return self._loaded.tenants.get(tenant, TenantPolicy())

    def with_retention(self) -> dict[str, int]:
        """Tenants whose content expires, and after how many seconds."""
        self._refresh()
        return {
            tenant: policy.retention_s
            for tenant, policy in self._loaded.tenants.items()
            if policy.retention_s is not None
        }

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._loaded, self._mtime = PolicyFile(), 0.0
            return
        if mtime == self._mtime:
            return
        try:
            self._loaded = parse_policy_file(self.path.read_text())
        except InvalidPolicy as exc:
            log.error(
                "audit policy file is invalid; keeping the last good one", path=str(self.path), error=str(exc)
            )
        self._mtime = mtime
