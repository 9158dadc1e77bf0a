"""Journal storages: running trials can be ended; finished ones are refused, saying why."""

from __future__ import annotations

import logging
from pathlib import Path

from helpers import app_for
from helpers import save
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from optuna_dashboard import save_note
import pytest


def journal_study(path: Path) -> tuple[str, optuna.Study, int, int]:
    url = str(path / "journal.log")
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(url)))
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    return url, study, running._trial_id, done._trial_id


def fresh_state(url: str, trial_id: int) -> TrialState:
    return JournalStorage(JournalFileBackend(url)).get_trial(trial_id).state


def test_a_running_trial_on_a_journal_is_pruned_on_note_save(tmp_path: Path) -> None:
    url, study, running, _ = journal_study(tmp_path)
    app = app_for(url)
    r = save(app, study._study_id, running, 1, "PRUNE")
    assert r.outcome["action"] == "applied"
    assert fresh_state(url, running) is TrialState.PRUNED
    [entry] = app.store.audit()
    assert (entry.from_state, entry.to_state, entry.trial_id) == (
        TrialState.RUNNING, TrialState.PRUNED, running
    )


def test_a_retroactive_change_on_a_journal_is_refused_with_a_clear_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, study, _, done = journal_study(tmp_path)
    app = app_for(url)
    with caplog.at_level(logging.WARNING, logger="hitl_pruner"):
        r = save(app, study._study_id, done, 1, "FAIL")
    assert r.outcome["action"] == "refused"
    assert "journal storage is append-only" in r.outcome["reason"]
    assert "journal storage is append-only" in caplog.text
    assert fresh_state(url, done) is TrialState.COMPLETE


def test_the_journal_sweep_applies_script_notes_once(tmp_path: Path) -> None:
    url, study, running, _ = journal_study(tmp_path)
    app = app_for(url)
    app.sweeper.run_once()
    save_note(optuna.Trial(study, running), "FAIL")
    assert app.sweeper.run_once().applied == 1
    assert fresh_state(url, running) is TrialState.FAIL
    assert app.sweeper.run_once().changes == 0
