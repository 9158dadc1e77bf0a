from __future__ import annotations

from pathlib import Path
from typing import Iterator

from backends import BACKENDS
from backends import database
from backends import drop_databases_left
import optuna
import pytest

optuna.logging.set_verbosity(optuna.logging.WARNING)


def pytest_sessionfinish(session: pytest.Session) -> None:
    drop_databases_left()


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on each backend: every test using it runs on all three."""
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with database("postgresql", tmp_path) as url:
        yield url
