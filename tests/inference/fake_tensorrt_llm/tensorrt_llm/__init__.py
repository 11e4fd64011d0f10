"""A FAKE `tensorrt_llm` package, for tests only.

tensorrt-llm cannot be installed here (PyPI holds only a stub pointing at
NVIDIA's index; wheels need CUDA and Python 3.10/3.12), so the Sluice adapter
(services/inference/trtllm_engine.py) is tested against this fake. It
reproduces only the public LLM API surface the adapter uses, with the same
names, shapes and streaming semantics as upstream NVIDIA/TensorRT-LLM:

* tensorrt_llm/llmapi/llm.py: `LLM(model, tokenizer=None, **kwargs)` (unknown
  kwargs raise ValueError), `generate_async(inputs, sampling_params,
  streaming=True)` returning a `RequestOutput` (prompt as str or token ids;
  prompt + max_tokens over max_seq_len raises ValueError before queueing),
  `llm.tokenizer`, `shutdown()`.
* tensorrt_llm/executor/result.py: `RequestOutput` is iterated with `async for`
  and yields itself after every engine response; `.outputs[0]` is a
  `CompletionOutput` whose `text` and `token_ids` are cumulative and whose
  `text_diff` / `token_ids_diff` are what the last response added;
  `finish_reason` is None until the final response, then 'stop' | 'length' |
  'cancelled'; `stop_reason` names the stop string; `prompt_token_ids`;
  `cached_tokens` (KV-cache block reuse); `abort()` asks the executor to cancel
  and the stream then ends with a final response whose finish_reason is
  'cancelled' (it does not end the iteration by itself).
* tensorrt_llm/sampling_params.py: `SamplingParams` (a kw-only dataclass).
* tensorrt_llm/llmapi/llm_utils.py: `KvCacheConfig`.

The "model" is deterministic: a byte-level tokenizer plus a small word
vocabulary, and an executor thread that runs in-flight batching iterations
(up to max_batch_size requests advance one token per iteration, others wait
in its queue) and hands responses to each request's asyncio queue with
`call_soon_threadsafe`, as upstream's AsyncQueue does.
"""

from tensorrt_llm.llmapi.llm import LLM, RequestOutput
from tensorrt_llm.sampling_params import SamplingParams

__version__ = "0.0.0+sluice.fake"
__all__ = ["LLM", "RequestOutput", "SamplingParams"]
