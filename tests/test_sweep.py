"""The background sweep: notes written any other way than through our note-save."""

from __future__ import annotations

import logging
import threading
import time

from helpers import app_for
from helpers import make_study
from helpers import save
from helpers import state
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_dashboard import save_note
import pytest
import sqlalchemy as sa

from hitl_pruner.dashboard import note_str_key_prefix
from hitl_pruner.dashboard import note_ver_key


def note_by_script(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def test_a_note_saved_by_a_script_is_applied_by_the_next_sweep(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    app.sweeper.run_once()
    note_by_script(study, ids["running"], "PRUNE")
    note_by_script(study, ids["complete"], "FAIL")
    stats = app.sweeper.run_once()
    assert stats.applied == 2
    assert state(storage_url, ids["running"]) is TrialState.PRUNED
    assert state(storage_url, ids["complete"]) is TrialState.FAIL
    # Removing the command from the script's note is an undo too.
    note_by_script(study, ids["complete"], "fine after all")
    app.sweeper.run_once()
    assert state(storage_url, ids["complete"]) is TrialState.COMPLETE


def test_notes_written_before_the_first_start_are_applied(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    note_by_script(study, ids["running"], "FAIL")
    app = app_for(storage_url)
    assert app.sweeper.run_once().applied == 1
    assert state(storage_url, ids["running"]) is TrialState.FAIL


def test_a_sweep_between_the_version_and_the_text_write_does_not_lose_the_command(
    storage_url: str,
) -> None:
    """Regression: the dashboard writes note_ver, then the text; a monitor that marks the
    version done when it reads in between loses the command."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    app.sweeper.run_once()
    storage = RDBStorage(storage_url)
    tid = ids["running"]
    storage.set_study_system_attr(study._study_id, note_ver_key(tid), 1)
    app.sweeper.run_once()  # reads version 1 with no text yet
    assert state(storage_url, tid) is TrialState.RUNNING
    storage.set_study_system_attr(study._study_id, f"{note_str_key_prefix(tid)}0", "PRUNE")
    app.sweeper.run_once()
    assert state(storage_url, tid) is TrialState.PRUNED


def test_a_restarted_server_reapplies_nothing_and_misses_nothing(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    first = app_for(storage_url)
    save(first, study._study_id, ids["complete"], 1, "FAIL")
    first.sweeper.run_once()
    # An operator puts it back by hand; our old note must not strike again on restart.
    engine = sa.create_engine(storage_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE trials SET state = 'COMPLETE' WHERE trial_id = :t"),
                     {"t": ids["complete"]})
    engine.dispose()
    note_by_script(study, ids["running"], "PRUNE")  # while "down"

    second = app_for(storage_url)
    stats = second.sweeper.run_once()
    assert stats.applied == 1
    assert state(storage_url, ids["running"]) is TrialState.PRUNED
    assert state(storage_url, ids["complete"]) is TrialState.COMPLETE
    assert second.sweeper.run_once().changes == 0


def test_an_idle_sweep_reads_no_notes(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    for tid in ids.values():
        note_by_script(study, tid, "just a note")
    app = app_for(storage_url)
    assert app.sweeper.run_once().trials == len(ids)
    assert app.sweeper.run_once().changes == 0


def test_the_sweep_ignores_a_note_filed_under_another_study(storage_url: str) -> None:
    a, ids_a = make_study(storage_url, "a")
    b, _ = make_study(storage_url, "b")
    app = app_for(storage_url)
    app.sweeper.run_once()
    # What the bare dashboard would do for PUT /api/studies/<b>/<trial of a>/note.
    storage = RDBStorage(storage_url)
    storage.set_study_system_attr(b._study_id, note_ver_key(ids_a["running"]), 1)
    storage.set_study_system_attr(b._study_id, f"{note_str_key_prefix(ids_a['running'])}0",
                                  "PRUNE")
    app.sweeper.run_once()
    assert state(storage_url, ids_a["running"]) is TrialState.RUNNING


def test_dry_run_sweep_changes_nothing_and_leaves_the_queue_for_later(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    dry = app_for(storage_url, dry_run=True)
    note_by_script(study, ids["running"], "PRUNE")
    dry.sweeper.run_once()
    dry.sweeper.run_once()
    assert state(storage_url, ids["running"]) is TrialState.RUNNING
    real = app_for(storage_url)
    assert real.sweeper.run_once().applied == 1


def test_a_dry_run_sweep_between_the_version_and_the_text_write_still_says_the_command(
    sqlite_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a dry run remembered a note as said by its version alone, so a sweep that
    read the new version before its text (common once the sweep wakes on the first write)
    never said what the note would do."""
    study, ids = make_study(sqlite_url)
    dry = app_for(sqlite_url, dry_run=True)
    dry.sweeper.run_once()
    storage = RDBStorage(sqlite_url)
    tid = ids["running"]
    storage.set_study_system_attr(study._study_id, note_ver_key(tid), 1)
    dry.sweeper.run_once()  # reads version 1 with no text yet
    storage.set_study_system_attr(study._study_id, f"{note_str_key_prefix(tid)}0", "PRUNE")
    with caplog.at_level(logging.INFO, logger="hitl_pruner"):
        dry.sweeper.run_once()
    assert "dry run, would change" in caplog.text
    assert state(sqlite_url, tid) is TrialState.RUNNING


def test_the_study_filter_applies_to_the_sweep(storage_url: str) -> None:
    a, ids_a = make_study(storage_url, "a")
    b, ids_b = make_study(storage_url, "b")
    app = app_for(storage_url, studies=("a",))
    note_by_script(a, ids_a["running"], "PRUNE")
    note_by_script(b, ids_b["running"], "PRUNE")
    app.sweeper.run_once()
    assert state(storage_url, ids_a["running"]) is TrialState.PRUNED
    assert state(storage_url, ids_b["running"]) is TrialState.RUNNING


def test_two_servers_racing_change_a_trial_once(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    apps = [app_for(storage_url), app_for(storage_url)]
    note_by_script(study, ids["complete"], "FAIL")
    barrier = threading.Barrier(2)

    def sweep(app: object) -> None:
        barrier.wait()
        app.sweeper.run_once()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=sweep, args=(a,)) for a in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine = sa.create_engine(storage_url)
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM hitl_audit")).scalar()
    engine.dispose()
    assert count == 1 and state(storage_url, ids["complete"]) is TrialState.FAIL


def test_an_unexpected_error_does_not_stop_the_sweep(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one round is logged and retried; outages have their own path (test_outage)."""
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url, interval=0.05)
    real_pending = app.store.pending
    failures = iter([True, True])

    def flaky(*args: object, **kwargs: object) -> object:
        if next(failures, False):
            raise RuntimeError("a bug in one round")
        return real_pending(*args, **kwargs)

    app.sweeper.store.pending = flaky  # type: ignore[method-assign]
    note_by_script(study, ids["running"], "PRUNE")
    with caplog.at_level(logging.ERROR, logger="hitl_pruner.sweep"):
        app.sweeper.start()
        try:
            deadline = time.monotonic() + 10
            while state(sqlite_url, ids["running"]) is TrialState.RUNNING:
                assert time.monotonic() < deadline, "the sweep never recovered"
                time.sleep(0.05)
            assert app.sweeper.alive
        finally:
            app.sweeper.stop()
    assert "sweep failed; retrying" in caplog.text
