"""In-process llama.cpp engine (llama-cpp-python 0.3.x), the default engine.

Design
======

* **Slots.** The engine owns a pool of ``slots`` independent ``llama_cpp.Llama``
  instances (each with its own context / KV cache, weights mmap-shared).  A
  request holds exactly one slot for its whole generation, so up to ``slots``
  requests generate in parallel; further requests wait (FIFO) for a free slot.
  There is no global lock around generation.  Each slot keeps its KV cache
  between requests, so ``Llama.generate`` reuses a common prompt prefix (e.g.
  the system prompt); that reuse is reported as ``cached_tokens``.
* **Threads.** The llama.cpp generate loop is synchronous and CPU-bound; it runs
  in a dedicated worker thread per request (ctypes releases the GIL while
  llama.cpp computes).  Tokens are handed to the asyncio side with
  ``loop.call_soon_threadsafe(queue.put_nowait, ...)``, so the event loop never
  blocks.  The worker checks a ``threading.Event`` before sampling every token
  and stops promptly once the consumer goes away (``aclose()``, ``abort()``,
  cancellation, or garbage collection of the stream).
* **Loop-agnostic.** The slot pool is guarded by a ``threading.Lock`` and wakes
  waiters on *their* event loop, so one engine may be used from several event
  loops over its lifetime (e.g. one ``asyncio.run`` per test).

Token accounting (exact)
========================

``prompt_tokens``
    ``len(tokenize_prompt(prompt))``: every token of the prompt as fed to the
    model (including BOS when the GGUF asks for it).  This is what the request
    costs, even if the slot's KV cache let llama.cpp skip re-decoding a prefix
    (``cached_tokens`` says how many were skipped).
``completion_tokens``
    Every token *sampled* for this request **except** the end-of-generation
    token (``llama_vocab_is_eog``: EOS/EOT/``<|im_end|>`` ...), which is never
    shown to the caller.  A token that completes a stop string *is* counted (it
    was generated), even though the stop string itself is not emitted.  Hence
    ``completion_tokens <= max_tokens``, and ``completion_tokens`` equals the
    sum of :attr:`TokenEvent.tokens`.

Finish reasons: ``"stop"`` (end-of-generation token or stop string),
``"length"`` (``max_tokens`` reached) and ``"cancelled"`` (``abort()`` or the
consumer closed the stream early; visible via ``result`` after ``aclose()``,
so partial generations are billed).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, cast

import llama_cpp

from services.inference.engine import (
    EngineLoadError,
    FinishReason,
    GenerationResult,
    Health,
    Sampling,
    TokenEvent,
)
from services.inference.engine_support import (
    InFlight,
    Interruptible,
    StopMatcher,
    TracksInFlight,
    check_prompt_fits,
    validate_sampling,
)

__all__ = [
    "DEFAULT_SEED",
    "LlamaCppEngine",
    "LlamaTokenStream",
    "default_n_threads",
    "gguf_version",
    "tokenize_prompt",
]

#: llama.cpp's "pick a random seed" sentinel (0xFFFFFFFF).
DEFAULT_SEED: Final[int] = int(llama_cpp.LLAMA_DEFAULT_SEED)


# --------------------------------------------------------------------------- #
# llama.cpp helpers
# --------------------------------------------------------------------------- #


def gguf_version(path: Path) -> str:
    """``<file name>@<size>-<sha256 of size, head and tail>``: names the exact weights served.

    Hashing the first and last MiB (not the whole file) keeps start-up fast
    for multi-GB models while still telling two builds apart.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"{path.name}@{size}-{digest.hexdigest()[:12]}"


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


class LlamaTokenStream(Interruptible):
    """Async iterator of :class:`TokenEvent` for one request (see the module docstring).

    Iterate with ``async for``; after normal exhaustion :attr:`result` holds the
    :class:`GenerationResult`.  ``aclose()`` (or ``async with``) stops the
    worker thread early and waits until it has released its slot; ``result``
    is then available too (``finish_reason == "cancelled"`` unless generation
    had already finished).  The slot is acquired lazily on the first
    ``__anext__``; ``interrupt()`` (the engine's ``abort``) also ends a stream
    still waiting for a slot.
    """

    def __init__(self, engine: LlamaCppEngine, request_id: str, request: _Request) -> None:
        self._engine = engine
        self._request_id = request_id
        self._request = request
        self._stop = threading.Event()
        self._queue: asyncio.Queue[_Item] | None = None
        self._done: concurrent.futures.Future[GenerationResult] | None = None
        self._result: GenerationResult | None = None
        self._closed = False
        self._wakeup: asyncio.Future[None] | None = None
        engine._table.add(request_id, self)

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_tokens)

    def interrupt(self) -> None:
        """Stop generating (thread-safe); a stream waiting for a slot ends at once."""
        self._stop.set()
        wakeup = self._wakeup
        if wakeup is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                wakeup.get_loop().call_soon_threadsafe(_resolve, wakeup)

    async def __anext__(self) -> TokenEvent:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._queue is None and not await self._start():
                self._finish(self._unstarted())
                raise StopAsyncIteration
            assert self._queue is not None
            item = await self._queue.get()
        except StopAsyncIteration:
            raise
        except BaseException:
            # Cancelled while waiting for a slot or a token: stop the worker.
            # The worker releases its slot itself when it exits.
            self._closed = True
            self._stop.set()
            if self._done is None:
                self._finish(self._unstarted())
            raise
        if isinstance(item, TokenEvent):
            return item
        self._closed = True
        if isinstance(item, GenerationResult):
            self._finish(item)
            raise StopAsyncIteration
        self._finish(self._unstarted())
        raise item

    def _unstarted(self) -> GenerationResult:
        return GenerationResult("cancelled", self.prompt_tokens, 0)

    def _finish(self, result: GenerationResult) -> None:
        if self._result is None:
            self._result = result
        self._engine._table.remove(self._request_id, self)

    async def _start(self) -> bool:
        """Take a slot and start the worker thread; False if interrupted while waiting."""
        loop = asyncio.get_running_loop()
        pool = self._engine._pool
        self._wakeup = loop.create_future()
        if self._stop.is_set():
            return False
        acquire = asyncio.ensure_future(pool.acquire())
        try:
            waiting: set[asyncio.Future[Any]] = {acquire, self._wakeup}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            acquire.cancel()
            raise
        if not acquire.done() or self._stop.is_set():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                slot = await acquire
                pool.release(slot)  # got one in the same instant: hand it back
            return False
        slot = acquire.result()
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
            pool.release(slot)
            raise
        self._queue = queue
        self._done = done
        return True

    async def aclose(self) -> None:
        """Stop generating and wait until the worker thread has exited."""
        self._closed = True
        self._stop.set()
        if self._done is None:
            self._finish(self._unstarted())
            return
        try:
            result = await asyncio.wrap_future(self._done)
        except Exception:
            self._finish(self._unstarted())
            return
        self._finish(result)

    def __del__(self) -> None:
        # Abandoned without aclose(): make sure the worker does not run on.
        self._stop.set()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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


def _cached_prefix(llm: llama_cpp.Llama, tokens: Sequence[int]) -> int:
    """Prompt tokens the slot's KV cache already holds (``Llama.generate`` skips them)."""
    cached = 0
    for a, b in zip(llm.input_ids.tolist(), tokens, strict=False):
        if a != b:
            break
        cached += 1
    return max(0, min(cached, len(tokens) - 1))  # generate() re-decodes at least one token


class LlamaCppEngine(TracksInFlight):
    """A pool of ``slots`` llama.cpp instances serving streamed generations (an :class:`Engine`).

    ``n_threads=None`` uses :func:`default_n_threads`.
    ``seed`` seeds the sampler of every request (for ``temperature > 0``);
    the default :data:`DEFAULT_SEED` means "random each request".
    Nothing is loaded until :meth:`start`.
    """

    kind: str = "llamacpp"

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
        self.model_path: Final = Path(model_path)
        self.n_threads: Final = n_threads if n_threads is not None else default_n_threads(slots)
        self.num_slots: Final = slots
        self.model_version = self.model_path.name
        self.n_ctx = n_ctx
        self._seed = seed
        self._n_batch = n_batch
        self._started = False
        self._closed = False
        self._active: dict[threading.Thread, threading.Event] = {}
        self._active_lock = threading.Lock()
        self._table = InFlight()
        self._slots: tuple[_Slot, ...] = ()
        self._tokenizer: llama_cpp.Llama | None = None
        self._pool = _SlotPool(())

    # -- lifecycle ---------------------------------------------------------- #

    async def start(self) -> None:
        """Load the weights into every slot (in a thread: it takes seconds)."""
        if self._started:
            return
        try:
            await asyncio.to_thread(self._load)
        except Exception as exc:
            raise EngineLoadError(f"llama.cpp could not load {str(self.model_path)!r}: {exc}") from exc
        self._started = True

    def _load(self) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {str(self.model_path)!r}")
        version = gguf_version(self.model_path)
        # Tokenizer used on the event-loop side (vocab only: cheap, no context).
        tokenizer = llama_cpp.Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
        instances: list[_Slot] = []
        try:
            for i in range(self.num_slots):
                llm = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_batch=min(self._n_batch, self.n_ctx),
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    seed=self._seed,
                    verbose=False,
                )
                instances.append(_Slot(i, llm))
        except BaseException:
            for s in instances:
                s.llm.close()
            tokenizer.close()
            raise
        self._tokenizer = tokenizer
        self._slots = tuple(instances)
        # The context llama.cpp actually allocated (never more than requested).
        self.n_ctx = min(self.n_ctx, min(s.llm.n_ctx() for s in instances))
        self.model_version = version
        self._pool = _SlotPool(instances)

    @property
    def context_tokens(self) -> int:
        return self.n_ctx

    @property
    def capacity(self) -> int:
        return self.num_slots

    async def health(self) -> Health:
        if not self._started:
            return Health(False, "not started")
        if self._closed:
            return Health(False, "closed")
        return Health(True, f"{self.num_slots} slots, {self.free_slots} free")

    # -- tokenization ------------------------------------------------------- #

    def tokenize(self, prompt: str) -> list[int]:
        """Exactly the tokens a generation for ``prompt`` is fed."""
        if self._tokenizer is None:
            raise RuntimeError("engine is not started")
        return tokenize_prompt(self._tokenizer, prompt)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt))

    # -- generation --------------------------------------------------------- #

    def stream(self, request_id: str, prompt: str, sampling: Sampling) -> LlamaTokenStream:
        """Start a streamed generation (``async for ev in engine.stream(...)``).

        The prompt is passed verbatim (already chat-templated); special tokens
        in it are parsed.  ``temperature == 0`` is greedy decoding; otherwise
        temperature + nucleus (``top_p``) sampling over the full vocabulary
        (no top-k / min-p / repetition penalty).

        Raises ``ValueError`` (``PromptTooLong`` when the prompt does not fit
        ``n_ctx - max_tokens``) immediately, before any slot is taken.
        """
        if self._closed:
            raise RuntimeError("engine is closed")
        validate_sampling(sampling, self.n_ctx)
        tokens = self.tokenize(prompt)
        check_prompt_fits(len(tokens), sampling.max_tokens, self.n_ctx)
        request = _Request(
            tokens,
            sampling.max_tokens,
            float(sampling.temperature),
            float(sampling.top_p),
            tuple(sampling.stop),
        )
        return LlamaTokenStream(self, request_id, request)

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
        matcher = StopMatcher(req.stop)
        completion_tokens = 0
        finish: FinishReason = "length"
        matched: str | None = None
        cached = _cached_prefix(llm, req.prompt_tokens)
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
            cached_tokens=cached,
            stop_sequence=matched,
        )

    # -- bookkeeping -------------------------------------------------------- #

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

    async def close(self) -> None:
        """Stop all generations, wait for their threads, free the models."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self, timeout: float | None = 30.0) -> None:
        """:meth:`close` for code without an event loop (tests, atexit)."""
        with self._active_lock:
            if self._closed:
                return
            self._closed = True
            active = list(self._active.items())
        self._table.interrupt_all()
        for _, stop in active:
            stop.set()
        for thread, _ in active:
            thread.join(timeout)
        if any(t.is_alive() for t, _ in active):
            return  # a thread is stuck in llama.cpp: leak rather than crash
        for s in self._slots:
            s.llm.close()
        if self._tokenizer is not None:
            self._tokenizer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_sync()
