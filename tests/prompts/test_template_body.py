"""Template versions: checks at CreateVersion, variable validation, the sandbox at render."""

from __future__ import annotations

import json

import pytest

from services.prompts.template_body import TemplateBody, TemplateRejected
from sluice.kafka import RequestFailed
from sluice.v1 import envelope_pb2, templates_pb2

SCHEMA = {
    "type": "object",
    "required": ["product", "question"],
    "properties": {
        "product": {"type": "string", "maxLength": 20},
        "question": {"type": "string"},
        "n": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": False,
}


def version(*contents: str, schema: dict[str, object] | None = None) -> templates_pb2.TemplateVersion:
    roles = ["system", "user", "assistant"]
    return templates_pb2.TemplateVersion(
        name="qa",
        version=1,
        messages=[envelope_pb2.ChatMessage(role=roles[i % 3], content=c) for i, c in enumerate(contents)],
        variables_schema=json.dumps(schema) if schema else "",
    )


def test_renders_variables_and_documents() -> None:
    body = TemplateBody.compile(
        version(
            "About {{ product }}.{% for d in documents %} [{{ loop.index }}] {{ d }}{% endfor %}",
            "{{ question }}",
        )
    )
    assert body.render({"product": "Sluice", "question": "why?"}, ["a", "b"]) == [
        ("system", "About Sluice. [1] a [2] b"),
        ("user", "why?"),
    ]


def test_syntax_error_names_the_message_and_the_line() -> None:
    with pytest.raises(TemplateRejected) as caught:
        TemplateBody.compile(version("ok", "line one\nline two {% endfor %}\nthree"))
    assert str(caught.value).startswith("messages[1].content: template syntax error on line 2")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ product['__class__'] }}",
        "{{ product|attr('__class__') }}",
        "{% import 'os' as os %}",
        "{% include 'x' %}",
        "{{ self }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_escape_attempts_are_refused_at_create(source: str) -> None:
    with pytest.raises(TemplateRejected) as caught:
        TemplateBody.compile(version(source))
    assert str(caught.value).startswith("messages[0].content: refused by the sandbox")


def test_unsafe_call_at_render_is_a_security_refusal() -> None:
    body = TemplateBody.compile(version("{{ documents.append('x') }}"))
    with pytest.raises(RequestFailed) as caught:
        body.render({}, ["doc"])
    assert caught.value.code == "INVALID_ARGUMENT"
    assert str(caught.value).startswith("template: qa@1 messages[0] refused by the sandbox")


def test_undefined_variable_is_named() -> None:
    body = TemplateBody.compile(version("{{ missing }}"))
    with pytest.raises(RequestFailed) as caught:
        body.render({}, [])
    assert str(caught.value) == "variables: 'missing' is undefined in qa@1"


def test_schema_errors_list_every_bad_or_missing_variable_without_values() -> None:
    body = TemplateBody.compile(version("{{ product }}", schema=SCHEMA))
    secret = "jane@example.com-is-far-too-long"
    with pytest.raises(RequestFailed) as caught:
        body.validate(body.typed_variables({"product": secret, "n": "0", "extra": "x"}))
    message = str(caught.value)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "variables.question: is required" in message
    assert "variables.product: must satisfy maxLength 20" in message
    assert "variables.n: must satisfy minimum 1" in message
    assert "'extra' was unexpected" in message
    assert secret not in message


def test_non_string_variables_arrive_as_json() -> None:
    body = TemplateBody.compile(version("{{ n + 1 }}", schema=SCHEMA))
    typed = body.typed_variables({"product": "p", "question": "q", "n": "41"})
    body.validate(typed)
    assert body.render(typed, []) == [("system", "42")]
    with pytest.raises(RequestFailed, match=r"^variables\.n: must be JSON for type integer"):
        body.typed_variables({"n": "forty"})


@pytest.mark.parametrize(
    ("schema", "start"),
    [
        ("{not json", "variables_schema: not valid JSON"),
        ('{"type": "nonsense"}', "variables_schema: invalid at"),
        ('{"properties": {"documents": {}}}', "variables_schema: documents is reserved"),
    ],
)
def test_bad_schema_is_rejected(schema: str, start: str) -> None:
    draft = version("x")
    draft.variables_schema = schema
    with pytest.raises(TemplateRejected) as caught:
        TemplateBody.compile(draft)
    assert str(caught.value).startswith(start)


def test_bad_role_and_name_are_rejected() -> None:
    draft = version("x")
    draft.messages[0].role = "tool"
    with pytest.raises(TemplateRejected, match=r"^messages\[0\]\.role"):
        TemplateBody.compile(draft)
    draft = version("x")
    draft.name = "has space"
    with pytest.raises(TemplateRejected, match=r"^name:"):
        TemplateBody.compile(draft)
