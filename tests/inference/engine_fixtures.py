"""Helpers shared by the engine tests: a real llama.cpp OpenAI server, the TensorRT-LLM fake.

Not a conftest on purpose: the fake `tensorrt_llm` goes on sys.path only for
the tests that ask for it, and is taken off again afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from sluice.ports import free_ports

FAKE_TRTLLM_ROOT = Path(__file__).resolve().parent / "fake_tensorrt_llm"
SERVED_MODEL = "smollm2-135m-instruct"


@contextlib.contextmanager
def fake_tensorrt_llm() -> Iterator[None]:
    """Make `import tensorrt_llm` find the fake (tests/inference/fake_tensorrt_llm) while inside."""
    sys.path.insert(0, str(FAKE_TRTLLM_ROOT))
    try:
        yield
    finally:
        sys.path.remove(str(FAKE_TRTLLM_ROOT))
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]


def trtllm_checkpoint(directory: Path, max_position_embeddings: int = 4096) -> Path:
    """A model directory as TensorRT-LLM expects one (the fake reads only config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": max_position_embeddings}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@contextlib.contextmanager
def llama_cpp_server(
    model_path: Path, n_ctx: int, log_path: Path, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free port serving `model_path`; yields its base URL.

    interrupt_requests is off: by default that server aborts a running stream
    whenever another request arrives, which would defeat concurrent requests.
    """
    (port,) = free_ports(1)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(model_path), "--model_alias", SERVED_MODEL,
                "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", str(n_ctx), "--n_threads", "1",
                "--interrupt_requests", "False",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its log is read by tests
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                # Any answer means the model is loaded (401 when started with --api_key).
                if httpx.get(f"{base_url}/v1/models", timeout=2).status_code < 500:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not come up within 180 s")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
