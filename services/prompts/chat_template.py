"""Chat templating with the model's own template, rendered like HF transformers.

The template comes from the GGUF metadata key ``tokenizer.chat_template`` (the
Hugging Face Jinja template the model was trained with).  It is rendered the
way ``transformers`` renders chat templates: a sandboxed, immutable Jinja
environment with ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols``
extension, a ``raise_exception`` global, a ``tojson`` filter that does not
escape non-ASCII, ``strftime_now``, and a no-op ``{% generation %}`` block.
Undefined variables are the default (lenient) ``Undefined``, because HF
templates routinely probe optional variables (``tools``, ``documents``, ...).

Token counts come from the same tokenizer code the inference engine uses
(:func:`services.inference.llamacpp_engine.tokenize_prompt`), so
``count_tokens(render(...))`` is exactly the engine's ``prompt_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final, NoReturn

import jinja2
import jinja2.ext
import llama_cpp
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.inference.llamacpp_engine import tokenize_prompt

__all__ = ["ChatTemplate", "ChatTemplateError", "Message", "Messages"]

Message = tuple[str, str] | Mapping[str, str]
Messages = Sequence[tuple[str, str]] | Sequence[Mapping[str, str]]

GGUF_TEMPLATE_KEY: Final = "tokenizer.chat_template"
# Where a new pre-tokenizer word must start, so tokens never cross: before a newline
# that follows a non-space (content-defined, so a document's lines cache wherever they
# sit), and inside long lines before ' <letter>' after a non-space, every 2,048+ chars
# (each piece costs llama.cpp ~0.1 ms on its own, so pieces stay few).
_PIECES: Final = re.compile(r".{2048}.*?(?:(?<=\S)(?= [^\W\d_])|\Z)|.+", re.S)
_LONG_LINE: Final = 4096
PIECE_CACHE_SIZE: Final = 65536
# Joins uncached pieces into one llama.cpp call (each call costs ~0.2 ms before any
# text): text between special tokens is tokenized independently, so splitting the
# result at this token gives each piece's own tokens.
_SEPARATOR: Final = "<|endoftext|>"


def _lines(text: str) -> Iterator[str]:
    """Cut before each newline that follows a non-space (str.find: a regex here costs 0.5 ms)."""
    start = 0
    at = text.find("\n", 1)
    while at != -1:
        if not text[at - 1].isspace():
            yield text[start:at]
            start = at
        at = text.find("\n", at + 1)
    yield text[start:]


def _pieces(text: str) -> Iterator[str]:
    for line in _lines(text):
        if len(line) > _LONG_LINE:
            yield from _PIECES.findall(line)
        elif line:
            yield line


class ChatTemplateError(ValueError):
    """The template is missing/invalid, or rejected the conversation."""


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same as transformers: unlike Jinja's built-in, no HTML escaping.
    return json.dumps(
        x,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant masks): render the body."""

    tags = {"generation"}  # jinja2 declares it as a plain (not Class) attribute

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Macro) -> str:
        return str(caller())


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _normalize(messages: Messages) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if isinstance(m, tuple):
            if len(m) != 2:
                raise ChatTemplateError(f"message {i}: expected a (role, content) pair, got {len(m)} items")
            role, content = m
            out.append({"role": role, "content": content})
        elif isinstance(m, Mapping):
            if "role" not in m or "content" not in m:
                raise ChatTemplateError(f"message {i}: a mapping needs 'role' and 'content' keys")
            out.append(dict(m))
        else:
            raise ChatTemplateError(
                f"message {i}: expected (role, content) or a mapping, got {type(m).__name__}"
            )
        if not isinstance(out[-1]["role"], str) or not isinstance(out[-1]["content"], str):
            raise ChatTemplateError(f"message {i}: role and content must be strings")
    return out


class ChatTemplate:
    """The chat template + tokenizer of one GGUF model.

    ``template`` overrides the GGUF's embedded template (e.g. for models that
    ship without one).
    """

    def __init__(self, model_path: Path, template: str | None = None) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {str(model_path)!r}")
        self.model_path: Final = model_path
        self._llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        metadata: dict[str, str] = dict(self._llm.metadata)
        source = template if template is not None else metadata.get(GGUF_TEMPLATE_KEY)
        if not source:
            self._llm.close()
            raise ChatTemplateError(
                f"{model_path.name} has no {GGUF_TEMPLATE_KEY!r} in its GGUF metadata; pass template=..."
            )
        self.source: Final[str] = source
        self._origin = "gguf" if template is None else "custom"
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        if vocab is None:  # pragma: no cover
            raise ChatTemplateError("model has no vocabulary")
        bos_id = int(llama_cpp.llama_vocab_bos(vocab))
        eos_id = int(llama_cpp.llama_vocab_eos(vocab))
        self._bos_id: Final = bos_id
        self._add_bos: Final = bool(llama_cpp.llama_vocab_get_add_bos(vocab)) and bos_id >= 0
        self._piece_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        separator = self._llm.tokenize(_SEPARATOR.encode(), add_bos=False, special=True)
        self._separator: Final = separator[0] if len(separator) == 1 else None
        self.bos_token: Final[str] = self._token_text(vocab, bos_id)
        self.eos_token: Final[str] = self._token_text(vocab, eos_id)
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            self._llm.close()
            raise ChatTemplateError(f"invalid chat template: {exc}") from exc

    @staticmethod
    def _token_text(vocab: llama_cpp.llama_vocab_p, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(vocab, token)).decode("utf-8", errors="replace")

    @cached_property
    def name(self) -> str:
        """Stable id of the template text: ``gguf:<sha256[:16]>`` (``custom:`` if overridden)."""
        digest = hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]
        return f"{self._origin}:{digest}"

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """Render a conversation to the prompt string the model expects.

        ``messages`` are ``(role, content)`` pairs or ``{"role", "content", ...}``
        mappings (extra keys are passed through to the template).
        """
        try:
            return self._template.render(
                messages=_normalize(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from exc

    def tokenize(self, prompt: str) -> list[int]:
        """Exactly the tokens the inference engine feeds llama.cpp for ``prompt``."""
        return tokenize_prompt(self._llm, prompt)

    def count_tokens(self, prompt: str) -> int:
        """``len(tokenize(prompt))``, from memoized pieces of the prompt.

        llama.cpp cuts the text at special tokens, then its pre-tokenizer cuts
        words, and BPE merges never cross either cut. A newline after a
        non-space, and a space after a non-space before a letter, always start
        a new word, so tokenizing the pieces between such points and adding up
        gives the same count (checked against the whole-prompt tokenizer in the
        tests). A recurring 1,500-token context document then costs look-ups,
        not a fresh ~7 ms tokenization.
        """
        pieces = list(_pieces(prompt))
        cache = self._piece_cache
        missing = [p for p in dict.fromkeys(pieces) if p not in cache]
        if missing:
            self._tokenize_pieces(missing)
        first: int | None = None
        total = 0
        for piece in pieces:
            tokens = cache[piece]
            cache.move_to_end(piece)
            if first is None and tokens:
                first = tokens[0]
            total += len(tokens)
        while len(cache) > PIECE_CACHE_SIZE:
            cache.popitem(last=False)
        if self._add_bos and first != self._bos_id:
            total += 1
        return total

    def _tokenize_pieces(self, pieces: Sequence[str]) -> None:
        if self._separator is not None and len(pieces) > 1 and not any(_SEPARATOR in p for p in pieces):
            joined = _SEPARATOR.join(pieces).encode("utf-8")
            tokens = self._llm.tokenize(joined, add_bos=False, special=True)
            parts: list[list[int]] = [[]]
            for token in tokens:
                if token == self._separator:
                    parts.append([])
                else:
                    parts[-1].append(token)
            if len(parts) == len(pieces):
                self._piece_cache.update(zip(pieces, map(tuple, parts), strict=True))
                return
        for piece in pieces:
            self._piece_cache[piece] = tuple(
                self._llm.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
            )

    def text_tokens(self, text: str) -> list[int]:
        """Tokens of plain text inside a prompt (no BOS, special-token text left literal)."""
        tokens: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of `tokens`; a cut inside a multi-byte character is dropped, not mangled."""
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="ignore")

    def close(self) -> None:
        self._llm.close()
