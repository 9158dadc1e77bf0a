"""Opening the storage: races on a new database are retried, real failures are not."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from hitl_pruner import app as app_module
from hitl_pruner.config import ConfigError
from hitl_pruner.config import Settings


def test_a_worker_that_loses_the_table_creation_race_opens_the_storage(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: two gunicorn workers on a new SQLite file; one saw 'table studies already
    exists' from Optuna's create_all and stopped the whole server."""
    real = app_module.RDBStorage
    calls = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError(
                "CREATE TABLE studies", {}, Exception("table studies already exists")
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "RDBStorage", racing)
    storage = app_module.open_storage(Settings(storage_url=sqlite_url))
    assert len(calls) == 2 and storage.get_all_studies() == []


def test_an_unreachable_database_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = app_module.RDBStorage

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "RDBStorage", counting)
    with pytest.raises(ConfigError, match="Connection refused"):
        app_module.open_storage(Settings(storage_url="postgresql+psycopg2://u@127.0.0.1:1/x"))
    assert len(calls) == 1
