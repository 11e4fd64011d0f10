"""Fake of tensorrt_llm/executor/result.py: CompletionOutput and the streamed result.

Mirrors upstream's `GenerationResultBase._handle_sequence` (tokens of a
response are appended; `_last_token_ids_len` / `_last_text_len` mark where the
diff starts) and `DetokenizedGenerationResultBase._handle_response` (text is
re-decoded; a stop string found in the text truncates it, sets
finish_reason='stop' and stop_reason, aborts the request and ends the result).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tensorrt_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tensorrt_llm.llmapi.llm import _Executor, _Tokenizer


class RequestError(RuntimeError):
    """Upstream raises this from the result when the executor reports a request error."""


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "timeout", "cancelled"] | None = None
    stop_reason: int | str | None = None
    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


@dataclass(slots=True)
class Response:
    """What the executor sends per iteration (upstream: tllm.Response.result)."""

    request_id: int
    output_token_ids: list[int]
    finish_reason: Literal["end_id", "length", "cancelled"] | None
    is_final: bool
    cached_tokens: int = 0
    error_msg: str | None = None


class GenerationResult:
    def __init__(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        executor: _Executor,
        tokenizer: _Tokenizer,
        streaming: bool,
    ) -> None:
        self.id = request_id
        self.sampling_params = sampling_params
        self.cached_tokens = 0
        self.decoding_iter = 0
        self._prompt_token_ids = prompt_token_ids
        self._executor = executor
        self._tokenizer = tokenizer
        self._streaming = streaming
        self._outputs = [CompletionOutput(0)]
        self._done = False
        self._aborted = False
        self.aqueue: asyncio.Queue[Response] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    # -- upstream public surface ------------------------------------------ #

    @property
    def request_id(self) -> int:
        return self.id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs[: self.sampling_params.n]

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self._executor.abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self) -> GenerationResult:
        return self

    async def __anext__(self) -> GenerationResult:
        if self._done:
            raise StopAsyncIteration
        self._handle_response(await self.aqueue.get())
        return self

    async def aresult(self) -> GenerationResult:
        while not self._done:
            self._handle_response(await self.aqueue.get())
        return self

    # -- executor side ------------------------------------------------------ #

    def _deliver(self, response: Response) -> None:
        """Called from the executor thread."""
        try:
            self._loop.call_soon_threadsafe(self.aqueue.put_nowait, response)
        except RuntimeError:  # the consumer's loop is gone
            self._executor.abort_request(self.request_id)

    def _handle_response(self, response: Response) -> None:
        if response.error_msg is not None:
            raise RequestError(response.error_msg)
        self._done = response.is_final
        self.cached_tokens = response.cached_tokens
        self.decoding_iter += 1
        output = self._outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(response.output_token_ids)
        if response.finish_reason == "cancelled":
            output.finish_reason = "cancelled"
        elif self._done:
            output.finish_reason = "stop" if response.finish_reason == "end_id" else "length"
        if not self.sampling_params.detokenize:
            return
        output._last_text_len = len(output.text)
        output.text = self._tokenizer.decode(output.token_ids)
        if not self._done or output.finish_reason in ("stop", "length"):
            for stop in self.sampling_params._stop_strings():
                if stop in output.text:
                    cut = output.text.find(stop)
                    if self.sampling_params.include_stop_str_in_output:
                        cut += len(stop)
                    output.text = output.text[:cut]
                    output.finish_reason = "stop"
                    output.stop_reason = stop
                    self.abort()
                    self._done = True
                    break
