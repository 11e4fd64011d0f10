"""Consumer-group lag, read from Kafka's committed offsets (the signal KEDA scales on).

Each service exports the lag of its own groups as `sluice_consumer_lag{group,topic}`,
so dashboards and alerts see the same number the autoscaler acts on; `sluice status`
reads it for every group. Replicas of one service report the same value: aggregate
with `max by (group, topic)`. On transactional topics the commit marker after the
last record counts as one message, so an idle group may show a lag of 1 per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Gauge

from sluice.kafka_security import client_options
from sluice.logs import get_logger

log = get_logger()

CONSUMER_LAG = Gauge(
    "sluice_consumer_lag",
    "Records in a consumer group's topics not yet committed by the group",
    ["group", "topic"],
)


@dataclass(frozen=True)
class GroupLag:
    group: str
    topic: str
    lag: int


class LagReader:
    """One admin client and one group-less consumer (for end offsets), reused across reads."""

    def __init__(self, bootstrap: str, client_id: str = "sluice-lag") -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        options = client_options()
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id, **options)
        offsets = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=self.client_id, **options)
        try:
            await admin.start()
            await offsets.start()
        except BaseException:
            await admin.close()
            await offsets.stop()
            raise
        self._admin, self._offsets = admin, offsets

    @property
    def started(self) -> bool:
        return self._admin is not None

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
        if self._offsets is not None:
            await self._offsets.stop()
        self._admin = self._offsets = None

    async def groups(self) -> list[str]:
        assert self._admin is not None, "start() first"
        return sorted(str(row[0]) for row in await self._admin.list_consumer_groups())

    async def lag(self, group: str, topics: Iterable[str] = ()) -> list[GroupLag]:
        """Lag per topic of `group`: committed topics, plus `topics` (uncommitted = all of it)."""
        assert self._admin is not None and self._offsets is not None, "start() first"
        committed = await self._admin.list_consumer_group_offsets(group)
        partitions = set(committed)
        for topic in topics:
            for partition in self._offsets.partitions_for_topic(topic) or ():
                partitions.add(TopicPartition(topic, partition))
        if not partitions:
            return []
        ends = await self._offsets.end_offsets(list(partitions))
        starts = await self._offsets.beginning_offsets(list(partitions))
        per_topic: dict[str, int] = defaultdict(int)
        for tp in partitions:
            meta = committed.get(tp)
            position = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            per_topic[tp.topic] += max(0, ends[tp] - position)
        return [GroupLag(group, topic, lag) for topic, lag in sorted(per_topic.items())]


async def export_lag(
    bootstrap: str, service: str, groups: Mapping[str, Iterable[str]], interval_s: float = 15.0
) -> None:
    """Refresh `sluice_consumer_lag` for `groups` (group -> topics) every `interval_s`.

    Runs until cancelled and never raises: a metric must not take a service down.
    """
    if not groups:
        await asyncio.Event().wait()
    reader = LagReader(bootstrap, client_id=f"sluice-{service}-lag")
    try:
        while True:
            try:
                if not reader.started:
                    await reader.start()
                for group, topics in groups.items():
                    for row in await reader.lag(group, topics):
                        CONSUMER_LAG.labels(row.group, row.topic).set(row.lag)
            except Exception as exc:  # the next round retries with fresh clients
                log.warning("consumer lag not read", error=type(exc).__name__)
                with contextlib.suppress(Exception):
                    await reader.close()
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(Exception):
            await reader.close()
