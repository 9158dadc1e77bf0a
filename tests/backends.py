"""Throwaway databases on real servers: SQLite files, PostgreSQL and MariaDB/MySQL databases.

Each call creates a database with a unique name and drops it afterwards. A server that cannot
be reached skips the test locally, and fails it when CI=true.
"""

from __future__ import annotations

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


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a new, empty database of this backend, and drop it afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'optuna-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"hitl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URLS[backend], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
            if backend == "postgresql":
                # Commits stay atomic and at once visible to every session; only a crash of the
                # PostgreSQL server itself could lose the last ones, which no test does to the
                # shared server. Saves a WAL flush (~3 ms here, more under load) per commit.
                conn.exec_driver_sql(f"ALTER DATABASE {name} SET synchronous_commit = off")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        unavailable(f"{backend} at {ADMIN_URLS[backend]} ({exc.orig})")
    try:
        yield sa.make_url(ADMIN_URLS[backend]).set(database=name).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()
