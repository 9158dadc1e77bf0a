"""Moving over from the seed tool: on the first start, notes that already carry commands list
the finished trials they would relabel and change none, unless --apply-existing-notes
(first_start.py, sweep.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from helpers import app_for
from helpers import audit_rows
from helpers import make_study
from helpers import rows
from helpers import save
from helpers import state
import optuna
from optuna.trial import TrialState
from optuna_dashboard import save_note
import pytest
import sqlalchemy as sa

import hitl_pruner
from hitl_pruner import cli
from hitl_pruner.config import resolve


def script_note(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def seeded(url: str) -> tuple[optuna.Study, dict[str, int]]:
    """A database the seed tool used: notes with commands, written before we ever ran."""
    study, ids = make_study(url)
    script_note(study, ids["complete"], "bad split\nPRUNE")
    script_note(study, ids["complete2"], "looks fine")
    script_note(study, ids["running"], "FAIL")
    script_note(study, ids["pruned_by_worker"], "FAIL")  # the worker's verdict stands anyway
    return study, ids


def test_the_first_start_lists_old_commands_on_finished_trials_and_relabels_none(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    study, ids = seeded(storage_url)
    with caplog.at_level(logging.INFO, "hitl_pruner"):
        app_for(storage_url).sweeper.run_once()
    assert state(storage_url, ids["complete"]) is TrialState.COMPLETE
    # A running trial's old command is applied, as the seed tool would have.
    assert state(storage_url, ids["running"]) is TrialState.FAIL
    assert [(r.trial_id, r.to_state) for r in audit_rows(storage_url)] == [
        (ids["running"], "FAIL")
    ]
    listed = [r.getMessage() for r in caplog.records if "first start: not applied" in
              r.getMessage()]
    assert len(listed) == 1
    assert "study 's' trial #0 " in listed[0] and "COMPLETE -> PRUNED" in listed[0]
    assert "--apply-existing-notes" in listed[0]
    assert "first start: 1 notes written before hitl-pruner first ran" in caplog.text


def test_notes_written_after_the_first_start_are_applied_as_always(storage_url: str) -> None:
    study, ids = seeded(storage_url)
    app = app_for(storage_url)
    app.sweeper.run_once()
    script_note(study, ids["complete2"], "FAIL")
    assert app.sweeper.run_once().applied == 1
    assert state(storage_url, ids["complete2"]) is TrialState.FAIL
    # An old note saved again is a new decision: applied.
    assert save(app, study._study_id, ids["complete"], 2, "bad split\nPRUNE").status == 204
    assert state(storage_url, ids["complete"]) is TrialState.PRUNED


def test_a_second_start_does_not_list_them_again_and_still_relabels_none(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    study, ids = seeded(storage_url)
    app_for(storage_url).sweeper.run_once()
    caplog.clear()
    with caplog.at_level(logging.INFO, "hitl_pruner"):
        second = app_for(storage_url)
        second.sweeper.run_once()
        second.sweeper.run_once()
    assert "first start: not applied" not in caplog.text
    assert caplog.text.count("1 notes written before hitl-pruner first ran on this database "
                             "would relabel finished trials and are held back") == 1
    assert state(storage_url, ids["complete"]) is TrialState.COMPLETE
    # Rounds read the queue past the held notes; new ones are applied.
    script_note(study, ids["complete2"], "PRUNE")
    assert second.sweeper.run_once().applied == 1


def test_a_held_note_saved_again_is_no_longer_counted_or_listed_as_held(
    storage_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: an old note saved again after the first start was applied as a new one, but
    later starts still counted it among the held back, and plan still listed it."""
    study, ids = seeded(storage_url)
    app = app_for(storage_url)
    app.sweeper.run_once()
    assert save(app, study._study_id, ids["complete"], 2, "bad split\nPRUNE").status == 204
    assert state(storage_url, ids["complete"]) is TrialState.PRUNED
    caplog.clear()
    with caplog.at_level(logging.INFO, "hitl_pruner"):
        app_for(storage_url).sweeper.run_once()
    assert "held back" not in caplog.text
    assert not rows(storage_url, "SELECT * FROM hitl_meta WHERE name LIKE 'existing_note%'")
    assert cli.main(["plan", storage_url]) == 0
    assert "no note written before hitl-pruner first ran here is held back" in \
        capsys.readouterr().out
    # --apply-existing-notes has nothing to apply twice.
    app_for(storage_url, apply_existing_notes=True).sweeper.run_once()
    assert len([r for r in audit_rows(storage_url) if r.trial_id == ids["complete"]]) == 1


def test_apply_existing_notes_on_the_first_start_relabels_them_with_audit_rows(
    storage_url: str,
) -> None:
    study, ids = seeded(storage_url)
    app_for(storage_url, apply_existing_notes=True).sweeper.run_once()
    assert state(storage_url, ids["complete"]) is TrialState.PRUNED
    assert state(storage_url, ids["running"]) is TrialState.FAIL
    assert state(storage_url, ids["pruned_by_worker"]) is TrialState.PRUNED
    relabel = [r for r in audit_rows(storage_url) if r.trial_id == ids["complete"]]
    assert [(r.from_state, r.to_state, bool(r.retroactive), r.source) for r in relabel] == [
        ("COMPLETE", "PRUNED", True, "sweep")
    ]


def test_apply_existing_notes_on_a_later_start_applies_the_held_ones_once(
    storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    study, ids = seeded(storage_url)
    app_for(storage_url).sweeper.run_once()
    assert cli.main(["plan", storage_url]) == 0
    out = capsys.readouterr().out
    assert "study 's' trial #0 " in out and "COMPLETE -> PRUNED" in out
    assert "1 notes written before hitl-pruner first ran here are held back" in out

    app_for(storage_url, apply_existing_notes=True).sweeper.run_once()
    assert state(storage_url, ids["complete"]) is TrialState.PRUNED
    assert len([r for r in audit_rows(storage_url) if r.trial_id == ids["complete"]]) == 1
    # Nothing held any more: the next start clears the marker and reads the whole queue.
    app_for(storage_url).sweeper.run_once()
    assert not rows(storage_url, "SELECT * FROM hitl_meta WHERE name LIKE 'existing_note%'")
    assert cli.main(["plan", storage_url]) == 0
    assert "no note written before hitl-pruner first ran here is held back" in \
        capsys.readouterr().out


def test_plan_before_the_first_start_lists_them_and_creates_nothing(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded(sqlite_url)
    assert cli.main(["plan", sqlite_url]) == 0
    out = capsys.readouterr().out
    assert "study 's' trial #0 (id " in out and "COMPLETE -> PRUNED: its note v1 says PRUNE" in out
    assert "has not run on this database yet" in out
    engine = sa.create_engine(sqlite_url)
    try:
        assert not [t for t in sa.inspect(engine).get_table_names() if t.startswith("hitl_")]
    finally:
        engine.dispose()


def test_a_dry_run_first_start_lists_them_and_a_real_one_lists_them_again(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    seeded(sqlite_url)
    with caplog.at_level(logging.INFO, "hitl_pruner"):
        app_for(sqlite_url, dry_run=True).sweeper.run_once()
        assert "first start: not applied" in caplog.text
        caplog.clear()
        app_for(sqlite_url).sweeper.run_once()
    assert "first start: not applied" in caplog.text


def test_the_flag_comes_from_the_command_line_the_environment_the_toml_file_and_wsgi(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hitl.toml"
    config.write_text("apply_existing_notes = true\n")
    assert resolve(environ={"HITL_CONFIG": str(config)}).apply_existing_notes is True
    assert resolve(environ={"HITL_APPLY_EXISTING_NOTES": "1"}).apply_existing_notes is True
    assert resolve(environ={}).apply_existing_notes is False
    _, given = cli.parse(["serve", "--apply-existing-notes"])
    assert resolve(given, environ={}).apply_existing_notes is True
    app = hitl_pruner.wsgi(optuna.storages.InMemoryStorage(), apply_existing_notes=True,
                           autostart=False)
    assert app.sweeper.existing is None  # no queue to hold notes in: journal rules apply
    with pytest.raises(ValueError, match="apply_existing_notes"):
        hitl_pruner.wsgi(optuna.storages.InMemoryStorage(), apply_existing_notes="yes")
