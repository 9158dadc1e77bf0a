"""The sweep lock on each real backend: one holder per database, handed over when it goes."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

from backends import database
from helpers import app_for
import pytest
import sqlalchemy as sa

from hitl_pruner import lock
from hitl_pruner.lock import SweepLock


@pytest.fixture
def engines(storage_url: str) -> Iterator[list[sa.Engine]]:
    made: list[sa.Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def lock_for(url: str, engines: list[sa.Engine]) -> SweepLock:
    engine = sa.create_engine(url)
    engines.append(engine)
    return lock.for_engine(engine)


def test_only_one_lock_on_a_database_is_taken(storage_url: str, engines: list[sa.Engine]) -> None:
    first, second = lock_for(storage_url, engines), lock_for(storage_url, engines)
    assert first.try_acquire() and first.held and first.check()
    assert not second.try_acquire() and not second.held
    assert first.try_acquire()  # taking it again while held is a no-op
    first.release()
    assert not first.held
    assert second.try_acquire() and second.held
    assert not first.try_acquire()
    second.release()


def test_locks_on_two_databases_of_one_server_are_independent(
    storage_url: str, engines: list[sa.Engine], tmp_path: Path
) -> None:
    """MySQL's GET_LOCK names are server-wide: the name carries the database."""
    backend = sa.make_url(storage_url).get_backend_name()
    with database(backend, tmp_path) as other:
        here, there = lock_for(storage_url, engines), lock_for(other, engines)
        assert here.try_acquire() and there.try_acquire()
        here.release()
        there.release()


def _holder_backend(url: str, admin: sa.Connection) -> None:
    """End the holder's database session from outside, as a server restart or a kill would."""
    dialect = admin.dialect.name
    if dialect == "postgresql":
        admin.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = :k "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ), {"k": lock.PG_KEY})
    else:
        name = f"{lock.LOCK_NAME}.{sa.make_url(url).database}"
        holder = admin.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar()
        assert holder is not None
        admin.exec_driver_sql(f"KILL {int(holder)}")


@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_a_lock_whose_connection_died_is_lost_and_taken_by_another(
    storage_url: str, engines: list[sa.Engine]
) -> None:
    first, second = lock_for(storage_url, engines), lock_for(storage_url, engines)
    assert first.try_acquire()
    admin_engine = sa.create_engine(storage_url, isolation_level="AUTOCOMMIT")
    engines.append(admin_engine)
    with admin_engine.connect() as admin:
        _holder_backend(storage_url, admin)
    deadline = time.monotonic() + 10
    while not second.try_acquire():
        assert time.monotonic() < deadline, "the server never released the dead session's lock"
        time.sleep(0.1)
    assert not first.check() and not first.held
    assert not first.try_acquire()
    second.release()
    assert first.try_acquire()
    first.release()


HOLDER = textwrap.dedent(
    """
    import sys, time
    import sqlalchemy as sa
    from hitl_pruner import lock
    held = lock.for_engine(sa.create_engine(sys.argv[1]))
    assert held.try_acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_holder_process_releases_the_lock(
    storage_url: str, engines: list[sa.Engine]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, storage_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        other = lock_for(storage_url, engines)
        assert not other.try_acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while not other.try_acquire():
            assert time.monotonic() < deadline, "the killed process's lock was never released"
            time.sleep(0.1)
        other.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_in_memory_sqlite_and_journal_locks(tmp_path: Path) -> None:
    memory = lock.for_engine(sa.create_engine("sqlite://"))
    assert memory.try_acquire() and memory.held and memory.check()
    memory.release()
    assert not memory.held
    journal = tmp_path / "journal.log"
    first, second = lock.for_journal(journal), lock.for_journal(journal)
    assert first.try_acquire() and not second.try_acquire()
    assert Path(str(journal) + lock.FILE_SUFFIX).exists()
    first.release()
    assert second.try_acquire()
    second.release()


def test_only_the_lock_holders_sweep_runs_and_a_stop_hands_it_over(storage_url: str) -> None:
    """Every process loops, only the holder sweeps; stopping it hands over within an interval."""
    apps = [app_for(storage_url, interval=0.1), app_for(storage_url, interval=0.1)]
    for app in apps:
        app.sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while not any(app.sweeper.active for app in apps):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert [app.sweeper.active for app in apps].count(True) == 1
        (holder,) = [app for app in apps if app.sweeper.active]
        (standby,) = [app for app in apps if not app.sweeper.active]
        assert standby.sweeper.last_run is None and standby.sweeper.last_tick is not None
        holder.sweeper.stop()
        deadline = time.monotonic() + 2
        while not standby.sweeper.active or standby.sweeper.last_run is None:
            assert time.monotonic() < deadline, "the standby never took over"
            time.sleep(0.02)
    finally:
        for app in apps:
            app.sweeper.stop()
