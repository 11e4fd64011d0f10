"""Fake of KvCacheConfig (tensorrt_llm/llmapi/llm_args.py, re-exported by llm_utils)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float | None = None
    tokens_per_block: int = 32
