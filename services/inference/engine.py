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
    """Newly displayable text and how many generated tokens it carries.

    `token_id` is the sampled token when the event is exactly one known token,
    else None: a final flush of held-back text (tokens == 0), or a remote
    engine's chunk whose token ids are not sent (tokens >= 1). Count usage with
    `tokens`, never with `token_id`. `tokens` defaults to 1 when `token_id` is
    set and 0 otherwise.
    """

    text: str
    token_id: int | None
    tokens: int = -1

    def __post_init__(self) -> None:
        if self.tokens < 0:
            object.__setattr__(self, "tokens", 0 if self.token_id is None else 1)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """Exact usage of one generation (it is what the request is billed for).

    `prompt_tokens` counts every prompt token fed to the model, even those a
    prefix cache spared recomputing (`cached_tokens` of them). `completion_tokens`
    counts every token generated, including tokens produced after the consumer
    stopped reading (a cancelled request still pays for them).
    `usage_exact` is False only when the engine did not report usage and Sluice
    counted it itself (an OpenAI-compatible server that omits the usage chunk).
    """

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None
    usage_exact: bool = True

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
    @property
    def kind(self) -> str:
        """"llamacpp" | "trtllm" | "openai" (goes into every completion)."""

    @property
    def model_version(self) -> str:
        """Which exact weights / engine build serves (final once `start()` returned)."""

    @property
    def context_tokens(self) -> int:
        """Prompt plus max_tokens may not exceed this."""

    async def start(self) -> None:
        """Load the model; raise EngineLoadError when it cannot serve."""

    def stream(self, request_id: str, prompt: str, sampling: Sampling) -> TokenStream:
        """Start one generation; raise PromptTooLong or ValueError before taking capacity.

        Generation begins on the first `__anext__`. More than `capacity` streams
        may exist; the extra ones wait (in the engine's queue) for room.
        """

    async def abort(self, request_id: str) -> None:
        """Stop `request_id` if it is running; its stream then ends with finish_reason 'cancelled'.

        Returns at once; the stream's consumer sees the end within one token
        step. Unknown or finished request ids are ignored.
        """

    @property
    def capacity(self) -> int:
        """How many generations may run at once (slots, or the engine's batch limit)."""

    @property
    def in_flight(self) -> int:
        """Streams handed out by `stream()` and not yet ended (those waiting for room count too)."""

    async def health(self) -> Health: ...

    async def close(self) -> None: ...
