import pytest
from google.protobuf import json_format

from sluice import topics
from sluice.config import load_settings
from sluice.envelope import new_envelope
from sluice.topics import BadEvent, Codec, load_plan, message_class
from sluice.v1 import events_pb2

BRIEF_TOPICS = {
    topics.REQUESTS,
    topics.REDACTED,
    topics.PROMPTS,
    topics.TOKENS,
    topics.COMPLETIONS,
    topics.USAGE,
    topics.BUDGETS,
    topics.AUDIT,
    topics.DLQ,
}


@pytest.fixture(scope="module")
def plan() -> topics.TopicPlan:
    return load_plan(load_settings().topics_file)


def test_plan_declares_every_topic_of_the_brief(plan: topics.TopicPlan) -> None:
    assert set(plan.topics) >= BRIEF_TOPICS


def test_every_request_event_carries_an_envelope(plan: topics.TopicPlan) -> None:
    """Request lifecycle events need the envelope to dedupe and trace; state topics
    (catalogs, keys, policies, budgets) and the audit chain carry their own ids."""
    for name, spec in plan.topics.items():
        fields = message_class(spec.value).DESCRIPTOR.fields_by_name
        if spec.key == "request_id" and name != topics.AUDIT:
            assert "envelope" in fields, name


def test_budgets_are_compacted_and_audit_is_one_ordered_partition(plan: topics.TopicPlan) -> None:
    assert plan.topics[topics.BUDGETS].cleanup_policy == "compact"
    assert plan.topics[topics.AUDIT].partitions == 1
    assert plan.topics[topics.USAGE].retention_ms == -1


def test_requests_have_the_shortest_retention(plan: topics.TopicPlan) -> None:
    """Raw prompts live only on sluice.requests.v1, so it must not outlive what follows it.

    Live-only signal topics (reply tokens, cancels) are read as they happen and expire sooner.
    """
    live_only = (topics.REQUESTS, topics.TOKENS, topics.CONTROL)
    others = [s.retention_ms for n, s in plan.topics.items() if n not in live_only]
    assert all(r == -1 or r >= plan.topics[topics.REQUESTS].retention_ms for r in others)


def test_codec_decodes_binary_and_json(plan: topics.TopicPlan) -> None:
    event = events_pb2.GenerationRequested(
        envelope=new_envelope(request_id="r", tenant="t", producer="p"), model="m"
    )
    codec = Codec(plan)
    assert codec.decode(topics.REQUESTS, event.SerializeToString()) == event
    as_json = json_format.MessageToJson(event).encode()
    assert codec.decode(topics.REQUESTS, as_json, topics.JSON_CONTENT_TYPE) == event


@pytest.mark.parametrize("value", [b"\xff\xff\xff", None])
def test_codec_rejects_garbage(plan: topics.TopicPlan, value: bytes | None) -> None:
    with pytest.raises(BadEvent):
        Codec(plan).decode(topics.REQUESTS, value)


def test_codec_error_for_json_does_not_echo_values(plan: topics.TopicPlan) -> None:
    bad = b'{"params": {"maxTokens": "jane.doe@example.com"}}'
    with pytest.raises(BadEvent) as caught:
        Codec(plan).decode(topics.REQUESTS, bad, topics.JSON_CONTENT_TYPE)
    assert "jane.doe" not in str(caught.value)
    assert "max_tokens" in str(caught.value) or "maxTokens" in str(caught.value)
