"""ChatTemplate against the real SmolLM2-135M-Instruct GGUF (no mocks)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from services.prompts.chat_template import ChatTemplate, ChatTemplateError

DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def test_template_comes_from_gguf_metadata(template: ChatTemplate, vocab_llm: llama_cpp.Llama) -> None:
    assert template.source == vocab_llm.metadata["tokenizer.chat_template"]
    assert "<|im_start|>" in template.source
    assert template.bos_token == "<|im_start|>"
    assert template.eos_token == "<|im_end|>"


def test_render_chatml_with_generation_prompt(template: ChatTemplate) -> None:
    prompt = template.render([("user", "Write a haiku about rivers")])
    assert prompt == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\nWrite a haiku about rivers<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_render_tuples_and_mappings_agree(template: ChatTemplate) -> None:
    convo = [
        ("system", "Be terse."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
    ]
    as_tuples = template.render(convo)
    as_dicts = template.render([{"role": r, "content": c} for r, c in convo])
    assert as_tuples == as_dicts
    # An explicit system message replaces the template's default one.
    assert as_tuples.startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert "SmolLM" not in as_tuples
    assert as_tuples.count("<|im_start|>") == 5


def test_render_without_generation_prompt(template: ChatTemplate) -> None:
    prompt = template.render([("user", "Hi")], add_generation_prompt=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")
    assert "<|im_start|>assistant" not in prompt


def test_render_rejects_bad_messages(template: ChatTemplate) -> None:
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user"}])
    with pytest.raises(ChatTemplateError):
        template.render([("user", "a", "b")])  # type: ignore[arg-type]


def test_count_tokens_matches_llama_cpp_tokenize(template: ChatTemplate, vocab_llm: llama_cpp.Llama) -> None:
    prompt = template.render([("user", "Write a haiku about rivers")])
    # llama.cpp's own semantics: add BOS if (and only if) the model wants it,
    # parse special tokens.
    expected = vocab_llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    assert template.tokenize(prompt) == expected
    assert template.count_tokens(prompt) == len(expected)
    # Special tokens are single tokens, not spelled out.
    assert template.count_tokens("<|im_start|>") == 1
    assert template.count_tokens(prompt) < len(
        vocab_llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
    )
    # Each <|im_start|> / <|im_end|> in the prompt is exactly one token.
    ids = template.tokenize(prompt)
    assert ids.count(1) == prompt.count("<|im_start|>")
    assert ids.count(2) == prompt.count("<|im_end|>")


def test_count_tokens_non_ascii(template: ChatTemplate, vocab_llm: llama_cpp.Llama) -> None:
    text = "Rivers 🌊 flow — 川は流れる"
    ids = template.tokenize(text)
    assert len(ids) == template.count_tokens(text) > 0
    assert vocab_llm.detokenize(ids).decode("utf-8") == text


def test_name_is_stable_id(template: ChatTemplate, model_path: Path) -> None:
    assert template.name.startswith("gguf:")
    assert len(template.name) == len("gguf:") + 16
    other = ChatTemplate(model_path)
    try:
        assert other.name == template.name
    finally:
        other.close()


def test_custom_template_helpers(model_path: Path) -> None:
    t = ChatTemplate(
        model_path,
        template=(
            "{% for m in messages %}"
            "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
            "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}\n"
            "{% endfor %}"
            "{% if tools is not none %}T{% endif %}{{ bos_token }}"
        ),
    )
    try:
        assert t.name.startswith("custom:")
        # trim_blocks eats the newline after {% endgeneration %}, as in HF.
        assert t.render([("user", "héllo")]) == '"héllo"<|im_start|>'
        with pytest.raises(ChatTemplateError, match="no tools here"):
            t.render([("tool", "x")])
    finally:
        t.close()


def test_sandbox_blocks_mutation(model_path: Path) -> None:
    t = ChatTemplate(model_path, template="{{ messages.append({'role': 'x'}) }}")
    try:
        with pytest.raises(ChatTemplateError):
            t.render([("user", "hi")])
    finally:
        t.close()


def test_invalid_template_is_rejected(model_path: Path) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(model_path, template="{% for %}")
