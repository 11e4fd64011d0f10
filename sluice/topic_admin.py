"""`sluice topics apply`: make the cluster match schemas/topics.yaml, and say how it differs."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from sluice.kafka import with_backoff
from sluice.kafka_security import client_options
from sluice.topics import TopicPlan


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # Human-readable differences we do not fix automatically (they can lose data).
    drift: list[str] = field(default_factory=list)


async def apply(bootstrap: str, plan: TopicPlan, timeout_s: float = 30.0) -> ApplyReport:
    async def start() -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, **client_options(), client_id="sluice-topics"
        )
        await admin.start()
        return admin

    admin = await with_backoff("admin", "cli", start)
    report = ApplyReport()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in plan.topics if name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        name,
                        plan.topics[name].partitions,
                        plan.replication(name),
                        topic_configs=plan.topics[name].configs(),
                    )
                    for name in missing
                ],
                timeout_ms=int(timeout_s * 1000),
            )
            report.created = missing
        present = [name for name in plan.topics if name in existing]
        if present:
            await _check_drift(admin, plan, present, report)
    finally:
        await admin.close()
    return report


async def _check_drift(
    admin: AIOKafkaAdminClient, plan: TopicPlan, names: list[str], report: ApplyReport
) -> None:
    described = await admin.describe_topics(names)
    partitions = {t["topic"]: len(t["partitions"]) for t in described}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            _, _, _, name, entries = resource[:5]
            configs[name] = {entry[0]: entry[1] for entry in entries}
    for name in names:
        spec = plan.topics[name]
        before = len(report.drift)
        if partitions.get(name) != spec.partitions:
            report.drift.append(f"{name}: partitions {partitions.get(name)} (plan {spec.partitions})")
        for key, wanted in spec.configs().items():
            actual = configs.get(name, {}).get(key)
            if actual != wanted:
                report.drift.append(f"{name}: {key}={actual} (plan {wanted})")
        if len(report.drift) == before:
            report.unchanged.append(name)
