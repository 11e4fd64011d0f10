"""The opaque end-user id every service uses once a request has passed redaction."""

from __future__ import annotations

import hashlib
import re

PSEUDONYM = re.compile(r"^u-[0-9a-f]{20}$")


def pseudonymous_user(tenant: str, user: str) -> str:
    """A stable per-tenant pseudonym for an end-user id (ids are often emails).

    Redaction applies it on the request path and audit applies it to look a user up
    by the id the caller sent, so both name the same person. An id already in this
    form is kept as it is.
    """
    if not user or PSEUDONYM.match(user):
        return user
    return "u-" + hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()[:20]
