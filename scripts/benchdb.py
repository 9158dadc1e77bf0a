"""Throwaway databases for the benchmark scripts: an SQLite file, or a PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator
import uuid

import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "HITL_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


class Unavailable(Exception):
    pass


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """Yield the URL of a new, empty database, and drop it afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"hitl_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise Unavailable(str(exc.orig).strip().splitlines()[0]) from None
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
