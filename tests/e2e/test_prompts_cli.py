"""`sluice prompts …` and `sluice generate --template` as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

from sluice.stack import Stack
from tests.e2e.test_cli import sluice
from tests.e2e.test_prompts_registry import unique
from tests.e2e.test_request_path import trail

TEMPLATE = """\
messages:
  - role: system
    content: "You are a {{ tone }} guide to rivers.{% for d in documents %} {{ d }}{% endfor %}"
  - role: user
    content: "{{ question }}"
variables:
  type: object
  required: [tone, question]
  properties:
    tone: {type: string, enum: [terse, friendly]}
    question: {type: string}
max_tokens: 6
"""


def test_put_label_get_list_render_diff_and_generate(stack: Stack, tmp_path: Path) -> None:
    name = unique("guide")
    path = tmp_path / "guide.yaml"
    path.write_text(TEMPLATE)
    assert (
        sluice(stack, "prompts", "put", name, str(path), "--note", "first").stdout.strip()
        == f"created {name} v1"
    )
    path.write_text(TEMPLATE.replace("guide to rivers", "guide to lakes"))
    second = sluice(stack, "--json", "prompts", "put", name, str(path), "--note", "lakes")
    assert json.loads(second.stdout)["version"] == 2, second.stderr
    assert sluice(stack, "prompts", "label", name, "2", "production").returncode == 0

    shown = sluice(stack, "prompts", "get", f"{name}@production")
    assert (
        shown.returncode == 0 and f"{name} v2  labels: production" in shown.stdout and "lakes" in shown.stdout
    )
    listing = sluice(stack, "prompts", "list")
    assert any(line.startswith(name) and "production→v2" in line for line in listing.stdout.splitlines())
    assert "v1" in sluice(stack, "prompts", "list", name).stdout

    doc = tmp_path / "doc.txt"
    doc.write_text("The Danube flows east.")
    rendered = sluice(
        stack,
        *("--json", "prompts", "render", f"{name}@1", "--var", "tone=terse"),
        *("--var", "question=Which way?", "--context", str(doc)),
    )
    body = json.loads(rendered.stdout)
    assert "guide to rivers" in body["prompt"] and "The Danube flows east." in body["prompt"]
    assert body["template_used"]["version"] == 1 and int(body["prompt_tokens"]) > 10

    diff = sluice(stack, "prompts", "diff", name, "1", "2")
    lines = diff.stdout.splitlines()
    assert any(line.startswith("-") and "guide to rivers" in line for line in lines), diff.stdout
    assert any(line.startswith("+") and "guide to lakes" in line for line in lines), diff.stdout

    bad = sluice(stack, "prompts", "render", name, "--var", "tone=angry", "--var", "question=q")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: variables.tone: must satisfy enum" in bad.stderr

    done = sluice(
        stack, "--json", "generate", "--template", name, "--var", "tone=friendly", "--var", "question=Hi?"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert 0 < int(events[-1]["usage"]["completion_tokens"]) <= 6  # the template's default max_tokens
    records = trail(stack, events[0]["request_id"], stages=3).records
    details = next(r.details for r in records if r.stage == "assembled")
    assert (details["template_name"], details["template_version"]) == (name, "2")
