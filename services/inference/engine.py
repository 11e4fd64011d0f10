"""The one interface every inference engine implements (llamacpp, trtllm, openai).

The worker loop only ever talks to this, so engines can be swapped by config and
the worker's guarantees (capacity, abort, exact usage) hold for all of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled"]


class EngineLoadError(RuntimeError):
    """The engine could not start: the worker reports unhealthy and never joins its group."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the model's context."""


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Newly displayable text; `token_id` is None for a final flush of held-back text."""

    text: str
    token_id: int | None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str = ""


class TokenStream(Protocol):
    """One request's tokens. `aclose()` aborts; `result` is exact once iteration ended or closed."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...
    async def __anext__(self) -> TokenEvent: ...
    async def aclose(self) -> None: ...
    @property
    def result(self) -> GenerationResult: ...


@runtime_checkable
class Engine(Protocol):
    kind: str  # "llamacpp" | "trtllm" | "openai"
    model_version: str
    context_tokens: int

    async def start(self) -> None:
        """Load the model; raise EngineLoadError when it cannot serve."""

    def stream(self, request_id: str, prompt: str, sampling: Sampling) -> TokenStream:
        """Start one generation; raise PromptTooLong or ValueError before taking capacity."""

    async def abort(self, request_id: str) -> None:
        """Stop `request_id` if it is running; its stream then ends with finish_reason 'cancelled'."""

    @property
    def capacity(self) -> int:
        """How many generations may run at once (slots, or the engine's batch limit)."""

    @property
    def in_flight(self) -> int: ...

    async def health(self) -> Health: ...

    async def close(self) -> None: ...
