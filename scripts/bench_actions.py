"""The Human actions view over a large audit: the time to answer a page of it, first and deep.

On each database (SQLite, PostgreSQL, MariaDB/MySQL; one that cannot be reached is reported and
skipped), a throwaway database gets 10 studies of 100 trials, hitl-pruner's tables (installed
as a server installs them), and --rows audit rows written as the applier writes them: 40 users,
ends of running trials and relabels, about 1% undos. The tables are then ANALYZEd, as the
databases' own statistics would be after such growth. Then GET /hitl/api/actions?limit=100 is
called in process (the WSGI app, no HTTP) for the first page and for the deepest page
(``before=`` the cursor of the oldest 100 matching rows), without a filter and with each
filter, and the median of --repeat calls is printed, with that of the deepest page's query
alone (SqlStore.audit_page); and GET /hitl/api/actions.csv of every row.

    python scripts/bench_actions.py [--backends sqlite,postgresql,mysql] [--rows 100000]
        [--repeat 15]
"""

from __future__ import annotations

import argparse
import datetime
import io
from pathlib import Path
import statistics
import sys
import tempfile
import time
from typing import Any

from benchdb import BACKENDS
from benchdb import Unavailable
from benchdb import build_study
from benchdb import database
from benchdb import server_version
import optuna
import sqlalchemy as sa

from hitl_pruner import Settings
from hitl_pruner import create_app
from hitl_pruner.rdb import _audit_where
from hitl_pruner.rdb import audit_t
from hitl_pruner.store import AuditFilter

STUDIES = 10
TRIALS = 100
USERS = 40
BATCH = 5000


def fill(url: str, rows: int) -> dict[str, Any]:
    """Studies, our tables, and ``rows`` audit rows; returns what the filters should ask for."""
    studies = [build_study(url, f"bench-{i}", TRIALS, 0, note_every=0) for i in range(STUDIES)]
    app = create_app(Settings(storage_url=url), autostart=False)
    engine = app.applier.store.engine
    start = datetime.datetime(2024, 1, 1)
    with engine.begin() as conn:
        batch = []
        for i in range(rows):
            study = studies[i % STUDIES]
            number = (i // STUDIES) % TRIALS
            relabel = i % 10 == 3
            undo = i % 100 == 13
            batch.append({
                "created_at": start + datetime.timedelta(seconds=i),
                "study_id": study.study_id, "study_name": study.name,
                "trial_id": study.ids[number], "trial_number": number,
                "from_state": "FAIL" if undo else "COMPLETE" if relabel else "RUNNING",
                "to_state": "COMPLETE" if undo else "FAIL" if i % 3 == 0 else "PRUNED",
                "note_version": 1 + i // (STUDIES * TRIALS), "user_name": f"user-{i % USERS}",
                "source": "note-save", "retroactive": relabel or undo, "is_undo": undo,
                "how": "forced",
            })
            if len(batch) == BATCH:
                conn.execute(sa.insert(audit_t), batch)
                batch = []
        if batch:
            conn.execute(sa.insert(audit_t), batch)
    with engine.connect() as conn:
        dialect = conn.dialect.name
        conn.exec_driver_sql("ANALYZE" if dialect != "mysql" else "ANALYZE TABLE hitl_audit")
        conn.commit()
    return {"app": app, "study": studies[3].study_id}


def deep_cursor(app: Any, where: AuditFilter) -> int | None:
    """The ``before`` of the oldest page of 100 rows that match ``where``."""
    query = (sa.select(audit_t.c.id).where(*_audit_where(where)).order_by(audit_t.c.id)
             .offset(100).limit(1))
    with app.applier.store.engine.connect() as conn:
        return conn.execute(query).scalar()


def get(app: Any, path: str, query: str) -> tuple[int, bytes]:
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
    }
    body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    return int(status[0].split()[0]), body


def timed(app: Any, path: str, query: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        status, body = get(app, path, query)
        times.append(time.perf_counter() - began)
        assert status == 200, body[:300]
    return statistics.median(times) * 1000


def query_alone(app: Any, where: AuditFilter, before: int | None, repeat: int) -> float:
    """The deepest page's query (SqlStore.audit_page) without the rest of the request."""
    store = app.applier.store
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        store.audit_page(where, before=before, limit=100)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for backend in args.backends.split(","):
        try:
            version = server_version(backend)
        except Unavailable as exc:
            print(f"{backend}: skipped, {exc}")
            continue
        with tempfile.TemporaryDirectory() as tmp, database(backend, Path(tmp)) as url:
            began = time.perf_counter()
            made = fill(url, args.rows)
            app, study = made["app"], made["study"]
            print(f"\n{version}: {args.rows:,} audit rows "
                  f"(filled in {time.perf_counter() - began:.0f} s); median of {args.repeat}, "
                  "100 rows a page")
            print(f"  {'filter':<34} {'first page':>11} {'deepest page':>13} "
                  f"{'its query alone':>16}")
            cases = [
                ("none", "", AuditFilter()),
                ("study", f"study={study}", AuditFilter(study_id=study)),
                ("study + trial", f"study={study}&trial=7",
                 AuditFilter(study_id=study, trial_number=7)),
                ("user", "user=user-5", AuditFilter(user="user-5")),
                ("action=prune", "action=prune", AuditFilter(action="prune")),
                ("action=relabel", "action=relabel", AuditFilter(action="relabel")),
                ("action=undo (1%)", "action=undo", AuditFilter(action="undo")),
                ("study + user + action=fail", f"study={study}&user=user-3&action=fail",
                 AuditFilter(study_id=study, user="user-3", action="fail")),
            ]
            for name, query, where in cases:
                first = timed(app, "/hitl/api/actions", f"{query}&limit=100", args.repeat)
                cursor = deep_cursor(app, where)
                deep = "(one page)"
                if cursor is not None:
                    deep_query = f"{query}&limit=100&before={cursor}"
                    deep = f"{timed(app, '/hitl/api/actions', deep_query, args.repeat):.1f} ms"
                alone = query_alone(app, where, cursor, args.repeat)
                print(f"  {name:<34} {first:8.1f} ms {deep:>13} {alone:13.1f} ms")
            began = time.perf_counter()
            status, body = get(app, "/hitl/api/actions.csv", "")
            took = time.perf_counter() - began
            lines = body.count(b"\r\n") - 1
            print(f"  CSV of every row: {lines:,} rows, {len(body) / 1e6:.1f} MB in {took:.2f} s")
            app.applier.store.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
