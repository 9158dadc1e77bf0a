"""The sweeping process wakes when a note is written, at the default interval (wake.py)."""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import time

from helpers import app_for
from helpers import make_study
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_dashboard import save_note
import pytest
import sqlalchemy as sa

from hitl_pruner.rdb import NOTIFY_CHANNEL
from hitl_pruner.rdb import TRIGGER
from hitl_pruner.rdb import SqlStore

# What `python -c` runs: a script in another process writing a note, as a notebook would.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import optuna
    from optuna_dashboard import save_note
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])
    for line in sys.stdin:
        trial_id, body = line.rstrip("\\n").split(" ", 1)
        save_note(optuna.Trial(study, int(trial_id)), body)
        print(time.monotonic(), flush=True)
    """
)
# What these tests prove is that the write woke the sweep, not how fast: the speed target
# (0.5 s at the median, 1 s at p95) is scripts/bench_latency.py's to measure on a quiet
# machine, as speed targets are. A round at the 10 s interval meets this deadline for one
# note in four at random (all four notes of the first test: 1 time in 256); the wake meets it
# even in a suite that loads both cores, where a 1 s deadline measured the scheduler.
WITHIN = 2.5


def save_by_script(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def wait_for_state(engine: sa.Engine, trial_id: int, wanted: TrialState,
                   timeout: float) -> None:
    """Wait until the trial is in ``wanted``, read on a connection of the test's."""
    deadline = time.monotonic() + timeout
    query = sa.text("SELECT state FROM trials WHERE trial_id = :t")
    while True:
        with engine.connect() as conn:
            if conn.execute(query, {"t": trial_id}).scalar() == wanted.name:
                return
        assert time.monotonic() < deadline, f"trial {trial_id} never became {wanted.name}"
        time.sleep(0.01)


def test_a_note_written_by_a_script_wakes_the_sweep_at_the_default_interval(
    storage_url: str,
) -> None:
    """Regression: a note written by a script (optuna_dashboard.save_note in another process)
    waited for the sweep's next round, up to the 10 s interval; the sweeping process now wakes
    on the write and applies it at once."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    assert app.sweeper.interval == 10.0  # the default
    script = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, storage_url, study.study_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert script.stdin is not None and script.stdout is not None
    engine = sa.create_engine(storage_url)
    app.sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while not (app.sweeper.active and app.sweeper.last_run is not None):
            assert time.monotonic() < deadline, "the sweep never ran"
            time.sleep(0.02)
        for trial_id, body, wanted in [
            (ids["running"], "PRUNE", TrialState.PRUNED),
            (ids["complete"], "FAIL", TrialState.FAIL),
            (ids["complete"], "fine after all", TrialState.COMPLETE),  # undo
            (ids["waiting"], "FAIL", TrialState.FAIL),
        ]:
            script.stdin.write(f"{trial_id} {body}\n")
            script.stdin.flush()
            ready, _, _ = select.select([script.stdout], [], [], 30)
            assert ready, "the script did not write the note"
            written = float(script.stdout.readline())
            wait_for_state(engine, trial_id, wanted, timeout=15)
            took = time.monotonic() - written
            assert took < WITHIN, (body, took)
    finally:
        app.sweeper.stop()
        engine.dispose()
        script.stdin.close()
        script.wait(10)
        script.stdout.close()


def test_a_wake_applies_only_while_this_process_holds_the_lock(sqlite_url: str) -> None:
    """Two servers watch nothing twice: only the lock holder wakes, and a note is applied
    once."""
    study, ids = make_study(sqlite_url)
    apps = [app_for(sqlite_url), app_for(sqlite_url)]
    for app in apps:
        app.sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while not any(a.sweeper.active and a.sweeper.last_run for a in apps):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        engine = sa.create_engine(sqlite_url)
        save_by_script(study, ids["running"], "PRUNE")
        wait_for_state(engine, ids["running"], TrialState.PRUNED, timeout=WITHIN)
        (standby,) = [a for a in apps if not a.sweeper.active]
        assert standby.sweeper.last_run is None
    finally:
        for app in apps:
            app.sweeper.stop()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM hitl_audit")).scalar() == 1
    engine.dispose()


OLD_FUNCTION = (
    f"CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger AS $$ "
    "BEGIN INSERT INTO hitl_note_changes (study_id, attr_key) VALUES (NEW.study_id, NEW.key); "
    "RETURN NULL; END $$ LANGUAGE plpgsql"
)


def notified(url: str, write: object, timeout: float = 2.0) -> bool:
    """Whether ``write()`` sends a notification on the trigger's channel."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            with raw.cursor() as cursor:
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
            write()  # type: ignore[operator]
            deadline = time.monotonic() + timeout
            while not raw.notifies and time.monotonic() < deadline:  # type: ignore[attr-defined]
                if select.select([raw], [], [], 0.1)[0]:
                    raw.poll()  # type: ignore[attr-defined]
            return bool(raw.notifies)  # type: ignore[attr-defined]
    finally:
        engine.dispose()


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_install_upgrades_the_trigger_function_of_an_older_version(storage_url: str) -> None:
    """Regression: a database installed by an older version keeps its trigger function, which
    queues a note but notifies nobody; install() replaces it, so the sweep wakes there too."""
    study, ids = make_study(storage_url)
    app_for(storage_url)
    engine = sa.create_engine(storage_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(OLD_FUNCTION)
    engine.dispose()
    assert not notified(storage_url, lambda: save_by_script(study, ids["running"], "one"))

    storage = RDBStorage(storage_url)
    SqlStore(storage).install()
    storage.engine.dispose()
    assert notified(storage_url, lambda: save_by_script(study, ids["running"], "two"))
    # The trigger still queues the write, once per key written (version and text).
    engine = sa.create_engine(storage_url)
    with engine.connect() as conn:
        queued = conn.execute(sa.text(
            "SELECT count(*) FROM hitl_note_changes WHERE attr_key LIKE :k"
        ), {"k": f"dashboard:{ids['running']}:%"}).scalar()
    engine.dispose()
    assert queued == 4
