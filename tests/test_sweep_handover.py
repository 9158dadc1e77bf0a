"""Several workers and servers on one database: one sweep at a time, handed over on a kill;
and ``GET /healthz``.

The process tests run ``gunicorn -w 4 wsgi:app`` and two ``python -m hitl_pruner serve``
instances on PostgreSQL, MariaDB and an SQLite file (tests/processes.py), sweeping every 0.5 s.
"""

from __future__ import annotations

import os
from pathlib import Path
import re
import signal
import time
from typing import Any
from typing import Iterator

from backends import ADMIN_URLS
from backends import database
from helpers import app_for
from helpers import call
from helpers import make_study
import optuna
from optuna_dashboard import save_note
from processes import Server
from processes import gunicorn_server
from processes import serve_server
from processes import wait_for
import pytest
import sqlalchemy as sa

from hitl_pruner import create_app
from hitl_pruner.config import Settings

INTERVAL = 0.5
# A handover takes at most one interval; the rest is for process and database latency.
HANDOVER_SLACK = 5.0
NOW_SWEEPING = re.compile(r"\[(\d+)\] \[hitl\] INFO this process now runs the sweep")
CHANGED = re.compile(r"\[hitl\] INFO changed study '[^']*' trial #\d+ \(id (\d+)\).* via (\S+)$",
                     re.MULTILINE)
BOOTED = re.compile(r"Booting worker with pid: (\d+)")


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def note_by_script(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def audit_rows(url: str, trial_id: int) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(
                sa.text("SELECT to_state, source FROM hitl_audit WHERE trial_id = :t"),
                {"t": trial_id},
            ))
    finally:
        engine.dispose()


def state_of(study: optuna.Study, trial_id: int) -> str:
    return study._storage.get_trial(trial_id).state.name


def healthz(server: Server) -> dict[str, Any] | None:
    try:
        reply = server.get("/healthz", timeout=5)
    except Exception:
        return None
    return reply.json if reply.status == 200 else None


@pytest.mark.e2e
def test_four_gunicorn_workers_sweep_in_one_process_and_apply_a_note_once(
    shared_url: str, tmp_path: Path
) -> None:
    """Of `gunicorn -w 4`, one worker sweeps; a script's note is applied once (one audit row)."""
    study, ids = make_study(shared_url)
    with gunicorn_server(shared_url, tmp_path, args=["-w", "4"], interval=INTERVAL) as server:
        wait_for(lambda: len(BOOTED.findall(server.output)) >= 4 and NOW_SWEEPING.search(
            server.output), what="4 workers and a sweeping one", servers=[server])
        note_by_script(study, ids["running"], "PRUNE")
        wait_for(lambda: state_of(study, ids["running"]) == "PRUNED",
                 what="the sweep to prune the trial", servers=[server])
        time.sleep(5 * INTERVAL)  # more sweeps by every worker that might sweep
        output = server.output
    assert audit_rows(shared_url, ids["running"]) == [("PRUNED", "sweep")]
    assert [m[0] for m in CHANGED.findall(output)] == [str(ids["running"])]
    assert len(NOW_SWEEPING.findall(output)) == 1, output
    assert len(set(BOOTED.findall(output))) == 4


@pytest.mark.e2e
def test_killing_the_sweeping_server_hands_the_sweep_to_the_other(
    shared_url: str, tmp_path: Path
) -> None:
    """Two servers on one database: one sweeps; after kill -9 the other does within ~1 interval."""
    study, ids = make_study(shared_url)
    with serve_server(shared_url, tmp_path, interval=INTERVAL) as first, \
            serve_server(shared_url, tmp_path, interval=INTERVAL) as second:
        servers = [first, second]

        def reports() -> list[dict[str, Any]] | None:
            found = [healthz(s) for s in servers]
            if None in found or not any(r["sweep"]["active"] for r in found):  # type: ignore[index]
                return None
            return found  # type: ignore[return-value]

        found = wait_for(reports, what="a sweeping server", servers=servers)
        for _ in range(3):
            assert [r["sweep"]["active"] for r in found].count(True) == 1, found
            assert all(r["status"] == "ok" and r["sweep"]["alive"] for r in found)
            time.sleep(INTERVAL)
            found = wait_for(reports, what="both servers' health", servers=servers)
        (sweeping,) = [s for s, r in zip(servers, found) if r["sweep"]["active"]]
        (other,) = [s for s in servers if s is not sweeping]

        os.killpg(sweeping.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        taken = wait_for(lambda: (r := healthz(other)) and r["sweep"]["active"],
                         timeout=INTERVAL + HANDOVER_SLACK, what="the other server to sweep",
                         servers=[other], interval=0.05)
        took = time.monotonic() - killed_at
        assert taken and took < INTERVAL + HANDOVER_SLACK
        assert NOW_SWEEPING.search(other.output)

        note_by_script(study, ids["running"], "FAIL")
        wait_for(lambda: state_of(study, ids["running"]) == "FAIL",
                 what="the new sweeper to apply the note", servers=[other])
    assert audit_rows(shared_url, ids["running"]) == [("FAIL", "sweep")]


# -- /healthz in process ------------------------------------------------------------------------


def test_healthz_reports_the_database_and_the_sweep(sqlite_url: str) -> None:
    app = create_app(Settings(storage_url=sqlite_url, interval=0.05))
    try:
        reply = call(app, "GET", "/healthz")  # the first request starts the sweep
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.headers["Cache-Control"] == "no-store"
        body = reply.json()
        assert body["status"] == "ok" and body["database"] == "ok"
        assert body["sweep"]["alive"] is True
        wait_for(lambda: call(app, "GET", "/healthz").json()["sweep"]["active"],
                 what="the sweep to take its lock")
        body = wait_for(lambda: (b := call(app, "GET", "/healthz").json())["sweep"][
            "seconds_since_last_run"] is not None and b, what="a first sweep")
        assert 0 <= body["sweep"]["seconds_since_last_run"] < 5
        assert set(body) == {"status", "database", "sweep"}
        assert set(body["sweep"]) == {"alive", "active", "seconds_since_last_run", "failures"}
        assert "sqlite" not in reply.body.decode() and "optuna" not in reply.body.decode()
        head = call(app, "HEAD", "/healthz")
        assert head.status == 200 and head.body == b""
    finally:
        app.stop_background()


def test_healthz_is_503_when_the_sweep_thread_is_not_running(sqlite_url: str) -> None:
    app = app_for(sqlite_url)  # autostart off: no sweep thread in this process
    reply = call(app, "GET", "/healthz")
    assert reply.status == 503
    assert reply.json() == {
        "status": "unavailable", "database": "ok",
        "sweep": {"alive": False, "active": False, "seconds_since_last_run": None,
                  "failures": 0},
    }


def test_healthz_is_503_when_the_database_is_gone(postgres_url: str) -> None:
    """A dropped PostgreSQL database: 503, and nothing about the URL in the answer."""
    app = create_app(Settings(storage_url=postgres_url, interval=0.2))
    try:
        assert call(app, "GET", "/healthz").status == 200
        name = sa.make_url(postgres_url).database
        admin = sa.create_engine(ADMIN_URLS["postgresql"], isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()
        for _ in range(2):  # the pooled connection that died, then a new one refused
            reply = call(app, "GET", "/healthz")
            assert reply.status == 503
            body = reply.json()
            assert body["status"] == "unavailable" and body["database"] == "unreachable"
            assert body["sweep"]["alive"] is True  # it backs off, and never stops
            assert name not in reply.body.decode() and "127.0.0.1" not in reply.body.decode()
    finally:
        app.stop_background()


def test_healthz_on_a_journal_file_and_one_sweep_per_journal(tmp_path: Path) -> None:
    """A journal file has no database lock: a file lock next to it lets one process sweep."""
    url = str(tmp_path / "journal.log")
    optuna.create_study(storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(url)))
    apps = [create_app(Settings(storage_url=url, interval=0.05)) for _ in range(2)]
    try:
        replies = [call(app, "GET", "/healthz") for app in apps]
        assert [r.status for r in replies] == [200, 200]
        wait_for(lambda: any(call(a, "GET", "/healthz").json()["sweep"]["active"] for a in apps),
                 what="a sweep to take the journal's lock")
        time.sleep(0.3)
        active = [call(a, "GET", "/healthz").json()["sweep"]["active"] for a in apps]
        assert active.count(True) == 1
        assert Path(url + ".hitl-sweep.lock").exists()
    finally:
        for app in apps:
            app.stop_background()
