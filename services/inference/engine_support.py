"""What every engine shares: request checks, stop strings, the in-flight table, async streams.

Kept apart from `engine.py` (the contract) so the contract stays small, and so
the three engines check prompts, hold back stop strings and count in-flight
work in exactly one way.
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Self

from services.inference.engine import GenerationResult, PromptTooLong, Sampling, TokenEvent


def validate_sampling(sampling: Sampling, context_tokens: int) -> None:
    """Refuse parameters no engine can honour, naming the field (before any capacity is taken)."""
    if sampling.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {sampling.max_tokens}")
    if sampling.max_tokens >= context_tokens:
        raise PromptTooLong(
            f"max_tokens={sampling.max_tokens} must be smaller than the context size n_ctx={context_tokens}"
        )
    if not sampling.temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if isinstance(sampling.stop, str):
        raise ValueError("stop must be a sequence of strings, not a string")


def check_prompt_fits(prompt_tokens: int, max_tokens: int, context_tokens: int) -> None:
    """PromptTooLong unless prompt + max_tokens fit the context (and the prompt is not empty)."""
    if prompt_tokens == 0:
        raise ValueError("prompt is empty (0 tokens)")
    budget = context_tokens - max_tokens
    if prompt_tokens > budget:
        raise PromptTooLong(
            f"prompt is too long: {prompt_tokens} prompt tokens + max_tokens={max_tokens} "
            f"exceeds the context size n_ctx={context_tokens} (at most {budget} prompt tokens "
            f"fit with this max_tokens)"
        )


class StopMatcher:
    """Finds stop strings across token boundaries.

    Text that could be the beginning of a stop string is held back until it is
    either ruled out (then emitted) or completed (then dropped), so a client
    never sees part of a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, matched stop string or None)."""
        if not self._stops:
            return text, None
        buf = self._pending + text
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self._pending = ""
            return buf[: best[0]], best[1]
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(buf) - hold
        self._pending = buf[cut:]
        return buf[:cut], None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Interruptible(abc.ABC):
    """A token stream an engine can stop from another task (abort on a cancel event).

    Holds what every engine's stream shares: `result` once ended, `async for`,
    and `async with` (which closes, i.e. aborts, on the way out).
    """

    _result: GenerationResult | None = None

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Ask generation to stop; the stream then ends with 'cancelled'. Thread-safe, idempotent."""

    @abc.abstractmethod
    async def __anext__(self) -> TokenEvent: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("generation result is available only after the stream is exhausted or closed")
        return self._result

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class InFlight:
    """The engine's table of live streams by request id: what `abort` finds, what `in_flight` counts.

    Thread-safe (llama.cpp threads leave it); one request id is live at most
    once, so a re-delivered request cannot run twice on one engine.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, weakref.ref[Interruptible]] = {}

    def add(self, request_id: str, stream: Interruptible) -> None:
        with self._lock:
            ref = self._live.get(request_id)
            if ref is not None and ref() is not None:
                raise ValueError(f"request_id {request_id!r} is already generating on this engine")
            self._live[request_id] = weakref.ref(stream, lambda _: self._forget(request_id, None))

    def remove(self, request_id: str, stream: Interruptible) -> None:
        self._forget(request_id, stream)

    def _forget(self, request_id: str, stream: Interruptible | None) -> None:
        with self._lock:
            ref = self._live.get(request_id)
            if ref is not None and (stream is None or ref() is stream or ref() is None):
                del self._live[request_id]

    def get(self, request_id: str) -> Interruptible | None:
        with self._lock:
            ref = self._live.get(request_id)
        return ref() if ref is not None else None

    def interrupt(self, request_id: str) -> None:
        """The engine's `abort`: unknown or finished request ids are ignored."""
        stream = self.get(request_id)
        if stream is not None:
            stream.interrupt()

    def interrupt_all(self) -> None:
        for stream in self.all():
            stream.interrupt()

    def all(self) -> list[Interruptible]:
        with self._lock:
            refs = list(self._live.values())
        return [s for s in (r() for r in refs) if s is not None]

    def __len__(self) -> int:
        with self._lock:
            return sum(r() is not None for r in self._live.values())


class Generation(abc.ABC):
    """One request on an asyncio-native engine (trtllm, openai), driven by `GeneratedStream`."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[TokenEvent]:
        """Generate; ends when the engine finished, including after `interrupt()`."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Ask the engine to stop this request soon (never blocks)."""

    @abc.abstractmethod
    def outcome(self, finished: bool) -> GenerationResult:
        """Usage so far; `finished` is False when events() did not run to its end."""


class GeneratedStream(Interruptible):
    """TokenStream over a `Generation`: start on first read, abort, exact result, in-flight bookkeeping."""

    def __init__(self, request_id: str, generation: Generation, table: InFlight) -> None:
        self._request_id = request_id
        self._generation = generation
        self._table = table
        self._events: AsyncIterator[TokenEvent] | None = None
        self._result: GenerationResult | None = None
        self._interrupted = False
        table.add(request_id, self)

    def interrupt(self) -> None:
        self._interrupted = True
        self._generation.interrupt()

    async def __anext__(self) -> TokenEvent:
        if self._result is not None:
            raise StopAsyncIteration
        if self._events is None:
            if self._interrupted:  # aborted before it started: nothing was generated
                self._end(self._generation.outcome(finished=False))
                raise StopAsyncIteration
            self._events = self._generation.events()
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            self._end(self._generation.outcome(finished=True))
            raise
        except BaseException:
            # Cancelled consumer or engine error: stop the engine, bill what was made.
            self._generation.interrupt()
            self._end(self._generation.outcome(finished=False))
            raise

    async def aclose(self) -> None:
        """Abort and wait for the engine's last word, so the result counts every token made."""
        if self._result is not None:
            return
        self.interrupt()
        if self._events is None:
            self._end(self._generation.outcome(finished=False))
            return
        try:
            async for _ in self._events:
                pass
        except Exception:
            self._end(self._generation.outcome(finished=False))
            return
        self._end(self._generation.outcome(finished=True))

    def _end(self, result: GenerationResult) -> None:
        if self._result is None:
            self._result = result
            self._table.remove(self._request_id, self)


class TracksInFlight:
    """`abort` and `in_flight` over the engine's InFlight table (every engine keeps one)."""

    _table: InFlight

    async def abort(self, request_id: str) -> None:
        self._table.interrupt(request_id)

    @property
    def in_flight(self) -> int:
        return len(self._table)
