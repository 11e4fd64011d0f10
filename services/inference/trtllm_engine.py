"""In-process TensorRT-LLM through its LLM API (`tensorrt_llm.LLM`), the production engine.

Written against NVIDIA/TensorRT-LLM's public LLM API (tensorrt_llm/llmapi/llm.py,
tensorrt_llm/executor/result.py, tensorrt_llm/sampling_params.py):

* `LLM(model=..., max_batch_size=..., max_seq_len=..., kv_cache_config=...)`
  loads (or builds) the engine; its executor does in-flight batching, so this
  adapter never batches itself: every request is one `generate_async`.
* `llm.generate_async(prompt_token_ids, SamplingParams(...), streaming=True)`
  returns a `RequestOutput` at once; `async for` yields it after every engine
  response. `outputs[0].text` / `token_ids` are cumulative;
  `text_diff` / `token_ids_diff` are what the last response added.
  `finish_reason` is set on the final response ('stop', 'length', 'cancelled';
  'timeout' only with a scheduling timeout, which Sluice does not set).
* `RequestOutput.abort()` asks the executor to cancel; the stream then ends
  with a final response whose finish_reason is 'cancelled'. We keep reading
  until then, so tokens made in the meantime are billed too.
* Usage: prompt tokens are `prompt_token_ids` (tokenized here with the LLM's own
  tokenizer, so the context check happens before the request takes a batch
  slot); completion tokens are the sum of every `token_ids_diff` (a stop
  word's tokens were generated, even if TensorRT-LLM trims them from
  `token_ids`); `cached_tokens` is the KV-cache block reuse the executor
  reports (newer releases; 0 otherwise).

`tensorrt_llm` is imported in `start()` only, so other engines never need it.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from services.inference.engine import (
    EngineLoadError,
    FinishReason,
    GenerationResult,
    Health,
    Sampling,
    TokenEvent,
)
from services.inference.engine_support import (
    GeneratedStream,
    Generation,
    InFlight,
    StopMatcher,
    TracksInFlight,
    check_prompt_fits,
    validate_sampling,
)
from sluice.engine_specs import TrtllmSettings

__all__ = ["TrtLlmEngine"]

# TensorRT-LLM finish reasons -> ours. 'timeout' means the engine gave up on it.
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "cancelled",
    "timeout": "cancelled",
}


def engine_dir_version(model_dir: Path) -> str:
    """`<dir name>-<sha256 of config.json>`: one name per checkpoint or engine build."""
    config = model_dir / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else "noconfig"
    return f"{model_dir.name}-{digest}"


class _TrtGeneration(Generation):
    def __init__(self, engine: TrtLlmEngine, prompt_token_ids: list[int], sampling: Sampling) -> None:
        self._engine = engine
        self._prompt_token_ids = prompt_token_ids
        self._sampling = sampling
        self._output: Any = None
        self._abort_requested = False
        self._completion_tokens = 0
        self._finish: FinishReason | None = None
        self._stop_sequence: str | None = None

    async def events(self) -> AsyncIterator[TokenEvent]:
        llm = self._engine._require_llm()
        params = self._engine._sampling_params(self._sampling)
        self._output = llm.generate_async(self._prompt_token_ids, params, streaming=True)
        if self._abort_requested:
            self._output.abort()
        matcher = StopMatcher(self._sampling.stop)
        emitted = 0
        async for output in self._output:
            completion = output.outputs[0]
            ids: list[int] = list(completion.token_ids_diff)
            self._completion_tokens += len(ids)
            text, matched = matcher.feed(completion.text_diff)
            if completion.finish_reason is not None:
                self._finish = _FINISH.get(completion.finish_reason, "cancelled")
                if isinstance(completion.stop_reason, str):
                    self._stop_sequence = completion.stop_reason
            if matched is not None:
                # The engine may not have matched it yet (split across tokens): stop it.
                self._stop_sequence = matched
                self._finish = "stop"
                if not output.finished:
                    output.abort()
            elif completion.finish_reason is not None:
                # The engine's final text is authoritative: it already cut a stop string off,
                # so text we held back as a possible stop start is dropped or released here.
                text = completion.text[emitted:]
            emitted += len(text)
            if text or ids:
                yield TokenEvent(text, ids[-1] if len(ids) == 1 else None, len(ids))
            if matched is not None:
                return

    def interrupt(self) -> None:
        self._abort_requested = True
        if self._output is not None and not self._output.finished:
            self._output.abort()

    def outcome(self, finished: bool) -> GenerationResult:
        finish: FinishReason = self._finish if finished and self._finish is not None else "cancelled"
        prompt_ids = self._output.prompt_token_ids if self._output is not None else self._prompt_token_ids
        cached = int(getattr(self._output, "cached_tokens", 0) or 0) if self._output is not None else 0
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            completion_tokens=self._completion_tokens,
            cached_tokens=cached,
            stop_sequence=self._stop_sequence if finish == "stop" else None,
        )


class TrtLlmEngine(TracksInFlight):
    """TensorRT-LLM LLM API behind the Engine interface; capacity is its max_batch_size."""

    kind: str = "trtllm"

    def __init__(self, settings: TrtllmSettings, context_tokens: int) -> None:
        self._settings = settings
        self.context_tokens = context_tokens
        self.model_dir = Path(settings.model_dir).expanduser()
        self.model_version = self.model_dir.name
        self._llm: Any = None
        self._sampling_params_cls: Any = None
        self._closed = False
        self._table = InFlight()

    async def start(self) -> None:
        """Import tensorrt_llm and load the engine in a thread (it takes minutes on a GPU)."""
        if self._llm is not None:
            return
        try:
            self._llm = await asyncio.to_thread(self._load)
        except Exception as exc:
            raise EngineLoadError(f"TensorRT-LLM could not load {str(self.model_dir)!r}: {exc}") from exc

    def _load(self) -> Any:
        try:
            trtllm = importlib.import_module("tensorrt_llm")
            llmapi = importlib.import_module("tensorrt_llm.llmapi")
        except ImportError as exc:
            raise RuntimeError(f"the tensorrt_llm package is not installed ({exc})") from exc
        s = self._settings
        kwargs: dict[str, Any] = {
            "max_batch_size": s.max_batch_size,
            "max_seq_len": self.context_tokens,
            "kv_cache_config": llmapi.KvCacheConfig(
                enable_block_reuse=s.enable_block_reuse,
                free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
            ),
        }
        if s.max_num_tokens is not None:
            kwargs["max_num_tokens"] = s.max_num_tokens
        if s.tensor_parallel_size != 1:
            kwargs["tensor_parallel_size"] = s.tensor_parallel_size
        llm = trtllm.LLM(
            model=str(self.model_dir),
            tokenizer=s.tokenizer_dir,
            **kwargs,
        )
        self._sampling_params_cls = trtllm.SamplingParams
        self.model_version = engine_dir_version(self.model_dir)
        return llm

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("engine is not started" if not self._closed else "engine is closed")
        return self._llm

    def _sampling_params(self, sampling: Sampling) -> Any:
        # temperature 0 means greedy: TensorRT-LLM's top_k=1.
        greedy = sampling.temperature == 0.0
        return self._sampling_params_cls(
            max_tokens=sampling.max_tokens,
            temperature=None if greedy else sampling.temperature,
            top_k=1 if greedy else None,
            top_p=None if greedy else sampling.top_p,
            stop=list(sampling.stop) or None,
        )

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt))

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt is already chat-templated (BOS included when the model wants it)."""
        ids: list[int] = self._require_llm().tokenizer.encode(prompt, add_special_tokens=False)
        return ids

    def stream(self, request_id: str, prompt: str, sampling: Sampling) -> GeneratedStream:
        if self._closed:
            raise RuntimeError("engine is closed")
        validate_sampling(sampling, self.context_tokens)
        ids = self.tokenize(prompt)
        check_prompt_fits(len(ids), sampling.max_tokens, self.context_tokens)
        return GeneratedStream(request_id, _TrtGeneration(self, ids, sampling), self._table)

    @property
    def capacity(self) -> int:
        return self._settings.max_batch_size

    async def health(self) -> Health:
        if self._closed:
            return Health(False, "closed")
        if self._llm is None:
            return Health(False, "not started")
        return Health(True, f"batch {self.in_flight}/{self.capacity}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.interrupt_all()
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
