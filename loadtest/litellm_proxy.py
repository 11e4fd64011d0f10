"""The peer gateway of bench-overhead: LiteLLM proxy from PyPI, in front of the same upstream.

LiteLLM pins versions that conflict with ours, so it lives in its own venv
(`.sluice/bench/litellm-venv`, made once, pip's cache reused). It runs with its
default settings and no database: one model entry (`openai/` provider, `api_base`
= the fixed-timing upstream), no master key, one worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from sluice.config import REPO_ROOT

LITELLM_VERSION = "1.80.0"
VENV = REPO_ROOT / ".sluice" / "bench" / "litellm-venv"


class LiteLLMError(RuntimeError):
    pass


def ensure_installed(venv: Path = VENV, version: str = LITELLM_VERSION) -> Path:
    """The `litellm` command of a venv holding exactly `version` with its proxy extra."""
    command = venv / "bin" / "litellm"
    marker = venv / f".litellm-{version}"
    if command.exists() and marker.exists():
        return command
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}"]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0:
        raise LiteLLMError(f"pip install litellm[proxy]=={version} failed:\n{done.stderr[-2000:]}")
    marker.touch()
    return command


def write_config(path: Path, *, model: str, upstream_v1: str, upstream_model: str) -> Path:
    """One model routed to the upstream; everything else is LiteLLM's default."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": upstream_v1,
                    "api_key": "bench-no-key",
                },
            }
        ]
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def run_litellm(
    *,
    upstream_v1: str,
    upstream_model: str,
    port: int,
    workdir: Path,
    model: str = "bench-upstream",
    ready_timeout_s: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start the proxy, wait until it serves, yield (its /v1 URL, the process), stop it."""
    command = ensure_installed()
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "litellm-config.yaml", model=model, upstream_v1=upstream_v1, upstream_model=upstream_model
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
    log = open(workdir / "litellm.log", "ab")  # noqa: SIM115 - kept open for the process's life
    proc = subprocess.Popen(
        [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=workdir,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, model, ready_timeout_s, workdir / "litellm.log")
        yield f"{base}/v1", proc
    finally:
        _stop(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen[bytes], base: str, model: str, timeout: float, log: Path) -> None:
    """Ready means /v1/models lists our model (the router has loaded the config)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LiteLLMError(f"litellm exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            listing = httpx.get(f"{base}/v1/models", timeout=2)
            if listing.status_code == 200 and model in listing.text:
                return
        time.sleep(0.5)
    raise LiteLLMError(f"litellm not ready after {timeout:.0f}s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
