"""Throwaway databases for the benchmark scripts (an SQLite file, a PostgreSQL or MariaDB/MySQL
database), and Optuna studies bulk-inserted into them with SQLAlchemy Core.

The admin URLs are the tests' (tests/backends.py): HITL_TEST_POSTGRES_URL, default
postgresql+psycopg2://postgres@127.0.0.1:5432/postgres, and HITL_TEST_MYSQL_URL, default
mysql+pymysql://root@127.0.0.1:3306/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from pathlib import Path
import sqlite3
from typing import Any
from typing import Iterator
import uuid

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "HITL_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get("HITL_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")
ADMIN_URLS = {"postgresql": PG_ADMIN_URL, "mysql": MYSQL_ADMIN_URL}
BACKENDS = ("sqlite", "postgresql", "mysql")

INSERT_BATCH = 5000

trials_t: sa.Table = models.TrialModel.__table__  # type: ignore[assignment]
values_t: sa.Table = models.TrialValueModel.__table__  # type: ignore[assignment]
params_t: sa.Table = models.TrialParamModel.__table__  # type: ignore[assignment]
attrs_t: sa.Table = models.StudySystemAttributeModel.__table__  # type: ignore[assignment]


class Unavailable(Exception):
    pass


def _admin(backend: str) -> sa.Engine:
    return sa.create_engine(ADMIN_URLS[backend], isolation_level="AUTOCOMMIT")


def _first_line(exc: sa.exc.DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0]


def admin_url(backend: str) -> str:
    """The admin URL of a server backend, password hidden (for messages)."""
    return sa.make_url(ADMIN_URLS[backend]).render_as_string(hide_password=True)


def server_version(backend: str) -> str:
    """"SQLite 3.x", "PostgreSQL 16.x", "MariaDB 10.x"...; Unavailable if it cannot be reached."""
    if backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    engine = _admin(backend)
    try:
        with engine.connect() as conn:
            if backend == "postgresql":
                return "PostgreSQL " + str(conn.exec_driver_sql("SHOW server_version").scalar())
            version = str(conn.exec_driver_sql("SELECT VERSION()").scalar())
            return ("MariaDB " if "mariadb" in version.lower() else "MySQL ") + version
    except sa.exc.OperationalError as exc:
        raise Unavailable(_first_line(exc)) from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """Yield the URL of a new, empty database, and drop it afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"hitl_bench_{uuid.uuid4().hex[:12]}"
    admin = _admin(backend)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise Unavailable(_first_line(exc)) from None
    try:
        yield sa.make_url(ADMIN_URLS[backend]).set(database=name).render_as_string(
            hide_password=False
        )
    finally:
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


# --- studies ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Study:
    study_id: int
    name: str
    ids: list[int]  # trial ids by number
    running: list[int]  # the RUNNING ones (the last trials), in order
    complete: list[int]  # the COMPLETE ones, in order
    noted: set[int]  # the trials that have a (command-free) note, at version 1


def _batched(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), INSERT_BATCH):
        yield rows[start : start + INSERT_BATCH]


def build_study(
    url: str,
    name: str,
    n_trials: int,
    n_running: int,
    *,
    note_every: int = 10,
    note_running: bool = False,
) -> Study:
    """A study of n_trials with a float parameter each: the last n_running RUNNING, the others
    COMPLETE with a value. A plain (command-free) note on every note_every-th trial (0: none),
    and on every RUNNING one if note_running. Optuna's schema is created here; hitl-pruner's
    tables and triggers are not (a server or create_app installs them and queues these notes).
    """
    storage = RDBStorage(url)
    study_id = optuna.create_study(study_name=name, storage=storage)._study_id
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    first_running = n_trials - n_running
    dist = json.dumps({"name": "FloatDistribution",
                       "attributes": {"low": 0.0, "high": 1.0, "log": False, "step": None}})
    with storage.engine.begin() as conn:
        for chunk in _batched([
            {
                "number": i,
                "study_id": study_id,
                "state": TrialState.COMPLETE if i < first_running else TrialState.RUNNING,
                "datetime_start": now,
                "datetime_complete": now if i < first_running else None,
            }
            for i in range(n_trials)
        ]):
            conn.execute(sa.insert(trials_t), chunk)
        ids = list(
            conn.execute(
                sa.select(trials_t.c.trial_id)
                .where(trials_t.c.study_id == study_id)
                .order_by(trials_t.c.number)
            ).scalars()
        )
        for chunk in _batched([
            {"trial_id": tid, "param_name": "x", "param_value": (i % 97) / 97,
             "distribution_json": dist}
            for i, tid in enumerate(ids)
        ]):
            conn.execute(sa.insert(params_t), chunk)
        finite = models.TrialValueModel.TrialValueType.FINITE
        for chunk in _batched([
            {"trial_id": tid, "objective": 0, "value": i / n_trials, "value_type": finite}
            for i, tid in enumerate(ids[:first_running])
        ]):
            conn.execute(sa.insert(values_t), chunk)
        noted = {
            tid
            for i, tid in enumerate(ids)
            if (note_every and i % note_every == 0) or (note_running and i >= first_running)
        }
        for chunk in _batched([
            row
            for i, tid in enumerate(ids)
            if tid in noted
            for row in (
                {"study_id": study_id, "key": f"dashboard:{tid}:note_ver", "value_json": "1"},
                {
                    "study_id": study_id,
                    "key": f"dashboard:{tid}:note_str:0",
                    "value_json": json.dumps(f"Trial #{i}: loss plateaued, lr looks fine."),
                },
            )
        ]):
            conn.execute(sa.insert(attrs_t), chunk)
    storage.engine.dispose()
    return Study(study_id, name, ids, ids[first_running:], ids[:first_running], noted)


def write_notes(engine: sa.Engine, study_id: int, notes: dict[int, tuple[int, str]]) -> None:
    """Write notes {trial_id: (version, body)} the way the dashboard stores them (bodies of up
    to 2045 characters: one chunk), in one transaction."""
    with engine.begin() as conn:
        existing = set(
            conn.execute(
                sa.select(attrs_t.c.key)
                .where(attrs_t.c.study_id == study_id)
                .where(attrs_t.c.key.in_([f"dashboard:{tid}:note_ver" for tid in notes]))
            ).scalars()
        )
        new: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        for tid, (version, body) in notes.items():
            ver_key = f"dashboard:{tid}:note_ver"
            rows = old if ver_key in existing else new
            rows.append({"study_id": study_id, "key": ver_key, "value_json": json.dumps(version)})
            rows.append({
                "study_id": study_id,
                "key": f"dashboard:{tid}:note_str:0",
                "value_json": json.dumps(body),
            })
        for chunk in _batched(new):
            conn.execute(sa.insert(attrs_t), chunk)
        if old:
            conn.execute(
                sa.update(attrs_t)
                .where(attrs_t.c.study_id == sa.bindparam("b_study"))
                .where(attrs_t.c.key == sa.bindparam("b_key"))
                .values(value_json=sa.bindparam("b_value")),
                [{"b_study": r["study_id"], "b_key": r["key"], "b_value": r["value_json"]}
                 for r in old],
            )
