from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from alembic.script import ScriptDirectory
from backends import BACKENDS
from backends import database
from backends import drop_databases_left
import optuna
from optuna.storages._rdb.storage import _VersionManager
import pytest

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Optuna reads its ~30 alembic migration scripts (about 45 ms of CPU) each time it asks for
# its schema's revisions: RDBStorage() for the head revision, and on a new database to stamp
# it; the dashboard's app for the list of all revisions. Once per server or worker process in
# real life, but thousands of times per test run here (each helper that reads a trial builds a
# storage, each in-process app is a new dashboard, and most tests start on a new database): a
# quarter of the in-process tests' CPU. The scripts are constants of the installed Optuna, and
# the object that reads them keeps what it read: build it once per test process. (An Optuna
# without this method fails here, loudly, rather than run slowly.)
_alembic_script = _VersionManager._create_alembic_script
_scripts: list[ScriptDirectory] = []


def _alembic_script_read_once(self: _VersionManager) -> ScriptDirectory:
    if not _scripts:
        _scripts.append(_alembic_script(self))
    return _scripts[0]


_VersionManager._create_alembic_script = _alembic_script_read_once  # type: ignore[method-assign]


def pytest_sessionfinish(session: pytest.Session) -> None:
    drop_databases_left()


# The tests that drive Chromium, by module, in CHROMIUM_LANES lanes of about equal time (from
# --durations on a 2-core machine); a module not named here takes the first lane. The
# 32-worker proxy test joins lane 1 by its own marker, to stay off test_browser_live's time.
CHROMIUM_LANES = 2
CHROMIUM_LANE = {
    "test_browser_live": 1,
    "test_browser_bulk": 1,
    "test_browser_actions": 1,
    "test_study_stop": 1,
    "test_cli": 1,
    "test_browser_nginx": 1,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist's --dist loadgroup (scripts/test.sh), the tests that drive Chromium
    run in two lanes, each in one worker, one test after the other: two Chromiums at a time
    instead of one per worker, each launched once per module, and the pages' "within a
    second" is not measured while three other Chromiums load the dashboard's bundle next to
    it. (pytest 9.2 with pytest-xdist 3.8 ignores these groups, pytest-dev/pytest-xdist#1386:
    pyproject.toml keeps pytest below 9.2.)"""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            lane = CHROMIUM_LANE.get(item.module.__name__ if item.module else "", 0)
            item.add_marker(pytest.mark.xdist_group(f"chromium-{lane % CHROMIUM_LANES}"))


@pytest.fixture(autouse=True)
def hitl_logger_restored() -> Iterator[None]:
    """cli.main() run in process sets up the "hitl_pruner" logger (logs.setup_logging: a handler
    on this test's captured stderr, no propagation). Put it back as it was: a later test in the
    same process (any, under xdist) must still see our log records (caplog, test_fuzz's ERROR
    handler), and nothing may write to a closed capture stream."""
    logger = logging.getLogger("hitl_pruner")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers, logger.level, logger.propagate = handlers, level, propagate


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
