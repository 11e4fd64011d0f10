"""Prometheus metrics shared by every service. Labels are bounded and content-free."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_CONSUMED = Counter(
    "sluice_events_consumed_total", "Kafka records handled", ["service", "topic", "outcome"]
)
EVENTS_PRODUCED = Counter("sluice_events_produced_total", "Kafka records produced", ["service", "topic"])
HANDLER_SECONDS = Histogram(
    "sluice_handler_seconds",
    "Time to handle one Kafka record, output included",
    ["service", "topic"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
KAFKA_CONNECT_RETRIES = Counter(
    "sluice_kafka_connect_retries_total", "Failed attempts to reach the Kafka cluster", ["service"]
)
