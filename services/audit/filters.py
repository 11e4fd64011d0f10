"""Turns Audit RPC requests into index filters, rejecting bad input with the field's name."""

from __future__ import annotations

import base64
import binascii
import re

from google.protobuf.timestamp_pb2 import Timestamp

from services.audit.chain import CHECKPOINT
from services.audit.records import STAGES
from services.audit.store import QueryFilter
from sluice.identity import pseudonymous_user
from sluice.v1 import audit_pb2

MAX_PAGE = 1000
DEFAULT_PAGE = 100
KNOWN_STAGES = frozenset({stage for stage, _ in STAGES.values()} | {CHECKPOINT})
FINISH_REASONS = frozenset({"stop", "length", "error", "cancelled"})
ENTITY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class InvalidArgument(ValueError):
    """The message starts with the offending field's name."""


def time_range(
    request: audit_pb2.QueryRequest | audit_pb2.ReplayRequest | audit_pb2.CheckCompletenessRequest,
) -> tuple[int | None, int | None]:
    start = _ms(request, "from_time")
    end = _ms(request, "to_time")
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("to_time: must be after from_time")
    return start, end


def _ms(request: object, field: str) -> int | None:
    if not request.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp: Timestamp = getattr(request, field)
    if stamp.seconds < 0 or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(f"{field}: must be a valid time after 1970-01-01")
    return int(stamp.ToMilliseconds())


def check_stage(stage: str) -> str:
    if stage and stage not in KNOWN_STAGES:
        raise InvalidArgument(
            f"stage: unknown event type {stage!r}; one of {', '.join(sorted(KNOWN_STAGES))}"
        )
    return stage


def user_filter(tenant: str, user: str) -> str:
    """The trail's id for `user`: end-user ids are per tenant, so the tenant is needed."""
    if user and not tenant:
        raise InvalidArgument("tenant: required when filtering by user (end-user ids are per tenant)")
    return pseudonymous_user(tenant, user)


def query_filter(request: audit_pb2.QueryRequest) -> QueryFilter:
    start, end = time_range(request)
    if not 0 <= request.page_size <= MAX_PAGE:
        raise InvalidArgument(f"page_size: must be between 0 and {MAX_PAGE}")
    finish = request.finish_reason.lower()
    if finish and finish not in FINISH_REASONS:
        raise InvalidArgument(f"finish_reason: must be one of {', '.join(sorted(FINISH_REASONS))}")
    if request.entity and not ENTITY.match(request.entity):
        raise InvalidArgument("entity: must be an entity type such as EMAIL_ADDRESS")
    low = request.min_cost_nanos if request.HasField("min_cost_nanos") else None
    high = request.max_cost_nanos if request.HasField("max_cost_nanos") else None
    if low is not None and low < 0:
        raise InvalidArgument("min_cost_nanos: must not be negative")
    if low is not None and high is not None and high < low:
        raise InvalidArgument("max_cost_nanos: must be at least min_cost_nanos")
    return QueryFilter(
        tenant=request.tenant,
        from_ms=start,
        to_ms=end,
        user=user_filter(request.tenant, request.user),
        model=request.model,
        template=request.template,
        template_version=request.template_version,
        entity=request.entity,
        stage=check_stage(request.stage),
        finish_reason=finish,
        min_cost_nanos=low,
        max_cost_nanos=high,
        request_id=request.request_id,
        page_size=request.page_size or DEFAULT_PAGE,
        after=decode_page_token(request.page_token),
    )


def encode_page_token(cursor: tuple[int, int] | None) -> str:
    if cursor is None:
        return ""
    return base64.urlsafe_b64encode(f"{cursor[0]}:{cursor[1]}".encode()).decode()


def decode_page_token(token: str) -> tuple[int, int] | None:
    if not token:
        return None
    try:
        event_ms, offset = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        return int(event_ms), int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token: is not a token from a previous page") from None
