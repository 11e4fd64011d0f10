"""Assembly with the real SmolLM2 chat template and tokenizer: fitting, clamping, caching."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from services.prompts.assembly import Assembler, PromptRequest
from services.prompts.chat_template import ChatTemplate
from services.prompts.registry import Registry
from sluice.config import load_settings
from sluice.kafka import RequestFailed
from sluice.v1 import envelope_pb2, templates_pb2

SYSTEM = "You answer questions about {{ product }} using only these documents:"
DOC_LOOP = "{% for d in documents %}\n[{{ loop.index }}] {{ d }}{% endfor %}"
DOC = "The river flows north through the valley and feeds the old mill. " * 120  # ~1,600 tokens
LONG_DOC = DOC * 2  # more than the 2,048-token context on its own


def _registry() -> Registry:
    registry = Registry()
    body = templates_pb2.TemplateVersion(
        name="qa",
        version=1,
        event_id="e1",
        messages=[
            envelope_pb2.ChatMessage(role="system", content=SYSTEM + DOC_LOOP),
            envelope_pb2.ChatMessage(role="user", content="{{ question }}"),
        ],
        variables_schema=json.dumps({"type": "object", "required": ["product", "question"]}),
        constraints=templates_pb2.ModelConstraints(default_max_tokens=40, stop=["###"]),
    )
    registry.apply(templates_pb2.TemplateEvent(version=body), 0)
    label = templates_pb2.LabelPointer(
        name="qa", label="production", variants=[templates_pb2.Variant(version=1, weight=100)]
    )
    registry.apply(templates_pb2.TemplateEvent(label=label), 1)
    return registry


@pytest.fixture(scope="module")
def assembler() -> Iterator[Assembler]:
    done = Assembler(load_settings(prompts_cache_size=64), _registry())
    done.load()
    yield done
    done.close()


@pytest.fixture(scope="module")
def rejecting() -> Iterator[Assembler]:
    done = Assembler(load_settings(prompts_fit_policy="reject"), _registry())
    done.load()
    yield done
    done.close()


def templated(question: str = "Where does the river flow?", **fields: object) -> PromptRequest:
    base: dict[str, object] = {
        "model": "",
        "template": templates_pb2.TemplateRef(name="qa"),
        "variables": (("product", "Sluice"), ("question", question)),
        "max_tokens": 500,
        "max_tokens_defaulted": False,
    }
    base.update(fields)
    return PromptRequest(**base)  # type: ignore[arg-type]


def test_piecewise_token_count_equals_the_engine_tokenizer(template: ChatTemplate) -> None:
    """count_tokens memoizes pieces; it must equal whole-prompt tokenization on any text."""
    rng = random.Random(7)
    alphabet = [
        *"abcXYZ  \n\t.,;:'\"!?-_0189",
        "é",
        "日本",
        " ½",
        "😀",
        "<|im_start|>",
        "<|im_end|>",
        " 's",
        "\u00a0",
    ]
    for _ in range(150):
        # Short lines, and single long lines (cut inside the line).
        letters = alphabet if rng.random() < 0.5 else [a for a in alphabet if "\n" not in a]
        text = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9000)))
        assert template.count_tokens(text) == len(template.tokenize(text)), repr(text[:80])


def test_templated_request_fits_and_records_the_version(assembler: Assembler) -> None:
    done = assembler.assemble(templated(context=("Short doc.",)))
    assert done.used is not None
    assert (done.used.name, done.used.version, done.used.label, done.used.variant) == (
        "qa",
        1,
        "production",
        "",
    )
    assert done.fitted.messages[0] == (
        "system",
        SYSTEM.replace("{{ product }}", "Sluice") + "\n[1] Short doc.",
    )
    chat = assembler.templates[done.model]
    assert done.fitted.prompt_tokens == len(chat.tokenize(done.fitted.prompt))
    assert done.max_tokens == 500 and done.stop == ("###",)


def test_template_default_max_tokens_applies_only_when_the_caller_left_it_unset(assembler: Assembler) -> None:
    assert assembler.assemble(templated(max_tokens_defaulted=True)).max_tokens == 40


def test_truncate_drops_oldest_history_then_cuts_documents_never_the_system(assembler: Assembler) -> None:
    history = (("user", "old question " * 30), ("assistant", "old answer " * 30))
    done = assembler.assemble(templated(messages=history, context=(LONG_DOC,)))
    context = assembler.settings.catalog.models[done.model].context_tokens
    assert done.used is not None
    assert done.used.dropped_turns == 2
    assert done.used.truncated_context_tokens > 0
    system = done.fitted.messages[0]
    assert system[1].startswith(SYSTEM.replace("{{ product }}", "Sluice") + "\n[1] The river flows")
    assert done.fitted.messages[-1] == ("user", "Where does the river flow?")
    assert done.fitted.prompt_tokens + assembler.settings.prompts_min_output_tokens <= context
    assert done.max_tokens == context - done.fitted.prompt_tokens


def test_max_tokens_is_clamped_to_what_remains(assembler: Assembler) -> None:
    done = assembler.assemble(templated(context=(DOC[:4000],), max_tokens=2000))
    context = assembler.settings.catalog.models[done.model].context_tokens
    assert done.max_tokens == context - done.fitted.prompt_tokens < 2000


def test_reject_policy_refuses_instead_of_cutting(rejecting: Assembler) -> None:
    with pytest.raises(RequestFailed) as caught:
        rejecting.assemble(templated(context=(LONG_DOC,)))
    assert caught.value.code == "FAILED_PRECONDITION"
    assert str(caught.value).startswith("prompt: ")
    assert "fit policy is reject" in str(caught.value)


def test_a_prompt_that_cannot_fit_even_after_truncation_fails_precondition(assembler: Assembler) -> None:
    with pytest.raises(RequestFailed) as caught:
        assembler.assemble(templated(question="river " * 2100, context=(DOC,)))
    assert caught.value.code == "FAILED_PRECONDITION"
    assert "after dropping all history and context" in str(caught.value)


def test_raw_messages_keep_working_with_documents_in_the_system_message(assembler: Assembler) -> None:
    done = assembler.assemble(
        PromptRequest(model="", messages=(("user", "hi"),), context=("Doc A",), max_tokens=10)
    )
    assert done.used is None
    assert done.fitted.messages[0] == ("system", "Context documents:\n\n[1] Doc A")


def test_cache_hits_for_the_same_version_variables_and_model(assembler: Assembler) -> None:
    request = templated(question="cache me", context=(DOC[:2000],))
    before = (assembler.cache.hits, assembler.cache.misses)
    first = assembler.assemble(request)
    second = assembler.assemble(request)
    assert first.fitted is second.fitted
    assert (assembler.cache.hits, assembler.cache.misses) == (before[0] + 1, before[1] + 1)
    other = assembler.assemble(templated(question="cache me too", context=(DOC[:2000],)))
    assert other.fitted is not first.fitted
    assert 0 < assembler.cache.hit_ratio() < 1


def test_bad_variables_and_unknown_model(assembler: Assembler) -> None:
    with pytest.raises(RequestFailed) as caught:
        assembler.assemble(templated(variables=()))
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "variables.product: is required" in str(caught.value)
    assert "variables.question: is required" in str(caught.value)
    with pytest.raises(RequestFailed) as caught:
        assembler.assemble(templated(model="gpt-nope"))
    assert caught.value.code == "NOT_FOUND" and str(caught.value).startswith("model:")
