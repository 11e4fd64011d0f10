"""Per-engine settings of a model catalog entry (`engine:` picks which section applies).

They live in the catalog (`SLUICE_MODELS_FILE`), next to the model they tune,
because two pools of one worker may run different engines. Every section
refuses unknown keys, so a typo stops the service at start with its name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EngineKind = Literal["llamacpp", "trtllm", "openai"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaCppSettings(_Section):
    """In-process llama.cpp; unset values fall back to SLUICE_INFERENCE_SLOTS / _THREADS."""

    slots: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)


class TrtllmSettings(_Section):
    """In-process TensorRT-LLM LLM API (`tensorrt_llm.LLM`)."""

    # A Hugging Face checkpoint directory or a built TensorRT engine directory.
    model_dir: str = Field(min_length=1)
    # Defaults to model_dir (TensorRT-LLM's own default).
    tokenizer_dir: str | None = None
    # The engine's in-flight batch limit; it is also the worker's capacity.
    max_batch_size: int = Field(default=64, ge=1)
    max_num_tokens: int | None = Field(default=None, ge=1)
    # Share of free GPU memory the KV cache may take.
    kv_cache_free_gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    # Reuse KV blocks of shared prompt prefixes (reported as cached tokens).
    enable_block_reuse: bool = True
    tensor_parallel_size: int = Field(default=1, ge=1)


class OpenAISettings(_Section):
    """A remote OpenAI-compatible server (trtllm-serve, vLLM, llama.cpp server)."""

    base_url: str
    # The server's model name; defaults to the catalog name.
    model: str | None = None
    # Name of the environment variable holding the API key (never the key itself).
    api_key_env: str | None = None
    # Requests this worker sends at once; it is also the worker's capacity.
    max_concurrency: int = Field(default=8, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for the next streamed chunk before the request fails.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # GET this for health (e.g. /health on trtllm-serve and vLLM).
    health_path: str = "/v1/models"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value
