"""Feedback joined to what was rated, counted per model, template version and A/B variant.

A faust-streaming app with exactly-once processing, embedded in the gateway:

- `route` reads assembled prompts (template name, version, variant), completions
  (model, tenant) and feedback, keeps only ids and the rating (never prompt or
  comment text) and re-keys them by request_id onto an internal topic with a
  fixed partition count: the three source topics have different partition
  counts, so they are not co-partitioned themselves.
- `join` folds each request in a table. Once its prompt, its completion and a
  rating from the request's own tenant are all there (in whatever order they
  arrive) the rating counts for the request's group; a newer rating of the same
  request moves its count instead of adding a second one.
- `count` keeps the totals per group and publishes each to the compacted
  sluice.feedback-stats.v1, which every gateway reads to answer GetFeedbackStats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka.admin import NewTopic
from faust.types import StreamT
from google.protobuf.message import DecodeError

from sluice.config import Settings
from sluice.kafka_security import faust_credentials
from sluice.logs import get_logger
from sluice.topics import COMPLETIONS, FEEDBACK, PROMPTS
from sluice.v1 import events_pb2, feedback_pb2
from streams.embedded import changelogs, declare_topics, run_until_cancelled

log = get_logger()

APP_ID = "sluice-feedback-stats"
FEEDBACK_STATS = "sluice.feedback-stats.v1"
JOINED = "sluice-feedback-stats-joined"
RATED = "sluice-feedback-stats-rated"
INTERNAL_PARTITIONS = 3
CLASSES = ("positive", "negative", "neutral")
# faust names a table's changelog topic "<app id>-<table>-changelog".
CHANGELOGS = (f"{APP_ID}-requests-changelog", f"{APP_ID}-counts-changelog")


def rating_class(scale: int, rating: int) -> str | None:
    """positive, negative or neutral; None for a rating outside its scale."""
    if scale == feedback_pb2.RATING_SCALE_THUMBS and rating in (-1, 0, 1):
        return {1: "positive", -1: "negative", 0: "neutral"}[rating]
    if scale == feedback_pb2.RATING_SCALE_STARS and 1 <= rating <= 5:
        return "positive" if rating >= 4 else "negative" if rating <= 2 else "neutral"
    return None


@dataclass(frozen=True)
class Group:
    """What a rating is counted under."""

    tenant: str
    model: str
    template_name: str
    template_version: int
    variant: str

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.model}/{self.template_name}@{self.template_version}/{self.variant}"


def joined_fact(topic: str, value: bytes) -> dict[str, Any] | None:
    """The ids and numbers the join needs from one source record; None if undecodable."""
    try:
        if topic == PROMPTS:
            prompt = events_pb2.PromptAssembled.FromString(value)
            used = prompt.template_used
            return {
                "kind": "prompt",
                "request_id": prompt.envelope.request_id,
                "tenant": prompt.envelope.tenant,
                "model": prompt.model,
                "template_name": used.name,
                "template_version": used.version,
                "variant": used.variant,
            }
        if topic == COMPLETIONS:
            done = events_pb2.CompletionFinished.FromString(value)
            return {
                "kind": "completion",
                "request_id": done.envelope.request_id,
                "tenant": done.envelope.tenant,
                "model": done.model,
            }
        rated = events_pb2.FeedbackSubmitted.FromString(value)
        return {
            "kind": "feedback",
            "request_id": rated.envelope.request_id,
            "tenant": rated.envelope.tenant,
            "class": rating_class(rated.scale, rated.rating),
        }
    except DecodeError:
        return None


def settle(state: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(count to withdraw, count to add) once a request has a prompt, a completion and a rating.

    A count names its group and class. Feedback from another tenant than the
    request's never counts (a producer may write to sluice.feedback.v1 directly).
    """
    if not (state.get("prompt") and state.get("completed") and state.get("class")):
        return None, None
    if state.get("rated_by") != state.get("tenant"):
        return None, None
    group = Group(
        state["tenant"], state["model"], state["template_name"], state["template_version"], state["variant"]
    )
    new = {"group": group.__dict__, "key": group.key, "class": state["class"]}
    old = state.get("counted")
    if old == new:
        return None, None
    return old, new


class FeedbackStream:
    """The faust app, wired to the settings of the gateway process that embeds it."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.bootstrap
        replica = settings.gateway_reply_partition
        self.app = faust.App(
            APP_ID,
            broker=f"kafka://{settings.bootstrap}",
            broker_credentials=faust_credentials(settings),
            processing_guarantee="exactly_once",
            store="memory://",
            datadir=str(settings.state_dir / "gateway" / f"feedback-faust-{replica}"),
            web_enabled=False,
            autodiscover=False,
            topic_replication_factor=1,
            topic_partitions=INTERNAL_PARTITIONS,
            broker_commit_interval=1.0,  # stats may lag a second; fewer transactions
            consumer_auto_offset_reset="earliest",
        )
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
        raw["value_serializer"] = "raw"
        self.inputs = self.app.topic(PROMPTS, COMPLETIONS, FEEDBACK, **raw)
        self.joined = self.app.topic(JOINED, internal=True, partitions=INTERNAL_PARTITIONS, **raw)
        self.rated = self.app.topic(RATED, internal=True, partitions=INTERNAL_PARTITIONS, **raw)
        self.stats_out = self.app.topic(FEEDBACK_STATS, **raw)
        # request_id -> what is known of it (JSON): tenant, model, template, class, counted
        self.requests = self.app.Table("requests", default=None)
        # group key -> {"group": {...}, "positive": n, "negative": n, "neutral": n}
        self.counts = self.app.Table("counts", default=None)
        self.app.agent(self.inputs, name="route")(self._route)
        self.app.agent(self.joined, name="join")(self._join)
        self.app.agent(self.rated, name="count")(self._count)
        self.app.finalize()

    async def run(self) -> None:
        """Run embedded in the gateway process until cancelled."""
        internal = [NewTopic(t, INTERNAL_PARTITIONS, 1) for t in (JOINED, RATED)]
        tables = changelogs(APP_ID, ("requests", "counts"), INTERNAL_PARTITIONS)
        await declare_topics(self.bootstrap, "gateway", APP_ID, [*internal, *tables])
        await run_until_cancelled(self.app)

    async def _route(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            value: bytes | None = event.value
            if value is None:
                continue
            fact = joined_fact(event.message.topic, value)
            if fact is None or not fact["request_id"]:
                log.warning(
                    "undecodable record skipped", topic=event.message.topic, offset=event.message.offset
                )
                continue
            await self.joined.send(key=fact["request_id"].encode(), value=json.dumps(fact).encode())

    async def _join(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            fact = json.loads(event.value)
            request_id = fact["request_id"]
            state = dict(self.requests.get(request_id) or {})
            kind = fact["kind"]
            if kind == "prompt":
                state.update({k: fact[k] for k in ("model", "template_name", "template_version", "variant")})
                state["prompt"] = True
                state.setdefault("tenant", fact["tenant"])
            elif kind == "completion":
                state["completed"] = True
                state["model"] = fact["model"] or state.get("model", "")
                state.setdefault("tenant", fact["tenant"])
            elif fact["class"] is not None and state.get("tenant", fact["tenant"]) == fact["tenant"]:
                state["class"], state["rated_by"] = fact["class"], fact["tenant"]
            old, new = settle(state)
            if new is not None:
                for count, step in ((old, -1), (new, 1)):
                    if count is not None:
                        body = json.dumps({**count, "step": step}).encode()
                        await self.rated.send(key=count["key"].encode(), value=body)
                state["counted"] = new
            self.requests[request_id] = state

    async def _count(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            change = json.loads(event.value)
            key = change["key"]
            totals = dict(self.counts.get(key) or {"group": change["group"], **dict.fromkeys(CLASSES, 0)})
            totals[change["class"]] = max(0, totals[change["class"]] + change["step"])
            self.counts[key] = totals
            await self.stats_out.send(key=key.encode(), value=stats_message(totals).SerializeToString())


def stats_message(totals: dict[str, Any]) -> feedback_pb2.FeedbackStats:
    ratings = sum(totals[c] for c in CLASSES)
    stats = feedback_pb2.FeedbackStats(
        **totals["group"],
        ratings=ratings,
        positive=totals["positive"],
        negative=totals["negative"],
        neutral=totals["neutral"],
        positive_ratio=totals["positive"] / ratings if ratings else 0.0,
    )
    stats.updated_at.GetCurrentTime()
    return stats
