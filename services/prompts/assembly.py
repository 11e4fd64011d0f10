"""From a request (raw messages or a template reference) to the exact prompt a model gets.

Steps: resolve the template version (sticky experiment arm), validate the
variables, render the body in the sandbox, apply the model's chat template,
count tokens with the model's tokenizer, fit the context window, clamp
max_tokens. The expensive middle (render, chat template, tokenize, fit) is
cached per inputs in a bounded LRU: template versions are immutable, so a
cached result can never go stale.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from services.prompts import metrics
from services.prompts.chat_template import ChatTemplate
from services.prompts.registry import Registry
from services.prompts.template_body import TemplateBody
from sluice.config import Settings
from sluice.kafka import RequestFailed
from sluice.models import resolve_model_path
from sluice.v1 import templates_pb2

Turn = tuple[str, str]
CONTEXT_HEADER = "Context documents:"


@dataclass(frozen=True)
class PromptRequest:
    """What assembly needs, whether it came from Kafka or from a Render call."""

    model: str
    messages: tuple[Turn, ...] = ()
    template: templates_pb2.TemplateRef | None = None
    variables: tuple[tuple[str, str], ...] = ()
    context: tuple[str, ...] = ()
    max_tokens: int = 0
    max_tokens_defaulted: bool = True
    stop: tuple[str, ...] = ()
    # Who the experiment arm is sticky for: tenant and pseudonymous end user.
    subject: str = ""


@dataclass(frozen=True)
class Fitted:
    prompt: str
    prompt_tokens: int
    messages: tuple[Turn, ...]
    dropped_turns: int = 0
    truncated_context_tokens: int = 0


@dataclass(frozen=True)
class Assembled:
    fitted: Fitted
    model: str
    chat_template: str
    max_tokens: int
    stop: tuple[str, ...]
    used: templates_pb2.TemplateUse | None


@dataclass
class FitCache:
    """Bounded LRU of fitted prompts, with the hit rate exported."""

    capacity: int
    _entries: OrderedDict[tuple[Any, ...], Fitted] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        metrics.CACHE_HIT_RATIO.set_function(self.hit_ratio)

    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, key: tuple[Any, ...]) -> Fitted | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            metrics.CACHE_LOOKUPS.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        metrics.CACHE_LOOKUPS.labels("hit").inc()
        return found

    def put(self, key: tuple[Any, ...], value: Fitted) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = value
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _split_system(turns: Sequence[Turn]) -> tuple[list[Turn], list[Turn]]:
    """Leading system messages (never cut) and the rest."""
    lead = 0
    while lead < len(turns) and turns[lead][0] == "system":
        lead += 1
    return list(turns[:lead]), list(turns[lead:])


def _with_documents(system: list[Turn], documents: Sequence[str]) -> list[Turn]:
    """Raw-message requests get their context documents in the system message."""
    docs = [d for d in documents if d]
    if not docs:
        return system
    block = "\n\n".join([CONTEXT_HEADER, *(f"[{i}] {d}" for i, d in enumerate(docs, 1))])
    if not system:
        return [("system", block)]
    role, content = system[-1]
    return [*system[:-1], (role, f"{content}\n\n{block}")]


@dataclass
class Assembler:
    settings: Settings
    registry: Registry
    templates: dict[str, ChatTemplate] = field(default_factory=dict)
    cache: FitCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = FitCache(self.settings.prompts_cache_size)

    def load(self) -> None:
        for name, spec in self.settings.catalog.models.items():
            self.templates[name] = ChatTemplate(resolve_model_path(spec.source))

    def close(self) -> None:
        for template in self.templates.values():
            template.close()

    def assemble(self, request: PromptRequest) -> Assembled:
        started = time.perf_counter()
        canonical = self.settings.catalog.resolve(request.model)
        if canonical is None:
            raise RequestFailed("NOT_FOUND", f"model: unknown model {request.model!r}")
        body: TemplateBody | None = None
        used: templates_pb2.TemplateUse | None = None
        typed: dict[str, Any] = {}
        if request.template is not None:
            resolved = self.registry.resolve(request.template, request.subject)
            body = resolved.body
            self._check_model(body, canonical)
            typed = body.typed_variables(dict(request.variables))
            body.validate(typed)
            used = templates_pb2.TemplateUse(
                name=body.version.name,
                version=body.version.version,
                label=resolved.label,
                variant=resolved.variant,
            )
        elif not request.messages:
            raise RequestFailed("INVALID_ARGUMENT", "messages: at least one message is required")
        key = (canonical, body.ref if body else "", request.variables, request.context, request.messages)
        fitted = self.cache.get(key)
        if fitted is None:
            fitted = self._fit(canonical, body, typed, request)
            self.cache.put(key, fitted)
        if fitted.dropped_turns or fitted.truncated_context_tokens:
            used = used or templates_pb2.TemplateUse()
            used.dropped_turns = fitted.dropped_turns
            used.truncated_context_tokens = fitted.truncated_context_tokens
        constraints = body.version.constraints if body else templates_pb2.ModelConstraints()
        wanted = request.max_tokens
        if request.max_tokens_defaulted and constraints.default_max_tokens:
            wanted = constraints.default_max_tokens
        room = self.settings.catalog.models[canonical].context_tokens - fitted.prompt_tokens
        stop = tuple(dict.fromkeys([*request.stop, *constraints.stop]))
        metrics.ASSEMBLY_SECONDS.observe(time.perf_counter() - started)
        return Assembled(
            fitted=fitted,
            model=canonical,
            chat_template=self.templates[canonical].name,
            max_tokens=min(wanted, room) if wanted else room,
            stop=stop,
            used=used,
        )

    def _check_model(self, body: TemplateBody, canonical: str) -> None:
        allowed = body.version.constraints.allowed_models
        if allowed and canonical not in {self.settings.catalog.resolve(m) for m in allowed}:
            raise RequestFailed(
                "FAILED_PRECONDITION",
                f"model: template {body.ref} allows only {', '.join(allowed)}, not {canonical}",
            )

    def _fit(
        self, model: str, body: TemplateBody | None, variables: dict[str, Any], request: PromptRequest
    ) -> Fitted:
        """Render; if too long, drop the oldest history turns, then cut context documents."""
        chat = self.templates[model]
        limit = self.settings.catalog.models[model].context_tokens - self.settings.prompts_min_output_tokens
        if body is not None:
            history = list(request.messages)
        else:
            system, rest = _split_system(request.messages)
            history, final = rest[:-1], rest[-1:]
        documents = list(request.context)
        dropped = cut = 0
        while True:
            if body is not None:
                system, final = _split_system(body.render(variables, documents))
            else:
                system = _with_documents(_split_system(request.messages)[0], documents)
            turns = (*system, *history, *final)
            prompt = chat.render(turns)
            tokens = chat.count_tokens(prompt)
            overflow = tokens - limit
            if overflow <= 0:
                metrics.FITTED.labels("dropped_turns" if dropped else "cut_context" if cut else "fits").inc()
                return Fitted(prompt, tokens, turns, dropped, cut)
            if self.settings.prompts_fit_policy == "reject":
                self._cannot_fit(model, tokens, "the fit policy is reject")
            if history:
                history.pop(0)
                dropped += 1
            elif any(documents):
                cut += self._cut_documents(chat, documents, overflow)
            else:
                self._cannot_fit(model, tokens, "after dropping all history and context")

    @staticmethod
    def _cut_documents(chat: ChatTemplate, documents: list[str], overflow: int) -> int:
        """Cut `overflow` tokens from the end of the last documents; returns tokens cut."""
        cut = 0
        for i in range(len(documents) - 1, -1, -1):
            if overflow <= 0:
                break
            tokens = chat.text_tokens(documents[i])
            keep = max(0, len(tokens) - overflow - 1)  # one spare: a cut can re-merge tokens
            documents[i] = chat.detokenize(tokens[:keep]) if keep else ""
            cut += len(tokens) - keep
            overflow -= len(tokens) - keep
        return cut

    def _cannot_fit(self, model: str, tokens: int, why: str) -> NoReturn:
        metrics.FITTED.labels("rejected").inc()
        context = self.settings.catalog.models[model].context_tokens
        raise RequestFailed(
            "FAILED_PRECONDITION",
            f"prompt: {tokens} tokens leave fewer than {self.settings.prompts_min_output_tokens} "
            f"answer tokens in the {context}-token context of {model} ({why})",
        )
