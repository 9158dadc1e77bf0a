"""Database outages: clear JSON 503 answers, one log line each way, and the queue applied within
one interval of the database answering again.

The end-to-end test starts a PostgreSQL of its own (initdb and pg_ctl on a free loopback port,
run as the ``postgres`` user when the tests run as root), serves it with ``python -m hitl_pruner
serve --interval 1``, and stops the database for about 30 s. Without PostgreSQL's binaries it
skips, and fails when CI=true. The other tests call the WSGI app and the sweep in process, on
real databases (a dropped PostgreSQL database is one that does not answer).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from typing import Any
from typing import Iterator

from backends import ADMIN_URLS
from backends import as_postgres
from backends import pg_bin
from backends import unavailable as service_unavailable
from helpers import app_for
from helpers import call
from helpers import make_study
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_dashboard import save_note
from processes import Server
from processes import free_port
from processes import serve_server
from processes import wait_for
import pytest
import sqlalchemy as sa

from hitl_pruner import lock
from hitl_pruner import outage
from hitl_pruner.sweep import Sweeper

OUTAGE_LOGGER = "hitl_pruner.outage"
DOWN_LINE = re.compile(r"\[hitl\] WARNING database unavailable \(", re.MULTILINE)
BACK_LINE = re.compile(r"\[hitl\] INFO database back after [\d.]+ s$", re.MULTILINE)


def note_by_script(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def refused_error() -> sa.exc.OperationalError:
    """What PostgreSQL's driver raises when nothing listens: a real connection refused."""
    engine = sa.create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/postgres")
    try:
        with pytest.raises(sa.exc.OperationalError) as raised:
            engine.connect().close()
        return raised.value
    finally:
        engine.dispose()


def assert_503(reply: Any, what: str) -> None:
    status = getattr(reply, "status", None)
    assert status == 503, f"{what}: {reply!r}"
    headers = {k.lower(): v for k, v in dict(reply.headers).items()}
    assert headers.get("content-type") == "application/json", f"{what}: {headers}"
    assert headers.get("retry-after", "").isdigit(), f"{what}: {headers}"
    body = reply.json() if callable(reply.json) else reply.json
    assert "database is unavailable" in body["reason"], f"{what}: {body}"


# -- telling an outage from a bug ------------------------------------------------------------


def test_unavailable_tells_an_outage_from_a_bug(tmp_path: Path) -> None:
    """Only errors meaning "the database cannot be reached" are outages (503); a bad query,
    a missing table, a deadlock-free bug stay 500s."""
    assert outage.unavailable(refused_error())

    mysql = sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{free_port()}/")
    with pytest.raises(sa.exc.OperationalError) as raised:
        mysql.connect().close()
    mysql.dispose()
    assert outage.unavailable(raised.value)

    db = tmp_path / "x.db"
    engine = sa.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.OperationalError) as raised:
            conn.exec_driver_sql("SELECT * FROM no_such_table")
        assert not outage.unavailable(raised.value)
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.commit()
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with engine.connect() as conn, pytest.raises(sa.exc.OperationalError) as raised:
                conn.exec_driver_sql("SELECT * FROM t")
            assert "locked" in str(raised.value)
            assert outage.unavailable(raised.value)
        finally:
            holder.close()
    finally:
        engine.dispose()

    admin = sa.create_engine(ADMIN_URLS["postgresql"])
    try:
        try:
            conn = admin.connect()
        except sa.exc.OperationalError as exc:
            service_unavailable(f"postgresql at {ADMIN_URLS['postgresql']} ({exc.orig})")
        with conn, pytest.raises(sa.exc.ProgrammingError) as bad:
            conn.exec_driver_sql("SELECT * FROM hitl_no_such_table")
        assert not outage.unavailable(bad.value)
        # A pooled connection that the server ended: invalidated, an outage, and stale.
        with admin.connect() as victim:
            pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with admin.connect() as killer:
                killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            with pytest.raises(sa.exc.DBAPIError) as killed:
                victim.exec_driver_sql("SELECT 1")
        assert outage.unavailable(killed.value) and outage.stale(killed.value)
    finally:
        admin.dispose()

    # Optuna's storage wraps SQLAlchemy's errors: the cause decides.
    try:
        try:
            raise refused_error()
        except sa.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("commit failed") from exc
    except optuna.exceptions.StorageInternalError as wrapped:
        assert outage.unavailable(wrapped)
    assert not outage.unavailable(RuntimeError("a bug"))


# -- the WSGI layer, in process --------------------------------------------------------------


def test_requests_during_an_outage_get_a_json_503_and_the_log_one_line(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A note save, the Fail button, our API and the dashboard's answer a JSON 503 with
    Retry-After while the database does not answer (not gunicorn's or bottle's HTML 500); our
    static files still load; the log says so once, without a traceback."""
    study, ids = make_study(postgres_url)
    app = app_for(postgres_url, interval=2.5)
    sid = study._study_id
    name = sa.make_url(postgres_url).database
    admin = sa.create_engine(ADMIN_URLS["postgresql"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin.dispose()
    with caplog.at_level(logging.INFO):
        # First the dashboard's own route: it catches the error itself and answers 500; a
        # ping tells why.
        first = call(app, "GET", f"/api/studies/{sid}")
        assert_503(first, "the dashboard's study detail")
        assert first.headers["Retry-After"] == "3"
        replies = {
            "note save": call(app, "PUT", f"/api/studies/{sid}/{ids['running']}/note",
                              {"version": 1, "body": "PRUNE"}),
            "Fail button": call(app, "POST", f"/api/trials/{ids['running2']}/tell",
                                {"state": "Fail"}),
            "actions": call(app, "GET", "/hitl/api/actions"),
            "trial": call(app, "GET", f"/hitl/api/studies/{sid}/{ids['running']}"),
            "undo": call(app, "POST", "/hitl/api/actions/1/undo", {}),
            "studies": call(app, "GET", "/api/studies"),
            # The dashboard's page reads the schema version on every load (bottle's HTML 500).
            "dashboard page": call(app, "GET", "/dashboard"),
        }
        for what, reply in replies.items():
            assert_503(reply, what)
        health = call(app, "GET", "/healthz")
        assert health.status == 503 and health.json()["database"] == "unreachable"
        assert call(app, "GET", "/hitl/static/hitl.js").status == 200
        assert call(app, "GET", "/hitl/actions").status == 200
    ours = [r for r in caplog.records if r.name.startswith("hitl_pruner")]
    downs = [r for r in ours if r.getMessage().startswith("database unavailable")]
    assert len(downs) == 1, caplog.text
    assert not [r for r in ours if r.exc_info], caplog.text


def test_a_bug_is_still_a_logged_json_500(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not an outage is not dressed up as one: 500, JSON, traceback logged."""
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in our code")

    app.store.trials = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        reply = call(app, "PUT", f"/api/studies/{study._study_id}/{ids['running']}/note",
                     {"version": 1, "body": "PRUNE"})
    assert reply.status == 500, reply
    assert reply.json() == {"reason": "internal server error"}
    assert "Retry-After" not in reply.headers
    assert any(r.exc_info and "a bug in our code" in str(r.exc_info[1]) for r in caplog.records)


def test_a_bug_behind_the_fail_button_is_a_500_not_a_503(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the Fail button answered every error with 503 "the database did not
    answer", bugs included."""
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in our code")

    app.applier.command = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        reply = call(app, "POST", f"/api/trials/{ids['running']}/tell", {"state": "Fail"})
    assert reply.status == 500 and reply.json() == {"reason": "internal server error"}, reply
    assert any(r.exc_info for r in caplog.records)
    assert RDBStorage(sqlite_url).get_trial(ids["running"]).state is TrialState.RUNNING


def test_a_late_500_is_passed_on_when_the_database_answers(sqlite_url: str) -> None:
    """The dashboard's own 500 stays a 500 when a ping shows the database is fine."""

    def dashboard_bug(environ: Any, start_response: Any) -> list[bytes]:
        start_response("500 Internal Server Error", [("Content-Type", "application/json")])
        return [b'{"reason": "internal server error"}']

    engine = sa.create_engine(sqlite_url)
    try:
        def ping() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")

        layer = outage.OutageMiddleware(
            dashboard_bug, state=outage.DatabaseState(), ping=ping, retry_after=10
        )
        reply = call(layer, "GET", "/api/studies")
        assert reply.status == 500 and reply.json() == {"reason": "internal server error"}
    finally:
        engine.dispose()


# -- the sweep's cadence ---------------------------------------------------------------------


class _Ticks(threading.Event):
    """The sweep's stop event: records every pause the loop asks for instead of waiting."""

    def __init__(self, on_tick: Any) -> None:
        super().__init__()
        self.delays: list[float] = []
        self.on_tick = on_tick

    def wait(self, timeout: float | None = None) -> bool:
        self.delays.append(float(timeout or 0.0))
        return bool(self.on_tick(len(self.delays)))


def test_the_sweep_retries_every_interval_in_an_outage_and_sweeps_when_it_answers(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: after an outage the sweep backed off up to 300 s, so queued commands waited
    long after the database was back. It now tries every interval and applies the queue in the
    round the database answers again; the outage is logged once each way, no traceback."""
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url, interval=7.0)
    note_by_script(study, ids["running"], "PRUNE")
    refused = refused_error()
    down = {"now": True}
    engine = sa.create_engine(sqlite_url)
    real_pending = app.store.pending

    def pending(*args: object, **kwargs: object) -> object:
        if down["now"]:
            raise refused
        return real_pending(*args, **kwargs)

    def ping() -> None:
        if down["now"]:
            raise refused
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    app.store.pending = pending  # type: ignore[method-assign]
    sweeper = Sweeper(app.applier, app.store, interval=7.0, lock=None, ping=ping)
    states: dict[int, TrialState] = {}

    def on_tick(n: int) -> bool:
        states[n] = RDBStorage(sqlite_url).get_trial(ids["running"]).state
        if n == 6:
            down["now"] = False  # the database answers again during this pause
        return n >= 7

    sweeper._stop = _Ticks(on_tick)  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.INFO, logger="hitl_pruner"):
            sweeper._loop()
    finally:
        engine.dispose()
    assert sweeper._stop.delays == [0.0] + [7.0] * 6  # type: ignore[attr-defined]
    assert states[6] is TrialState.RUNNING
    # Swept in the very round after the pause in which the database came back.
    assert states[7] is TrialState.PRUNED
    assert sweeper.failures == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("database unavailable") for m in messages) == 1, messages
    assert sum(m.startswith("database back after") for m in messages) == 1, messages
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_a_quick_restart_is_not_an_outage(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every connection to the database ended between two rounds (a quick restart): /healthz
    still says ok (a pooled connection that died is dropped and the ping goes again), nothing
    is logged as an outage, and the next sweep round takes the lock again and sweeps."""
    study, ids = make_study(postgres_url)
    app = app_for(postgres_url, interval=7.0)
    sweeper = app.sweeper
    try:
        assert call(app, "GET", "/healthz").status == 503  # the sweep thread is not running
        sweeper._round()
        assert sweeper.lock.held
        admin = sa.create_engine(ADMIN_URLS["postgresql"], isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                killed = conn.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db"
                ), {"db": sa.make_url(postgres_url).database}).scalar()
        finally:
            admin.dispose()
        assert killed and killed >= 2  # the pooled one and the lock's
        with caplog.at_level(logging.INFO, logger="hitl_pruner"):
            health = call(app, "GET", "/healthz").json()
            assert health["database"] == "ok", health
            # The test's own connections were ended too: a script on a new one writes the note.
            fresh = optuna.load_study(study_name=study.study_name,
                                      storage=RDBStorage(postgres_url))
            note_by_script(fresh, ids["running"], "PRUNE")
            sweeper._round()
        assert RDBStorage(postgres_url).get_trial(ids["running"]).state is TrialState.PRUNED
        assert not sweeper.state.down
        assert "database unavailable" not in caplog.text
    finally:
        if sweeper.lock.held:
            sweeper.lock.release()


# -- the sweep lock after a restart ----------------------------------------------------------


def test_a_waiting_process_takes_the_lock_at_once_when_its_connection_died(
    postgres_url: str,
) -> None:
    """Regression: the connection a waiting process keeps for the lock dies with a database
    restart; its next try failed and cost another interval. It now reconnects in that try."""
    holder_engine, waiter_engine = sa.create_engine(postgres_url), sa.create_engine(postgres_url)
    holder, waiter = lock.PostgresLock(holder_engine), lock.PostgresLock(waiter_engine)
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        assert holder.try_acquire() and not waiter.try_acquire()
        holder.release()
        with admin.connect() as conn:
            # The waiter's own connection is the one whose lock request is still pending.
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))
        assert waiter.try_acquire()
        assert waiter.check()
    finally:
        waiter.release()
        holder.release()
        for engine in (holder_engine, waiter_engine, admin):
            engine.dispose()


# -- end to end: a PostgreSQL of our own, stopped for 30 s ------------------------------------


class OwnPostgres:
    """A PostgreSQL server of the test's own, which the test may stop and start."""

    def __init__(self, pg_ctl: str, directory: Path, port: int) -> None:
        self.pg_ctl = pg_ctl
        self.directory = directory
        self.data = directory / "data"
        self.port = port
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def _ctl(self, *args: str) -> None:
        result = subprocess.run(
            as_postgres([self.pg_ctl, "-D", str(self.data), *args]),
            cwd=self.directory, capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            log = (self.directory / "postgres.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"pg_ctl {' '.join(args)}: {result.stdout}{result.stderr}\n{log}",
                        pytrace=False)

    def start(self) -> None:
        # -w: returns once the server accepts connections.
        self._ctl("-l", str(self.directory / "postgres.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "60", "stop")


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        service_unavailable("PostgreSQL's initdb and pg_ctl")
    assert initdb is not None and pg_ctl is not None
    # Not under tmp_path: the postgres user must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="hitl-outage-"))
    server: OwnPostgres | None = None
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
        directory.chmod(0o755)
        result = subprocess.run(
            as_postgres([initdb, "-D", str(directory / "data"), "-U", "postgres",
                          "--auth=trust", "--no-sync"]),
            cwd=directory, capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            pytest.fail(f"initdb failed: {result.stdout}{result.stderr}", pytrace=False)
        for attempt in range(3):
            port = free_port()
            with open(directory / "data" / "postgresql.conf", "a") as conf:  # the last port wins
                conf.write(
                    f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{directory}'\nfsync = off\n"
                )
            server = OwnPostgres(pg_ctl, directory, port)
            try:
                server.start()
                break
            except pytest.fail.Exception:
                # Another test's server took the port between free_port() and the bind.
                log = (directory / "postgres.log").read_text(errors="replace")
                if "Address already in use" not in log or attempt == 2:
                    raise
                (directory / "postgres.log").unlink()
        yield server
    finally:
        if server is not None:
            # Whatever state it is in; never the shared server on 5432.
            subprocess.run(as_postgres([pg_ctl, "-D", str(directory / "data"), "-m",
                                         "immediate", "stop"]),
                           cwd=directory, capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


INTERVAL = 1.0
# The queue must be applied within one interval of the database answering again; this much
# more is for process and connection latency on a loaded machine.
RECOVERY_SLACK = 2.0
# The outage. It is counted from the sweep's first failed round, plus one second:
# the old exponential back-off (2, 4, 8, 16 s: a round 30 s after the first failure) then
# misses the recovery by construction instead of by luck.
OUTAGE = 31.0


@contextlib.contextmanager
def _sweep_lock_held_by_another(url: str) -> Iterator[None]:
    """Take the sweep lock, as another server that sweeps would: our server only waits."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    conn = engine.connect()
    try:
        assert conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock.PG_KEY}).scalar()
        yield
    finally:
        with contextlib.suppress(sa.exc.DBAPIError):
            conn.close()  # the outage ended this connection, and the lock with it
        engine.dispose()


def _all_pruned(engine: sa.Engine, trial_ids: list[int]) -> bool:
    with engine.connect() as conn:
        states = conn.execute(
            sa.text("SELECT state FROM trials WHERE trial_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": trial_ids},
        ).scalars().all()
    return len(states) == len(trial_ids) and all(s == "PRUNED" for s in states)


def _health(server: Server) -> dict[str, Any]:
    reply = server.get("/healthz")
    body = reply.json
    body["http_status"] = reply.status
    return dict(body)


def test_after_a_30_s_database_outage_the_queue_is_applied_within_one_interval(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """Regression (issue 8, items 4 and 5): after a ~30 s PostgreSQL outage, queued PRUNE notes
    waited out the sweep's back-off (37-40 s after the database was back), and during it a note
    save or the Fail button answered gunicorn's HTML 500, with a traceback per back-off round.

    Now: during the outage, JSON 503s with Retry-After and /healthz unavailable; the notes
    queued before it are applied within one interval of the database answering again, once
    each; the log says once that the database went away and once that it is back."""
    url = own_postgres.url
    study, ids = make_study(url, name="outage")
    queued = [ids["running"], ids["running2"]]
    # The server waits for the sweep lock held by "another server", so these stay queued.
    with _sweep_lock_held_by_another(url):
        with serve_server(url, tmp_path, interval=INTERVAL) as server:
            for tid in queued:
                note_by_script(study, tid, "diverged: PRUNE")
            before = _health(server)
            assert before["http_status"] == 200 and before["sweep"]["active"] is False, before
            own_postgres.stop()
            stopped = time.monotonic()
            wait_for(lambda: _health(server)["sweep"]["failures"] >= 1, timeout=15,
                     what="the sweep's first failed round", servers=[server])
            first_failure = time.monotonic()
            health = _health(server)
            assert health["http_status"] == 503, health
            assert (health["status"], health["database"]) == ("unavailable", "unreachable")
            sid = study._study_id
            assert_503(server.put_note(sid, ids["complete"], 1, "FAIL"), "note save")
            assert_503(server.request("POST", f"/api/trials/{ids['running']}/tell",
                                      json={"state": "Fail"}), "Fail button")
            assert_503(server.get(f"/api/studies/{sid}"), "the dashboard's study detail")
            assert_503(server.get("/hitl/api/actions"), "Human actions")
            assert_503(server.get("/dashboard"), "the dashboard's page")
            assert server.get("/hitl/static/hitl.js").status == 200
            reply = server.get("/healthz")
            assert reply.headers["Cache-Control"] == "no-store"

            time.sleep(max(0.0, first_failure + OUTAGE - time.monotonic()))
            own_postgres.start()
            back = time.monotonic()
            watcher = sa.create_engine(url)
            try:
                applied = wait_for(
                    lambda: _all_pruned(watcher, queued) and time.monotonic(),
                    timeout=60, what="the queued notes applied", servers=[server],
                    interval=0.05,
                )
            finally:
                watcher.dispose()
            recovery = applied - back
            print(f"\noutage {back - stopped:.1f} s; queue applied {recovery:.2f} s after the "
                  f"database answered again (interval {INTERVAL:.0f} s)")
            assert recovery <= INTERVAL + RECOVERY_SLACK, (
                f"applied {recovery:.1f} s after the database was back\n{server.describe()}"
            )
            wait_for(lambda: _health(server)["http_status"] == 200, timeout=10,
                     what="/healthz ok again", servers=[server])
            # The note save works again, through the note-save path.
            saved = server.put_note(study._study_id, ids["complete"], 1, "FAIL")
            assert saved.status == 204 and saved.outcome["action"] == "applied", saved
            output = server.output
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT trial_id, to_state, source FROM hitl_audit ORDER BY id"
            )).all()
            pending = conn.execute(sa.text("SELECT count(*) FROM hitl_note_changes")).scalar()
    finally:
        engine.dispose()
    assert sorted((r.trial_id, r.to_state, r.source) for r in rows) == sorted(
        [(tid, "PRUNED", "sweep") for tid in queued] + [(ids["complete"], "FAIL", "note-save")]
    ), rows
    assert pending == 0
    assert len(DOWN_LINE.findall(output)) == 1, output
    assert len(BACK_LINE.findall(output)) == 1, output
    assert "Traceback" not in output and "Exception:" not in output, output
