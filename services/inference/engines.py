"""Builds the engine a catalog entry names (`engine: llamacpp | trtllm | openai`).

Only the chosen engine's module is imported, so a llama.cpp worker never needs
tensorrt_llm, and a missing setting fails here, at start, naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.inference.engine import Engine
from sluice.config import ConfigError, ModelSpec, Settings
from sluice.engine_specs import LlamaCppSettings
from sluice.models import resolve_model_path


def build_engine(model_name: str, spec: ModelSpec, settings: Settings) -> Engine:
    """A not-yet-started engine for `model_name`; the caller awaits `start()` (EngineLoadError)."""
    where = f"SLUICE_MODELS_FILE: models.{model_name}"
    if spec.engine == "llamacpp":
        from services.inference.llamacpp_engine import LlamaCppEngine

        local = spec.llamacpp or LlamaCppSettings()
        return LlamaCppEngine(
            _gguf(spec, where),
            n_ctx=spec.context_tokens,
            n_threads=local.threads if local.threads is not None else settings.inference_threads,
            slots=local.slots if local.slots is not None else settings.inference_slots,
            n_batch=local.n_batch,
        )
    if spec.engine == "trtllm":
        from services.inference.trtllm_engine import TrtLlmEngine

        assert spec.trtllm is not None  # ModelSpec refuses engine 'trtllm' without its section
        return TrtLlmEngine(spec.trtllm, context_tokens=spec.context_tokens)
    if spec.engine == "openai":
        from services.inference.openai_engine import OpenAIEngine

        remote = spec.openai
        assert remote is not None  # ModelSpec refuses engine 'openai' without its section
        api_key = None
        if remote.api_key_env is not None:
            api_key = os.environ.get(remote.api_key_env)
            if not api_key:
                raise ConfigError(
                    f"{where}.openai.api_key_env: environment variable {remote.api_key_env} is not set"
                )
        return OpenAIEngine(
            remote,
            model_name=model_name,
            context_tokens=spec.context_tokens,
            tokenizer_gguf=_gguf(spec, where),
            api_key=api_key,
        )
    raise ConfigError(f"{where}.engine: unknown engine {spec.engine!r}")  # pragma: no cover


def _gguf(spec: ModelSpec, where: str) -> Path:
    try:
        return resolve_model_path(spec.source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{where}.source: {exc}") from None
