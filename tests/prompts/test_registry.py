"""The registry fold: first writer wins a version number, labels move, experiments are sticky."""

from __future__ import annotations

from collections import Counter

import pytest

from services.prompts.registry import Registry
from sluice.kafka import RequestFailed
from sluice.v1 import envelope_pb2, templates_pb2


def version_event(name: str, number: int, event_id: str, text: str = "hi") -> templates_pb2.TemplateEvent:
    return templates_pb2.TemplateEvent(
        version=templates_pb2.TemplateVersion(
            name=name,
            version=number,
            event_id=event_id,
            messages=[envelope_pb2.ChatMessage(role="user", content=text)],
        )
    )


def label_event(name: str, label: str, *arms: tuple[int, int]) -> templates_pb2.TemplateEvent:
    return templates_pb2.TemplateEvent(
        label=templates_pb2.LabelPointer(
            name=name,
            label=label,
            variants=[templates_pb2.Variant(version=v, weight=w) for v, w in arms],
        )
    )


def fold(*events: templates_pb2.TemplateEvent) -> Registry:
    registry = Registry()
    for offset, event in enumerate(events):
        registry.apply(event, offset)
    return registry


def test_first_event_for_a_version_number_wins() -> None:
    registry = fold(version_event("t", 1, "a", "first"), version_event("t", 1, "b", "second"))
    assert registry.version("t", 1).version.event_id == "a"
    assert registry.latest("t") == 1
    assert registry.position == 2


def test_labels_move_and_resolve() -> None:
    registry = fold(
        version_event("t", 1, "a"),
        version_event("t", 2, "b"),
        label_event("t", "production", (2, 100)),
    )
    ref = templates_pb2.TemplateRef(name="t")
    assert registry.resolve(ref, "x").body.version.version == 2
    registry.apply(label_event("t", "production", (1, 100)), 3)
    assert registry.resolve(ref, "x").body.version.version == 1
    assert (
        registry.resolve(templates_pb2.TemplateRef(name="t", label="latest"), "x").body.version.version == 2
    )


def test_label_to_unknown_version_is_ignored() -> None:
    registry = fold(version_event("t", 1, "a"), label_event("t", "production", (9, 100)))
    with pytest.raises(RequestFailed) as caught:
        registry.resolve(templates_pb2.TemplateRef(name="t"), "x")
    assert caught.value.code == "NOT_FOUND"
    assert str(caught.value) == "template.label: t has no label 'production'"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (templates_pb2.TemplateRef(name="nope"), "template.name: no template named 'nope'"),
        (templates_pb2.TemplateRef(name="t", version=5), "template.version: t has no version 5"),
        (templates_pb2.TemplateRef(name="t", label="staging"), "template.label: t has no label 'staging'"),
    ],
)
def test_unknown_template_version_or_label_is_not_found(ref: templates_pb2.TemplateRef, message: str) -> None:
    registry = fold(version_event("t", 1, "a"))
    with pytest.raises(RequestFailed) as caught:
        registry.resolve(ref, "x")
    assert (caught.value.code, str(caught.value)) == ("NOT_FOUND", message)


def test_weighted_variants_split_and_stay_sticky() -> None:
    registry = fold(
        version_event("t", 7, "a"), version_event("t", 8, "b"), label_event("t", "exp", (7, 90), (8, 10))
    )
    ref = templates_pb2.TemplateRef(name="t", label="exp")
    users = [f"demo\0u-{i:05d}" for i in range(2000)]
    first = [registry.resolve(ref, u).variant for u in users]
    assert first == [registry.resolve(ref, u).variant for u in users]
    counts = Counter(first)
    assert set(counts) == {"v7", "v8"}
    assert 1700 <= counts["v7"] <= 1900
