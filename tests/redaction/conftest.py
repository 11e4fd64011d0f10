"""One real analyzer (spaCy + Presidio) per test module: loading it takes seconds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.redaction.analyzer import Redactor
from services.redaction.boundary import Boundary, boundary_from_settings
from sluice.config import Settings, load_settings


@pytest.fixture(scope="module")
def loaded_redactor() -> Iterator[Redactor]:
    yield Redactor()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(state_dir=tmp_path_factory.mktemp("redaction-state"))


@pytest.fixture(scope="module")
def boundary(settings: Settings, loaded_redactor: Redactor) -> Boundary:
    made = boundary_from_settings(settings)
    made.loaded(loaded_redactor)
    return made
