"""Fixtures for the deployment checks: the Go-built tools, and the chart rendered by helm.

helm, kubeconform and promtool are built once with `go install` (tools/go_tools.sh)
into a cache outside the checkout, so a fresh clone on the same machine reuses them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sluice.config import REPO_ROOT

CHART = REPO_ROOT / "helm" / "sluice"
VALUE_SETS = {"default": [], "production": [CHART / "values-production.yaml"]}
# helm built by `go install` carries no default cluster version (it assumes 1.20); say which.
KUBE_VERSION = "1.33.0"

Render = Callable[..., list[dict[str, Any]]]


def go_tool(name: str) -> Path:
    """The tool built (once) by tools/go_tools.sh into $SLUICE_GO_BIN or ~/.cache/sluice/bin."""
    bin_dir = Path(os.environ.get("SLUICE_GO_BIN") or Path.home() / ".cache" / "sluice" / "bin")
    done = subprocess.run(
        [str(REPO_ROOT / "tools" / "go_tools.sh"), str(bin_dir), name],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, f"building {name} failed:\n{done.stderr[-3000:]}"
    return bin_dir.resolve() / name


@pytest.fixture(scope="session")
def helm() -> Path:
    return go_tool("helm")


@pytest.fixture(scope="session")
def kubeconform() -> Path:
    return go_tool("kubeconform")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return go_tool("promtool")


@pytest.fixture(scope="session")
def k8s_schemas(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kubeconform schema location for KUBE_VERSION, offline.

    The JSON schemas come from PyPI package kubernetes-validate; their references
    point at "/api/_definitions.json", which is rewritten to the file beside them.
    """
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    root = tmp_path_factory.mktemp("k8s-schemas")
    for suffix in ("", "-strict"):
        src = source / f"v{KUBE_VERSION}-local{suffix}"
        dst = root / f"v{KUBE_VERSION}-standalone{suffix}"
        dst.mkdir()
        for schema in src.glob("*.json"):
            text = schema.read_text().replace(
                '"/api/_definitions.json', f'"{(dst / "_definitions.json").as_uri()}'
            )
            (dst / schema.name).write_text(text)
    version_dir = "{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
    return f"{root}/{version_dir}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`helm template` of the chart with the given values files and --set pairs, parsed (memoized)."""
    cache: dict[tuple[tuple[Path, ...], tuple[str, ...]], str] = {}

    def rendered(*values: Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        if (values, sets) not in cache:
            args: list[str | Path] = [helm, "template", "sluice", CHART, "--kube-version", KUBE_VERSION]
            for path in values:
                args += ["-f", path]
            for pair in sets:
                args += ["--set", pair]
            cache[values, sets] = run(*args).stdout
        return [doc for doc in yaml.safe_load_all(cache[values, sets]) if doc]

    return rendered


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
