"""What every faust app embedded in a Sluice service needs, learned the hard way.

The broker never auto-creates topics: a faust consumer that starts before its
internal topic exists keeps stale metadata for minutes and sits idle, and a
table whose changelog does not exist yet crashes its agent. So the topics are
declared before the app starts. And a SIGTERM that lands while faust is still
starting must still stop it, or the process never exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from sluice.kafka import with_backoff
from sluice.kafka_security import client_options
from sluice.logs import get_logger

log = get_logger()
COMPACT = {"cleanup.policy": "compact"}


def changelogs(app_id: str, tables: Iterable[str], partitions: int) -> list[NewTopic]:
    """The compacted changelog topics faust uses for `tables` (named `<app>-<table>-changelog`)."""
    return [NewTopic(f"{app_id}-{t}-changelog", partitions, 1, topic_configs=COMPACT) for t in tables]


async def declare_topics(bootstrap: str, service: str, client_id: str, wanted: Iterable[NewTopic]) -> None:
    """Create whichever of `wanted` is missing; another replica winning the race is fine."""
    topics = list(wanted)

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(), client_id=client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t.name not in existing]
            if missing:
                await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()

    await with_backoff(f"{client_id} topics", service, create)


async def run_until_cancelled(app: faust.App, started: asyncio.Event | None = None) -> None:
    """Start `app`, then run until cancelled; stop it however we leave, even mid-start."""
    try:
        await app.start()
        log.info("stream started", app=app.conf.id)
        if started is not None:
            started.set()
        await asyncio.Event().wait()
    finally:
        try:
            await app.stop()
        except Exception:  # a half-stopped app must not keep the process from exiting
            log.exception("stream did not stop cleanly", app=app.conf.id)
