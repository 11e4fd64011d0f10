from pathlib import Path

import yaml

from sluice.config import load_settings
from sluice.stack import Stack


def test_apply_is_idempotent(topics_ready: str) -> None:
    stack = Stack(load_settings(kafka_bootstrap=topics_ready))
    report = stack.apply_topics()  # the session fixture applied it once already
    assert report.created == []
    assert report.drift == []
    assert len(report.unchanged) == len(yaml.safe_load(stack.settings.topics_file.read_text())["topics"])


def test_drift_is_reported_not_fixed(topics_ready: str, tmp_path: Path) -> None:
    plan = yaml.safe_load(load_settings().topics_file.read_text())
    plan["topics"]["sluice.dlq.v1"]["partitions"] = 5
    plan["topics"]["sluice.usage.v1"]["retention_ms"] = 1234
    plan["topics"]["sluice.test-new.v1"] = {
        "partitions": 2,
        "key": "request_id",
        "value": "sluice.v1.DeadLetter",
        "retention_ms": 60000,
        "cleanup_policy": "delete",
    }
    changed = tmp_path / "topics.yaml"
    changed.write_text(yaml.safe_dump(plan))
    report = Stack(load_settings(kafka_bootstrap=topics_ready, topics_file=changed)).apply_topics()
    assert report.created == ["sluice.test-new.v1"]
    assert "sluice.dlq.v1: partitions 1 (plan 5)" in report.drift
    assert "sluice.usage.v1: retention.ms=-1 (plan 1234)" in report.drift
    # Nothing was changed on the cluster: the real plan still matches.
    assert Stack(load_settings(kafka_bootstrap=topics_ready)).apply_topics().drift == []
