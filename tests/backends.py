"""Throwaway databases on real servers: SQLite files, PostgreSQL and MariaDB/MySQL databases.

Each call creates a database with a unique name and drops it afterwards. A server that cannot
be reached skips the test locally, and fails it when CI=true.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import os
from pathlib import Path
import shutil
from typing import Iterator
import uuid

import pytest
import sqlalchemy as sa

BACKENDS = ("sqlite", "postgresql", "mysql")
ADMIN_URLS = {
    "postgresql": os.environ.get(
        "HITL_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    ),
    "mysql": os.environ.get("HITL_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/"),
}


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, or Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def as_postgres(cmd: list[str]) -> list[str]:
    """The command as the postgres user when we are root: initdb and postgres refuse root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def unavailable(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required when CI=true", pytrace=False)
    pytest.skip(f"{what} is not available here")


class _Servers:
    """CREATE and DROP DATABASE for this test process, done ahead and behind by one thread.

    On PostgreSQL a CREATE DATABASE copies template1 and syncs it, and a DROP DATABASE waits
    for a checkpoint: together a second or more here, which a test would spend waiting on the
    disk. So the next database of a backend is created while the test before runs, and a
    database is dropped while the next test runs. Each is still new and empty when its test
    gets it, has a name of its own, and is given to one test only.
    """

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="databases")
        self._engines: dict[str, sa.Engine] = {}
        self._next: dict[str, concurrent.futures.Future[str]] = {}
        self._drops: list[concurrent.futures.Future[None]] = []

    def _engine(self, backend: str) -> sa.Engine:
        if backend not in self._engines:
            self._engines[backend] = sa.create_engine(
                ADMIN_URLS[backend], isolation_level="AUTOCOMMIT", pool_size=1
            )
        return self._engines[backend]

    def _create(self, backend: str) -> str:
        name = f"hitl_test_{uuid.uuid4().hex[:12]}"
        with self._engine(backend).connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
            if backend == "postgresql":
                # Commits stay atomic and at once visible to every session; only a crash of
                # the PostgreSQL server itself could lose the last ones, which no test does to
                # the shared server. Saves a WAL flush (~3 ms here, more under load) a commit.
                conn.exec_driver_sql(f"ALTER DATABASE {name} SET synchronous_commit = off")
        return name

    def _drop(self, backend: str, name: str) -> None:
        with self._engine(backend).connect() as conn:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")

    def take(self, backend: str) -> str:
        """The name of a new database; raises the server's OperationalError if it is away."""
        ahead = self._next.pop(backend, None)
        if ahead is not None and ahead.exception() is not None:
            ahead = None  # the server was away then: ask again now
        name = (ahead or self._thread.submit(self._create, backend)).result()
        self._next[backend] = self._thread.submit(self._create, backend)
        return name

    def give_back(self, backend: str, name: str) -> None:
        self._drops.append(self._thread.submit(self._drop, backend, name))

    def close(self) -> None:
        """Drop the databases made ahead, wait for every drop, and say if one failed."""
        for backend, ahead in self._next.items():
            if ahead.exception() is None:
                self.give_back(backend, ahead.result())
        self._next.clear()
        self._thread.shutdown(wait=True)
        for engine in self._engines.values():
            engine.dispose()
        for drop in self._drops:
            drop.result()


_servers = _Servers()


def drop_databases_left() -> None:
    """At the end of the session (conftest): the drops still running, and the spare databases."""
    _servers.close()


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a new, empty database of this backend, and drop it afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'optuna-{uuid.uuid4().hex[:8]}.db'}"
        return
    try:
        name = _servers.take(backend)
    except sa.exc.OperationalError as exc:
        unavailable(f"{backend} at {ADMIN_URLS[backend]} ({exc.orig})")
    try:
        yield sa.make_url(ADMIN_URLS[backend]).set(database=name).render_as_string(
            hide_password=False
        )
    finally:
        _servers.give_back(backend, name)
