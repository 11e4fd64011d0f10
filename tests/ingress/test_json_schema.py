"""The published JSON Schema for Kafka producers matches what Sluice actually parses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sluice import topics
from sluice.config import REPO_ROOT, load_settings
from sluice.topics import BadEvent, Codec, load_plan

SCHEMA = REPO_ROOT / "schemas" / "json" / "generation_requested.schema.json"
GOOD: dict[str, Any] = {
    "envelope": {"requestId": "r-1", "attempt": 1, "tenant": "demo", "schemaVersion": 1},
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Say hello."}],
    "params": {"maxTokens": 8, "temperature": 0.2, "stop": ["\n\n"]},
    "user": "end-user-7",
    "batch": True,
}


def codec() -> Codec:
    return Codec(load_plan(load_settings().topics_file))


def test_committed_schema_is_what_the_generator_makes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gen_json_schemas.py"), str(tmp_path)], check=True
    )
    assert (tmp_path / SCHEMA.name).read_text() == SCHEMA.read_text(), "run 'make protos'"


def test_a_request_valid_under_the_schema_decodes_to_the_same_event() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(GOOD, schema)
    event = codec().decode(topics.REQUESTS, json.dumps(GOOD).encode(), topics.JSON_CONTENT_TYPE)
    assert event.envelope.request_id == "r-1" and event.params.max_tokens == 8  # type: ignore[attr-defined]
    assert event.batch and list(event.params.stop) == ["\n\n"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"maxTokens": "many"}},
        {"messages": [{"role": "user", "content": 5}]},
        {"surprise": 1},
        {"envelope": {"requestId": "r-1", "attempt": -1, "tenant": "demo", "schemaVersion": 1}},
    ],
)
def test_what_the_schema_refuses_sluice_refuses_too(change: dict[str, Any]) -> None:
    bad = {**GOOD, **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    with pytest.raises(BadEvent):
        codec().decode(topics.REQUESTS, json.dumps(bad).encode(), topics.JSON_CONTENT_TYPE)


def test_fields_sluice_sets_are_not_offered_to_producers() -> None:
    properties = json.loads(SCHEMA.read_text())["properties"]
    assert "replyTo" not in properties and "keyId" not in properties
    assert "envelope" in json.loads(SCHEMA.read_text())["required"]
