"""Feedback without a broker: field checks, rating classes, and the join's counting rules."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from services.gateway.feedback import check_feedback
from services.gateway.validation import Invalid
from sluice.topics import COMPLETIONS, FEEDBACK, PROMPTS
from sluice.v1 import envelope_pb2, events_pb2, feedback_pb2, gateway_pb2, templates_pb2
from streams.feedback_stats import joined_fact, rating_class, settle

THUMBS, STARS = feedback_pb2.RATING_SCALE_THUMBS, feedback_pb2.RATING_SCALE_STARS


def request(**fields: Any) -> gateway_pb2.SubmitFeedbackRequest:
    base: dict[str, Any] = {"request_id": "r1", "scale": THUMBS, "rating": 1}
    return gateway_pb2.SubmitFeedbackRequest(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "   "}, "request_id"),
        ({"scale": feedback_pb2.RATING_SCALE_UNSPECIFIED}, "scale"),
        ({"rating": 2}, "rating"),
        ({"rating": -2}, "rating"),
        ({"scale": STARS, "rating": 0}, "rating"),
        ({"scale": STARS, "rating": 6}, "rating"),
        ({"labels": [f"l{i}" for i in range(9)]}, "labels"),
        ({"labels": ["ok", "x" * 33]}, "labels[1]"),
        ({"labels": ["Has Space"]}, "labels[0]"),
        ({"labels": ["jane@example.org"]}, "labels[0]"),
        ({"labels": ["555-0100"]}, "labels[0]"),
        ({"comment": "x" * 2001}, "comment"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as caught:
        check_feedback(request(**fields))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "fields",
    [
        {"rating": -1},
        {"rating": 0},
        {"scale": STARS, "rating": 1},
        {"scale": STARS, "rating": 5, "labels": ["too-long", "wrong_facts"], "comment": "x" * 2000},
    ],
)
def test_good_feedback_passes(fields: dict[str, Any]) -> None:
    check_feedback(request(**fields))


def test_rating_classes_on_both_scales() -> None:
    assert [rating_class(THUMBS, r) for r in (-1, 0, 1)] == ["negative", "neutral", "positive"]
    assert [rating_class(STARS, r) for r in range(1, 6)] == [
        "negative",
        "negative",
        "neutral",
        "positive",
        "positive",
    ]
    assert rating_class(THUMBS, 5) is None
    assert rating_class(feedback_pb2.RATING_SCALE_UNSPECIFIED, 1) is None


def envelope(tenant: str = "acme") -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(request_id="r1", tenant=tenant, attempt=1)


def test_the_join_keeps_ids_and_numbers_only() -> None:
    prompt = events_pb2.PromptAssembled(
        envelope=envelope(),
        model="m",
        prompt="My name is Marguerite Okonkwo",
        template_used=templates_pb2.TemplateUse(name="t", version=2, variant="v2"),
    )
    fact = joined_fact(PROMPTS, prompt.SerializeToString())
    assert fact == {
        "kind": "prompt",
        "request_id": "r1",
        "tenant": "acme",
        "model": "m",
        "template_name": "t",
        "template_version": 2,
        "variant": "v2",
    }
    rated = events_pb2.FeedbackSubmitted(envelope=envelope(), scale=STARS, rating=2, comment="secret words")
    assert "secret" not in str(joined_fact(FEEDBACK, rated.SerializeToString()))
    done = events_pb2.CompletionFinished(envelope=envelope(), model="m")
    assert joined_fact(COMPLETIONS, done.SerializeToString())["kind"] == "completion"  # type: ignore[index]
    assert joined_fact(COMPLETIONS, b"\xff\xff not protobuf") is None


def known(**more: Any) -> dict[str, Any]:
    state = {
        "tenant": "acme",
        "model": "m",
        "template_name": "t",
        "template_version": 1,
        "variant": "v1",
        "prompt": True,
        "completed": True,
    }
    return {**state, **more}


def test_a_rating_counts_once_all_three_sides_are_in_and_a_new_rating_moves_it() -> None:
    assert settle(known(completed=False, **{"class": "positive", "rated_by": "acme"})) == (None, None)
    assert settle(known(prompt=False, **{"class": "positive", "rated_by": "acme"})) == (None, None)
    assert settle(known()) == (None, None)

    state = known(**{"class": "positive", "rated_by": "acme"})
    old, new = settle(state)
    assert old is None and new is not None
    assert new["key"] == "acme/m/t@1/v1" and new["class"] == "positive"
    state["counted"] = new
    assert settle(state) == (None, None)  # a redelivery counts nothing new

    state["class"] = "negative"
    old, moved = settle(state)
    assert old == new and moved is not None and moved["class"] == "negative"


def test_another_tenants_rating_never_counts() -> None:
    assert settle(known(**{"class": "positive", "rated_by": "intruder"})) == (None, None)
