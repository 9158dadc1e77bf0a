"""prune, fail and undo from a script or a cron job (script.py, `python -m hitl_pruner prune`):
each trial's note gets its next version and goes through the server's own applier."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import app_for
from helpers import audit_rows
from helpers import make_study
from helpers import snapshot
from helpers import state
import optuna
from optuna.pruners import NopPruner
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState as S
from optuna_dashboard._note import get_note_from_system_attrs
import pytest
import sqlalchemy as sa

import hitl_pruner
from hitl_pruner import HumanInTheLoopPruner
from hitl_pruner import cli
from hitl_pruner.rdb import SqlStore
from hitl_pruner.worker import requested_state


def numbers(url: str, ids: dict[str, int]) -> dict[str, int]:
    storage = RDBStorage(url)
    return {label: storage.get_trial(tid).number for label, tid in ids.items()}


def note(study: optuna.Study, trial_id: int) -> dict[str, object]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return dict(get_note_from_system_attrs(attrs, trial_id))


def everything(url: str) -> dict[str, list[str]]:
    engine = sa.create_engine(url)
    try:
        return snapshot(engine)
    finally:
        engine.dispose()


def installed(url: str) -> None:
    """Our tables, as any first run creates them: a later snapshot compares like with like."""
    SqlStore(RDBStorage(url)).install()


def test_prune_and_fail_end_running_trials_and_relabel_complete_ones_with_cli_audit_rows(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    study, ids = make_study(storage_url)
    n = numbers(storage_url, ids)
    assert (n["complete"], n["complete2"]) == (0, 1)  # so that 0-1 is a range of two
    code = cli.main([
        "prune", storage_url, "--study", "s", "--trials", "0-1", str(n["running"]),
        "--user", "ann",
    ])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "trial 0: COMPLETE -> PRUNED: applied: retroactive relabel",
        "trial 1: COMPLETE -> PRUNED: applied: retroactive relabel",
        f"trial {n['running']}: RUNNING -> PRUNED: applied: PRUNE note",
    ]
    assert cli.main(["fail", storage_url, "--study", "s", "--trials", str(n["running2"])]) == 0
    assert [state(storage_url, ids[k]) for k in ("complete", "complete2", "running", "running2")] \
        == [S.PRUNED, S.PRUNED, S.PRUNED, S.FAIL]
    rows = [(r.trial_id, r.from_state, r.to_state, r.user_name, r.source, r.note_version)
            for r in audit_rows(storage_url)]
    assert rows == [
        (ids["complete"], "COMPLETE", "PRUNED", "ann", "cli", 1),
        (ids["complete2"], "COMPLETE", "PRUNED", "ann", "cli", 1),
        (ids["running"], "RUNNING", "PRUNED", "ann", "cli", 1),
        (ids["running2"], "RUNNING", "FAIL", None, "cli", 1),
    ]
    # Each note is saved as a dashboard save would: version 1, the command word on its own.
    assert note(study, ids["running2"]) == {"version": 1, "body": "FAIL"}


def test_the_python_functions_return_one_result_per_trial_and_take_a_storage_object(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    n = numbers(storage_url, ids)
    results = hitl_pruner.fail(RDBStorage(storage_url), "s", [n["running"], "0"], user="bo")
    assert [(r.number, r.action, r.from_state, r.to_state, r.note_version) for r in results] \
        == [(n["running"], "applied", S.RUNNING, S.FAIL, 1), (0, "applied", S.COMPLETE, S.FAIL, 1)]
    assert all(r.ok for r in results)
    # Already so: nothing to do, which is what the script asked for.
    again = hitl_pruner.fail(storage_url, "s", [0])
    assert (again[0].action, again[0].ok) == ("nothing to do", True)
    assert [r.user_name for r in audit_rows(storage_url)] == ["bo", "bo"]


def test_undo_takes_the_command_out_and_puts_a_relabelled_trial_back_to_complete(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    study, ids = make_study(storage_url)
    hitl_pruner.prune(storage_url, "s", [0], reason="diverged")
    assert state(storage_url, ids["complete"]) is S.PRUNED
    assert cli.main(["undo", storage_url, "--study", "s", "--trials", "0", "--user", "ann"]) == 0
    assert "PRUNED -> COMPLETE: applied" in capsys.readouterr().out
    assert state(storage_url, ids["complete"]) is S.COMPLETE
    assert note(study, ids["complete"]) == {"version": 2, "body": "diverged"}
    last = audit_rows(storage_url)[-1]
    assert (last.from_state, last.to_state, bool(last.is_undo), last.source, last.user_name) == (
        "PRUNED", "COMPLETE", True, "cli", "ann")
    # Nothing left to take out: no new note version.
    assert hitl_pruner.undo(storage_url, "s", [0])[0].action == "nothing to do"
    assert note(study, ids["complete"])["version"] == 2


def test_reason_is_written_on_the_line_before_the_command_word(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    n = numbers(storage_url, ids)
    study._storage.set_study_system_attr(study._study_id, f"dashboard:{ids['running']}:note_ver", 1)
    study._storage.set_study_system_attr(
        study._study_id, f"dashboard:{ids['running']}:note_str:0", "lr 0.3, FAIL rate high\n\n")
    code = cli.main(["prune", storage_url, "--study", "s", "--trials", str(n["running"]),
                     "--reason", "loss went NaN at step 40"])
    assert code == 0
    assert note(study, ids["running"]) == {
        "version": 2, "body": "lr 0.3, FAIL rate high\n\nloss went NaN at step 40\nPRUNE"}
    # The word written last wins over the FAIL in the earlier text.
    assert state(storage_url, ids["running"]) is S.PRUNED


def test_dry_run_saves_no_note_and_changes_nothing(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    make_study(storage_url)
    installed(storage_url)
    before = everything(storage_url)
    code = cli.main(["prune", storage_url, "--study", "s", "--trials", "0-3", "--dry-run",
                     "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True
    assert [(r["number"], r["action"], r["to"]) for r in out["results"]] == [
        (i, "dry run", "PRUNED") for i in range(4)]
    assert everything(storage_url) == before


def test_an_unknown_study_is_exit_2_and_names_the_close_ones(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    make_study(storage_url, "resnet-lr")
    installed(storage_url)
    before = everything(storage_url)
    assert cli.main(["prune", storage_url, "--study", "resnet_lr", "--trials", "0"]) == 2
    err = capsys.readouterr().err
    assert "no study named 'resnet_lr'" in err and "'resnet-lr'" in err, err
    assert everything(storage_url) == before


def test_unknown_trial_numbers_are_exit_2_named_and_nothing_changes(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    make_study(storage_url)
    installed(storage_url)
    before = everything(storage_url)
    # Trial 0 exists, and comes first: it is not changed either, since all are checked first.
    assert cli.main(["fail", storage_url, "--study", "s", "--trials", "0", "40-41"]) == 2
    err = capsys.readouterr().err
    assert "no trial numbered 40, 41" in err and "nothing was changed" in err, err
    assert cli.main(["fail", storage_url, "--study", "s", "--trials", "3-x"]) == 2
    assert "'3-x' is not a trial number" in capsys.readouterr().err
    assert everything(storage_url) == before


def test_a_user_outside_the_allow_list_is_refused_with_exit_1_and_the_sweep_does_not_apply_it(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    study, ids = make_study(storage_url)
    n = numbers(storage_url, ids)
    code = cli.main(["prune", storage_url, "--study", "s", "--trials", str(n["running"]), "0",
                     "--allowed-users", "bob", "--user", "mallory"])
    assert code == 1
    out = capsys.readouterr().out
    assert "refused: user 'mallory' may not issue commands" in out, out
    assert state(storage_url, ids["running"]) is S.RUNNING
    assert state(storage_url, ids["complete"]) is S.COMPLETE
    # The note is saved (as in the dashboard), but a server with the same allow-list never
    # applies it.
    app_for(storage_url, allowed_users=("bob",)).sweeper.run_once()
    assert state(storage_url, ids["running"]) is S.RUNNING
    assert audit_rows(storage_url) == []
    # Someone on the list may.
    assert hitl_pruner.prune(storage_url, "s", [n["running"]], user="bob",
                             allowed_users=("bob",))[0].action == "applied"


def test_a_trial_whose_worker_reads_requests_is_asked_and_answers_requested(
    storage_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    study = optuna.create_study(
        study_name="s", storage=storage_url,
        pruner=HumanInTheLoopPruner(NopPruner(), check_interval=0),
    )
    trial = hitl_pruner.ask(study)  # marks the trial as one whose worker reads requests
    installed(storage_url)
    code = cli.main(["fail", storage_url, "--study", "s", "--trials", str(trial.number),
                     "--grace", "60"])
    assert code == 0
    assert f"trial {trial.number}: RUNNING -> FAIL: requested: asked its worker" in (
        capsys.readouterr().out)
    assert state(storage_url, trial._trial_id) is S.RUNNING
    assert requested_state(study, trial) is S.FAIL


def test_a_note_longer_than_one_attribute_is_saved_and_shortened_as_the_dashboard_does(
    storage_url: str,
) -> None:
    """The note is split into 2045-character attributes; a shorter next version blanks the old
    tail, else the dashboard would read the old text after the new."""
    study, ids = make_study(storage_url)
    text = "x" * 4090  # two attributes exactly; with the command a third
    hitl_pruner.prune(storage_url, "s", [0], reason=text)
    assert note(study, ids["complete"]) == {"version": 1, "body": f"{text}\nPRUNE"}
    assert hitl_pruner.undo(storage_url, "s", [0])[0].action == "applied"
    assert note(study, ids["complete"]) == {"version": 2, "body": text}
    assert state(storage_url, ids["complete"]) is S.COMPLETE


def test_on_a_journal_a_running_trial_is_pruned_and_a_finished_one_refused_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(tmp_path / "journal.log")
    study = optuna.create_study(
        study_name="j", storage=JournalStorage(JournalFileBackend(path)))
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    assert cli.main(["prune", path, "--study", "j", "--trials", "0-1", "--user", "ann"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trial 0: -: refused: this storage cannot change a finished")
    assert out[1] == "trial 1: RUNNING -> PRUNED: applied: PRUNE note"
    fresh = JournalStorage(JournalFileBackend(path))
    assert [t.state for t in fresh.get_all_trials(study._study_id)] == [S.COMPLETE, S.PRUNED]
    assert running.number == 1


def test_a_storage_url_after_the_trial_numbers_is_the_storage_url(
    sqlite_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    make_study(sqlite_url)
    assert cli.main(["prune", "--study", "s", "--trials", "0", "1", sqlite_url]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert [r.trial_number for r in audit_rows(sqlite_url)] == [0, 1]


def test_a_note_saved_but_not_applied_is_not_applied_later_by_a_sweep_for_a_refused_user(
    storage_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: the refusal is remembered before the note is saved (as the note-save does),
    so when the script's own apply fails, the sweep of a server with the same allow-list still
    does not apply the note of a user outside it."""
    study, ids = make_study(storage_url)
    n = numbers(storage_url, ids)
    app = app_for(storage_url, allowed_users=("bob",))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("connection lost")

    monkeypatch.setattr(hitl_pruner.applier.Applier, "apply", broken)
    code = cli.main(["prune", storage_url, "--study", "s", "--trials", str(n["running"]),
                     "--allowed-users", "bob", "--user", "mallory"])
    assert code == 1
    assert "error: saved; a running server applies it (connection lost)" in (
        capsys.readouterr().out)
    monkeypatch.undo()
    assert note(study, ids["running"])["body"] == "PRUNE"
    app.sweeper.run_once()
    assert state(storage_url, ids["running"]) is S.RUNNING
    assert audit_rows(storage_url) == []
