"""SubmitFeedback and GetFeedbackStats: ratings of answers, only by the tenant that asked.

Ownership comes from the request index (services/gateway/request_index.py), so
any replica can answer. Another tenant's request and an unknown one get the
same NOT_FOUND, so a caller cannot probe for ids. A request that has not
finished yet is refused FAILED_PRECONDITION (rate it once its answer is there).

The comment goes through the redaction service's Redactor.Redact with the
caller's own key (hence the tenant's policy) before anything is published. If
redaction cannot be reached the feedback is refused UNAVAILABLE: it fails
closed, never published raw.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.gateway.feedback_view import FeedbackView
from services.gateway.request_index import RequestIndex
from services.gateway.validation import Invalid
from sluice import envelope as envelopes
from sluice import tls
from sluice.config import Settings
from sluice.kafka import ENTRY_HEADER, Output, send
from sluice.logs import get_logger
from sluice.service import Context, Runtime
from sluice.topics import FEEDBACK, Codec, load_plan
from sluice.v1 import events_pb2, feedback_pb2, gateway_pb2, redaction_pb2, redaction_pb2_grpc
from streams.feedback_stats import FeedbackStream, rating_class

log = get_logger()

MAX_LABELS = 8
LABEL = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_COMMENT_CHARS = 2000
# How long a lookup may wait for the index to read what was committed before the call.
CATCH_UP_S = 5.0
SCALES = {
    feedback_pb2.RATING_SCALE_THUMBS: "-1, 0 or 1",
    feedback_pb2.RATING_SCALE_STARS: "1 to 5",
}


def check_feedback(request: gateway_pb2.SubmitFeedbackRequest) -> None:
    """Raise Invalid naming the first bad field."""

    def bad(message: str) -> Invalid:
        return Invalid(grpc.StatusCode.INVALID_ARGUMENT, message)

    if not request.request_id.strip():
        raise bad("request_id: must not be empty")
    if request.scale not in SCALES:
        raise bad("scale: must be RATING_SCALE_THUMBS or RATING_SCALE_STARS")
    if rating_class(request.scale, request.rating) is None:
        name = feedback_pb2.RatingScale.Name(request.scale)
        raise bad(f"rating: must be {SCALES[request.scale]} on {name}, got {request.rating}")
    if len(request.labels) > MAX_LABELS:
        raise bad(f"labels: at most {MAX_LABELS}, got {len(request.labels)}")
    for i, label in enumerate(request.labels):
        if not LABEL.fullmatch(label):
            raise bad(f"labels[{i}]: must be 1-32 of a-z, 0-9, '_' or '-', starting with a letter")
    if len(request.comment) > MAX_COMMENT_CHARS:
        raise bad(f"comment: at most {MAX_COMMENT_CHARS} characters, got {len(request.comment)}")


@dataclass
class Feedback:
    """The gateway's feedback desk: its RPCs and the background readers they rely on."""

    settings: Settings
    index: RequestIndex = field(init=False)
    view: FeedbackView = field(init=False)
    stream: FeedbackStream = field(init=False)
    _redactor: redaction_pb2_grpc.RedactorAsyncStub | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        path = settings.state_dir / "gateway" / f"requests-{settings.gateway_reply_partition}.sqlite"
        self.index = RequestIndex(settings.bootstrap, path, Codec(load_plan(settings.topics_file)))
        self.view = FeedbackView(settings.bootstrap)
        self.stream = FeedbackStream(settings)

    def background(self) -> Sequence[Coroutine[Any, Any, None]]:
        return (self.index.run(), self.view.run(), self.stream.run())

    async def submit(
        self,
        request: gateway_pb2.SubmitFeedbackRequest,
        context: Context,
        tenant: str,
        key_id: str,
        runtime: Runtime,
    ) -> gateway_pb2.SubmitFeedbackResponse:
        try:
            check_feedback(request)
        except Invalid as exc:
            await context.abort(exc.code, exc.message)
        await self._check_owner(request.request_id, tenant, context)
        redacted = await self._redact(request.comment, context)
        envelope = envelopes.new_envelope(request_id=request.request_id, tenant=tenant, producer="gateway")
        event = events_pb2.FeedbackSubmitted(
            envelope=envelope,
            scale=request.scale,
            rating=request.rating,
            labels=request.labels,
            comment=redacted.text,
            feedback_id=envelope.event_id,
            comment_entity_counts=redacted.entity_counts,
            policy_version=redacted.policy_version,
            key_id=key_id,
        )
        # A request may be rated more than once: the entry header keeps consumers'
        # duplicate checks from taking a second rating for a redelivery of the first.
        headers = ((ENTRY_HEADER, envelope.event_id.encode()),)
        await send(runtime.producer, "gateway", Output(FEEDBACK, event, request.request_id, headers=headers))
        log.info(
            "feedback published",
            request_id=request.request_id,
            tenant=tenant,
            scale=feedback_pb2.RatingScale.Name(request.scale),
            rating=request.rating,
            labels=len(request.labels),
            comment_entities=sum(redacted.entity_counts.values()),
        )
        return gateway_pb2.SubmitFeedbackResponse(accepted=True, feedback_id=envelope.event_id)

    async def _check_owner(self, request_id: str, tenant: str, context: Context) -> None:
        known = self.index.lookup(request_id)
        if known is None or not known.finished:
            if not await self.index.caught_up(CATCH_UP_S):
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "request_id: the request index is catching up; retry shortly"
                )
            known = self.index.lookup(request_id)
        if known is None or known.tenant != tenant:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no request {request_id}")
        assert known is not None
        if not known.finished:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request_id: request {request_id} has not finished; rate it once its answer is complete",
            )

    async def _redact(self, comment: str, context: Context) -> redaction_pb2.RedactResponse:
        """The comment under the caller's tenant policy; aborts (never passes it on raw) on failure."""
        if not comment.strip():
            return redaction_pb2.RedactResponse()
        if self._redactor is None:
            channel = tls.aio_channel(self.settings, self.settings.grpc_target("redaction"))
            self._redactor = redaction_pb2_grpc.RedactorStub(channel)
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            response: redaction_pb2.RedactResponse = await self._redactor.Redact(
                redaction_pb2.RedactRequest(text=comment),
                metadata=(("authorization", str(authorization)),),
                timeout=self.settings.redaction_deadline_s + 2,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"comment: {exc.details()}")
            log.warning("comment redaction failed; feedback refused", code=exc.code().name)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"comment: redaction unavailable ({exc.code().name}); feedback not stored, retry later",
            )
            raise  # abort raises; this keeps type checkers informed
        return response

    async def stats(
        self,
        request: feedback_pb2.GetFeedbackStatsRequest,
        context: Context,
        tenant: str,
        reads_every_tenant: bool = False,
    ) -> feedback_pb2.GetFeedbackStatsResponse:
        """The caller's tenant's stats; another tenant's only for an auditor or admin key."""
        if request.tenant and request.tenant != tenant and not reads_every_tenant:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant: a key of tenant {tenant!r} may not read tenant {request.tenant!r}",
            )
        return feedback_pb2.GetFeedbackStatsResponse(
            stats=self.view.query(request.tenant or tenant, request.model)
        )
