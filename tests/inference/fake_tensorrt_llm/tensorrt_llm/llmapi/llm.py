"""Fake of tensorrt_llm/llmapi/llm.py: `LLM` with an in-flight-batching executor thread.

Upstream: `LLM.__init__` validates kwargs against its args model and builds or
loads the engine; `generate_async` tokenizes a str prompt with
`add_special_tokens`, checks prompt + max_tokens against max_seq_len (ValueError),
queues the request on the executor and returns a `RequestOutput` at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from tensorrt_llm.executor.result import GenerationResult, Response
from tensorrt_llm.llmapi.llm_utils import KvCacheConfig
from tensorrt_llm.sampling_params import SamplingParams

#: Seconds one batched decoding iteration takes (every running request gets a token).
STEP_SECONDS = 0.004
#: Seconds of prefill per prompt token not found in the KV cache.
PREFILL_SECONDS_PER_TOKEN = 0.00002

_VALID_KWARGS = {
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "kv_cache_config",
    "backend",
    "skip_tokenizer_init",
    "trust_remote_code",
}

_WORDS = (
    " the", " river", " runs", " past", " old", " stones", " and", " quiet", " reeds", ",",
    " under", " a", " grey", " sky", " water", " toward", " sea", ".", " light", " moves",
)  # fmt: skip
PAD, BOS, EOS = 0, 1, 2
_BYTE0 = 3
_WORD0 = _BYTE0 + 256


class _Tokenizer:
    """Byte-level tokenizer plus a small word vocabulary (the fake model only emits words)."""

    eos_token_id = EOS
    pad_token_id = PAD

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        ids = [_BYTE0 + b for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        out = bytearray()
        for t in token_ids:
            if t < _BYTE0:
                continue
            out += bytes([t - _BYTE0]) if t < _WORD0 else _WORDS[t - _WORD0].encode()
        return out.decode("utf-8", errors="replace")


class _Request:
    def __init__(self, result: GenerationResult, prompt: list[int], params: SamplingParams) -> None:
        self.result = result
        self.prompt = prompt
        self.params = params
        digest = hashlib.sha256(repr((prompt, params.seed, params.temperature)).encode()).digest()
        self.seed = int.from_bytes(digest[:4], "big")
        self.natural_length = 12 + self.seed % 20  # then the model emits its end token
        self.generated = 0
        self.cancel = False
        self.prefilled = False
        self.cached = 0

    def next_token(self) -> int:
        return _WORD0 + (self.seed + 7 * self.generated) % len(_WORDS)


class _Executor:
    """One thread stepping the running batch; requests past max_batch_size wait in a queue."""

    def __init__(self, max_batch_size: int, kv: KvCacheConfig) -> None:
        self._max_batch = max_batch_size
        self._kv = kv
        self._cond = threading.Condition()
        self._queued: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._by_id: dict[int, _Request] = {}
        self._seen_prompts: deque[list[int]] = deque(maxlen=64)
        self._shutdown = False
        self._thread = threading.Thread(target=self._loop, name="fake-trtllm-executor", daemon=True)
        self._thread.start()

    def is_shutdown(self) -> bool:
        return self._shutdown

    def submit(self, request: _Request) -> None:
        with self._cond:
            self._queued.append(request)
            self._by_id[request.result.request_id] = request
            self._cond.notify()

    def abort_request(self, request_id: int) -> None:
        with self._cond:
            request = self._by_id.get(request_id)
            if request is not None:
                request.cancel = True
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify()
        self._thread.join(10)

    def _cached(self, prompt: list[int]) -> int:
        if not self._kv.enable_block_reuse:
            return 0
        best = 0
        for seen in self._seen_prompts:
            n = 0
            for a, b in zip(seen, prompt, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        block = self._kv.tokens_per_block
        return min(best, len(prompt) - 1) // block * block

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._shutdown and not self._queued and not self._running:
                    self._cond.wait()
                if self._shutdown:
                    return
                while self._queued and len(self._running) < self._max_batch:
                    request = self._queued.popleft()
                    self._running[request.result.request_id] = request
                # A request cancelled while still queued ends without running.
                for request in [r for r in self._queued if r.cancel]:
                    self._queued.remove(request)
                    self._finish(request, [], "cancelled", 0)
                batch = list(self._running.values())
            prefill = 0
            for request in batch:
                if not request.prefilled:
                    request.prefilled = True
                    request.cached = self._cached(request.prompt)
                    prefill += len(request.prompt) - request.cached
            time.sleep(STEP_SECONDS + prefill * PREFILL_SECONDS_PER_TOKEN)
            with self._cond:
                for request in batch:
                    self._step(request)

    def _step(self, request: _Request) -> None:
        cached = request.cached
        if request.cancel:
            self._finish(request, [], "cancelled", cached)
        elif request.generated >= request.natural_length:
            self._finish(request, [], "end_id", cached)
        else:
            token = request.next_token()
            request.generated += 1
            if request.generated >= request.params.max_tokens:
                self._finish(request, [token], "length", cached)
            else:
                request.result._deliver(Response(request.result.request_id, [token], None, False, cached))

    def _finish(self, request: _Request, tokens: list[int], reason: Any, cached: int) -> None:
        rid = request.result.request_id
        self._running.pop(rid, None)
        self._by_id.pop(rid, None)
        if reason != "cancelled":
            self._seen_prompts.append(request.prompt)
        request.result._deliver(Response(rid, tokens, reason, True, cached))


class RequestOutput(GenerationResult):
    """The object `generate_async` returns (upstream subclasses GenerationResult the same way)."""

    @property
    def prompt(self) -> str | None:
        return getattr(self, "_prompt", None)


class LLM:
    def __init__(self, model: str | Path, tokenizer: str | Path | None = None, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in _VALID_KWARGS:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        config_file = Path(model) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{model} is neither a Hugging Face checkpoint nor a TensorRT engine directory")
        config = json.loads(config_file.read_text())
        self.max_seq_len: int = kwargs.get("max_seq_len") or config.get("max_position_embeddings", 2048)
        self.max_batch_size: int = kwargs.get("max_batch_size") or 2048
        self._tokenizer = _Tokenizer()
        self._ids = itertools.count(1)
        self._executor: _Executor | None = _Executor(
            self.max_batch_size, kwargs.get("kv_cache_config") or KvCacheConfig()
        )

    @property
    def tokenizer(self) -> _Tokenizer:
        return self._tokenizer

    def generate_async(
        self,
        inputs: str | list[int],
        sampling_params: SamplingParams | None = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> RequestOutput:
        if self._executor is None or self._executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        params = sampling_params or SamplingParams()
        if isinstance(inputs, str):
            prompt_token_ids = self._tokenizer.encode(inputs, add_special_tokens=params.add_special_tokens)
            prompt: str | None = inputs
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            prompt_token_ids, prompt = list(inputs), None
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if len(prompt_token_ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(prompt_token_ids)}) and query length (0) max_tokens "
                f"({params.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )
        result = RequestOutput(
            next(self._ids), prompt_token_ids, params, self._executor, self._tokenizer, streaming
        )
        result._prompt = prompt  # type: ignore[attr-defined]
        self._executor.submit(_Request(result, prompt_token_ids, params))
        return result

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
