"""Who may read what: callers see only their own tenant's records.

Callers authenticate like at the gateway (`authorization: Bearer <key>`,
resolved from sluice.keys.v1 by the gateway's KeyStore). A key with role
`auditor` or `admin` reads every tenant; a `user` key only its own. A call
without a key is an operator's (every tenant) unless SLUICE_AUDIT_REQUIRE_AUTH is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.auth import KeyStore
from sluice.config import Settings
from sluice.service import Context


@dataclass(frozen=True)
class Caller:
    """`tenant` None: an operator on the local port or an auditor's key, allowed every tenant."""

    tenant: str | None

    def may_read(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


class Denied(Exception):
    """Another tenant's records were asked for; the attempt must be audited."""

    def __init__(self, caller: str, requested: str) -> None:
        super().__init__(f"tenant: a key of tenant {caller!r} may not read tenant {requested!r}")
        self.caller, self.requested = caller, requested


async def identify(context: Context, settings: Settings, require_auth: bool) -> Caller:
    metadata = dict(context.invocation_metadata() or ())
    authorization = metadata.get("authorization")
    if authorization is None and not require_auth:
        return Caller(None)
    principal = await KeyStore.shared(settings).principal(context)
    return Caller(None if principal.reads_every_tenant else principal.tenant)


def scoped_tenant(caller: Caller, requested: str) -> str:
    """The tenant a request may see: the caller's own when none is named; Denied for another."""
    if caller.tenant is None:
        return requested
    if requested and requested != caller.tenant:
        raise Denied(caller.tenant, requested)
    return caller.tenant
