"""Streaming llama.cpp inference engine (llama-cpp-python 0.3.x).

Design
======

* **Slots.** The engine owns a pool of ``slots`` independent ``llama_cpp.Llama``
  instances (each with its own context / KV cache, weights mmap-shared).  A
  request holds exactly one slot for its whole generation, so up to ``slots``
  requests generate in parallel; further requests wait (FIFO) for a free slot.
  Each slot keeps its KV cache between requests, so ``Llama.generate`` reuses a
  common prompt prefix (e.g. the system prompt) automatically.
* **Threads.** The llama.cpp generate loop is synchronous and CPU-bound; it runs
  in a dedicated worker thread per request (ctypes releases the GIL while
  llama.cpp computes).  Tokens are handed to the asyncio side with
  ``loop.call_soon_threadsafe(queue.put_nowait, ...)``, so the event loop never
  blocks.  The worker checks a ``threading.Event`` before sampling every token
  and stops promptly once the consumer goes away (``aclose()``, cancellation,
  or garbage collection of the stream).
* **Loop-agnostic.** The slot pool is guarded by a ``threading.Lock`` and wakes
  waiters on *their* event loop, so one engine may be used from several event
  loops over its lifetime (e.g. one ``asyncio.run`` per test).

Token accounting (exact)
========================

``prompt_tokens``
    ``len(tokenize_prompt(prompt))``: every token of the prompt as fed to the
    model (including BOS when the GGUF asks for it).  This is what the request
    costs, even if the slot's KV cache let llama.cpp skip re-decoding a prefix.
``completion_tokens``
    Every token *sampled* for this request **except** the end-of-generation
    token (``llama_vocab_is_eog``: EOS/EOT/``<|im_end|>`` ...), which is never
    shown to the caller.  A token that completes a stop string *is* counted (it
    was generated), even though the stop string itself is not emitted.  Hence
    ``completion_tokens <= max_tokens``, and ``completion_tokens`` equals the
    number of :class:`TokenEvent` s with ``token_id is not None``.

Finish reasons: ``"stop"`` (end-of-generation token or stop string),
``"length"`` (``max_tokens`` reached) and ``"cancelled"`` (the consumer closed
the stream early; only visible via :attr:`TokenStream.result` after
``aclose()``, useful for metering partial generations).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, TypeAlias, cast

import llama_cpp

__all__ = [
    "DEFAULT_SEED",
    "FinishReason",
    "GenerationResult",
    "LlamaCppEngine",
    "TokenEvent",
    "TokenStream",
    "default_n_threads",
    "tokenize_prompt",
]

FinishReason = Literal["stop", "length", "cancelled"]

#: llama.cpp's "pick a random seed" sentinel (0xFFFFFFFF).
DEFAULT_SEED: Final[int] = int(llama_cpp.LLAMA_DEFAULT_SEED)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of a streamed generation.

    ``text`` is the newly *displayable* text.  It may be ``""`` when the token
    ends inside an incomplete UTF-8 sequence (the text arrives with a later
    token) or while the text might be the beginning of a stop string.
    ``token_id`` is the sampled token, or ``None`` for a final flush-only event
    (text held back for a possible stop string, emitted when generation ended on
    an end-of-generation token).
    """

    text: str
    token_id: int | None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """Summary of a finished generation (see module docstring for semantics)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: The stop string that ended generation, if any.
    stop_sequence: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --------------------------------------------------------------------------- #
# llama.cpp helpers
# --------------------------------------------------------------------------- #


def _vocab_of(llm: llama_cpp.Llama) -> llama_cpp.llama_vocab_p:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    if vocab is None:  # pragma: no cover - only for a broken model
        raise RuntimeError("llama.cpp model has no vocabulary")
    return cast("llama_cpp.llama_vocab_p", vocab)


def tokenize_prompt(llm: llama_cpp.Llama, prompt: str) -> list[int]:
    """Tokens llama.cpp is fed for ``prompt`` — the single source of truth.

    Special tokens in the text are parsed (``special=True``), so a chat
    template's ``<|im_start|>`` is one token.  BOS is prepended iff the GGUF
    says the model wants it (``tokenizer.ggml.add_bos_token``), and not twice
    when the rendered template already starts with it (mirrors llama.cpp's
    server).  No EOS is appended: we are about to generate.

    Works with both full and ``vocab_only=True`` instances, which tokenize
    identically.
    """
    tokens: list[int] = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    vocab = _vocab_of(llm)
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    if llama_cpp.llama_vocab_get_add_bos(vocab) and bos >= 0 and tokens[:1] != [bos]:
        tokens.insert(0, bos)
    return tokens


def _token_bytes(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """Raw bytes of one token's piece (control tokens render as nothing)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:  # buffer too small: -n is the required size
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[: max(n, 0)]


class _StopMatcher:
    """Finds stop strings across token boundaries.

    Text that could be the beginning of a stop string is held back until it is
    either ruled out (then emitted) or completed (then dropped).
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


@dataclass(frozen=True, slots=True)
class _Request:
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


class _Slot:
    __slots__ = ("index", "llm", "vocab")

    def __init__(self, index: int, llm: llama_cpp.Llama) -> None:
        self.index = index
        self.llm = llm
        self.vocab = _vocab_of(llm)


class _SlotPool:
    """FIFO pool of slots, usable from any event loop and released from any thread."""

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self._lock = threading.Lock()
        self._free: deque[_Slot] = deque(slots)
        self._waiters: deque[asyncio.Future[_Slot]] = deque()

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    async def acquire(self) -> _Slot:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiters:
                return self._free.popleft()
            fut: asyncio.Future[_Slot] = loop.create_future()
            self._waiters.append(fut)
        try:
            return await fut
        except BaseException:
            # ValueError: already handed a slot (or a hand-off is scheduled).
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    def release(self, slot: _Slot) -> None:
        """Return ``slot``; thread-safe (called from worker threads)."""
        while True:
            with self._lock:
                if not self._waiters:
                    self._free.append(slot)
                    return
                fut = self._waiters.popleft()
            try:
                fut.get_loop().call_soon_threadsafe(self._deliver, fut, slot)
                return
            except RuntimeError:  # waiter's loop is closed: try the next one
                continue

    def _deliver(self, fut: asyncio.Future[_Slot], slot: _Slot) -> None:
        if fut.done():  # waiter was cancelled meanwhile
            self.release(slot)
        else:
            fut.set_result(slot)


# --------------------------------------------------------------------------- #
# Streams
# --------------------------------------------------------------------------- #

_Item: TypeAlias = "TokenEvent | GenerationResult | BaseException"


class TokenStream(AsyncIterator[TokenEvent]):
    """Async iterator of :class:`TokenEvent` for one request.

    Iterate with ``async for``; after normal exhaustion :attr:`result` holds the
    :class:`GenerationResult`.  ``aclose()`` (or ``async with``) stops the
    worker thread early and waits until it has released its slot; ``result``
    is then available too (``finish_reason == "cancelled"`` unless generation
    had already finished).  The slot is acquired lazily on the first
    ``__anext__``.
    """

    def __init__(self, engine: LlamaCppEngine, request: _Request) -> None:
        self._engine = engine
        self._request = request
        self._stop = threading.Event()
        self._queue: asyncio.Queue[_Item] | None = None
        self._done: concurrent.futures.Future[GenerationResult] | None = None
        self._result: GenerationResult | None = None
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_tokens)

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("generation result is available only after the stream is exhausted or closed")
        return self._result

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._queue is None:
                await self._start()
            assert self._queue is not None
            item = await self._queue.get()
        except BaseException:
            # Cancelled while waiting for a slot or a token: stop the worker.
            # The worker releases its slot itself when it exits.
            self._closed = True
            self._stop.set()
            raise
        if isinstance(item, TokenEvent):
            return item
        self._closed = True
        if isinstance(item, GenerationResult):
            self._result = item
            raise StopAsyncIteration
        raise item

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        slot = await self._engine._pool.acquire()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        done: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        stop = self._stop

        def emit(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # event loop closed: nobody is listening
                stop.set()

        thread = threading.Thread(
            target=self._engine._worker,
            args=(slot, self._request, stop, emit, done),
            name=f"llamacpp-slot-{slot.index}",
            daemon=True,
        )
        try:
            self._engine._track(thread, stop)
            thread.start()
        except BaseException:
            self._engine._untrack(thread)
            self._engine._pool.release(slot)
            raise
        self._queue = queue
        self._done = done

    async def aclose(self) -> None:
        """Stop generating and wait until the worker thread has exited."""
        self._closed = True
        self._stop.set()
        if self._done is not None:
            try:
                result = await asyncio.wrap_future(self._done)
            except Exception:
                return
            if self._result is None:
                self._result = result

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Abandoned without aclose(): make sure the worker does not run on.
        self._stop.set()


# --------------------------------------------------------------------------- #
# Engine
# --------------------------------------------------------------------------- #


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_n_threads(slots: int) -> int:
    """Threads per slot: the available CPUs minus one, split between slots.

    One CPU is left for the event loop / Kafka / gRPC when possible.  ggml's
    worker threads spin at barriers, so oversubscribing the CPUs makes decode
    collapse (measured on 2 vCPUs: 1 thread ~30-50 tok/s steady; 2 threads
    ~55-65 tok/s when idle but 3-6 tok/s as soon as anything else runs).
    """
    return max(1, (_available_cpus() - 1) // max(1, slots))


class LlamaCppEngine:
    """A pool of ``slots`` llama.cpp instances serving streamed generations.

    ``n_threads=None`` uses :func:`default_n_threads`.
    ``seed`` seeds the sampler of every request (for ``temperature > 0``);
    the default :data:`DEFAULT_SEED` means "random each request".
    """

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = DEFAULT_SEED,
        slots: int = 1,
        n_batch: int = 512,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if n_ctx < 16:
            raise ValueError(f"n_ctx must be >= 16, got {n_ctx}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {str(model_path)!r}")
        threads = n_threads if n_threads is not None else default_n_threads(slots)

        self.model_path: Final = model_path
        self.n_threads: Final = threads
        self.num_slots: Final = slots
        self._closed = False
        self._active: dict[threading.Thread, threading.Event] = {}
        self._active_lock = threading.Lock()

        # Tokenizer used on the event-loop side (vocab only: cheap, no context).
        self._tokenizer = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        instances: list[_Slot] = []
        try:
            for i in range(slots):
                llm = llama_cpp.Llama(
                    model_path=str(model_path),
                    n_ctx=n_ctx,
                    n_batch=min(n_batch, n_ctx),
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=seed,
                    verbose=False,
                )
                instances.append(_Slot(i, llm))
        except BaseException:
            for s in instances:
                s.llm.close()
            self._tokenizer.close()
            raise
        self._slots: Final = tuple(instances)
        # The context llama.cpp actually allocated (never more than requested).
        self.n_ctx: Final = min(n_ctx, min(s.llm.n_ctx() for s in instances))
        self._pool = _SlotPool(instances)

    # -- tokenization ------------------------------------------------------- #

    def tokenize(self, prompt: str) -> list[int]:
        """Exactly the tokens a generation for ``prompt`` is fed."""
        return tokenize_prompt(self._tokenizer, prompt)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt))

    # -- generation --------------------------------------------------------- #

    def stream(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str] = (),
    ) -> TokenStream:
        """Start a streamed generation (``async for ev in engine.stream(...)``).

        The prompt is passed verbatim (already chat-templated); special tokens
        in it are parsed.  ``temperature == 0`` is greedy decoding; otherwise
        temperature + nucleus (``top_p``) sampling over the full vocabulary
        (no top-k / min-p / repetition penalty).

        Raises ``ValueError`` immediately (before any slot is taken) for bad
        parameters or when the prompt does not fit ``n_ctx - max_tokens``.
        """
        if self._closed:
            raise RuntimeError("engine is closed")
        if isinstance(stop, str):
            stop = (stop,)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens >= self.n_ctx:
            raise ValueError(
                f"max_tokens={max_tokens} must be smaller than the context size n_ctx={self.n_ctx}"
            )
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        tokens = self.tokenize(prompt)
        if not tokens:
            raise ValueError("prompt is empty (0 tokens)")
        budget = self.n_ctx - max_tokens
        if len(tokens) > budget:
            raise ValueError(
                f"prompt is too long: {len(tokens)} prompt tokens + max_tokens={max_tokens} "
                f"exceeds the context size n_ctx={self.n_ctx} (at most {budget} prompt tokens "
                f"fit with this max_tokens)"
            )
        return TokenStream(
            self,
            _Request(tokens, max_tokens, float(temperature), float(top_p), tuple(stop)),
        )

    def _worker(
        self,
        slot: _Slot,
        req: _Request,
        stop_event: threading.Event,
        emit: Callable[[_Item], None],
        done: concurrent.futures.Future[GenerationResult],
    ) -> None:
        """Thread body: generate, emit events, then the result; release the slot."""
        outcome: GenerationResult | BaseException
        try:
            outcome = self._generate(slot, req, stop_event, emit)
        except BaseException as exc:
            outcome = exc
        # Free the slot *before* signalling completion, so that once a consumer
        # observes the end (or aclose() returns) the slot is reusable.
        self._untrack(threading.current_thread())
        self._pool.release(slot)
        if isinstance(outcome, GenerationResult):
            done.set_result(outcome)
        else:
            done.set_exception(outcome)
        emit(outcome)

    @staticmethod
    def _generate(
        slot: _Slot,
        req: _Request,
        stop_event: threading.Event,
        emit: Callable[[_Item], None],
    ) -> GenerationResult:
        llm, vocab = slot.llm, slot.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = _StopMatcher(req.stop)
        completion_tokens = 0
        finish: FinishReason = "length"
        matched: str | None = None
        # generate() evaluates the prompt (reusing this slot's cached prefix),
        # then alternates sample -> yield -> eval(sampled token).  It never ends
        # by itself; we stop by not asking for the next token.
        gen = llm.generate(
            req.prompt_tokens,
            top_k=0,  # <= 0 disables top-k in llama.cpp
            top_p=req.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=req.temperature,  # 0.0 => greedy sampler
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            while True:
                if stop_event.is_set():
                    finish = "cancelled"
                    break
                token = int(next(gen))
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    out, matched = matcher.feed(decoder.decode(b"", final=True))
                    if matched is None:
                        out += matcher.flush()
                    if out:
                        emit(TokenEvent(out, None))
                    break
                completion_tokens += 1
                last = completion_tokens >= req.max_tokens
                out, matched = matcher.feed(decoder.decode(_token_bytes(vocab, token), final=last))
                if matched is not None:
                    finish = "stop"
                    emit(TokenEvent(out, token))
                    break
                if last:
                    emit(TokenEvent(out + matcher.flush(), token))
                    break
                emit(TokenEvent(out, token))
        finally:
            gen.close()
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=len(req.prompt_tokens),
            completion_tokens=completion_tokens,
            stop_sequence=matched,
        )

    # -- lifecycle ---------------------------------------------------------- #

    @property
    def free_slots(self) -> int:
        return self._pool.free

    @property
    def active_generations(self) -> int:
        with self._active_lock:
            return len(self._active)

    def _track(self, thread: threading.Thread, stop: threading.Event) -> None:
        with self._active_lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._active[thread] = stop

    def _untrack(self, thread: threading.Thread) -> None:
        with self._active_lock:
            self._active.pop(thread, None)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop all generations, wait for their threads, free the models."""
        with self._active_lock:
            if self._closed:
                return
            self._closed = True
            active = list(self._active.items())
        for _, stop in active:
            stop.set()
        for thread, _ in active:
            thread.join(timeout)
        if any(t.is_alive() for t, _ in active):
            return  # a thread is stuck in llama.cpp: leak rather than crash
        for s in self._slots:
            s.llm.close()
        self._tokenizer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
