"""The note-save path, in process, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json

from helpers import app_for
from helpers import audit_rows
from helpers import call
from helpers import make_study
from helpers import save
from helpers import state
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_dashboard import get_note
import pytest


def test_a_prune_note_ends_a_running_trial_before_the_response(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = save(app, study._study_id, ids["running"], 1, "loss diverges, PRUNE",
             environ={"REMOTE_USER": "alice"})
    assert r.status == 204
    assert r.outcome == {"action": "applied", "reason": "PRUNE note", "trial_id": ids["running"],
                         "from": "RUNNING", "to": "PRUNED"}
    trial = RDBStorage(storage_url).get_trial(ids["running"])
    assert trial.state is TrialState.PRUNED
    assert trial.intermediate_values == {0: 0.7} and trial.datetime_complete is not None
    [row] = audit_rows(storage_url)
    assert (row.from_state, row.to_state, row.note_version, row.user_name, row.source) == (
        "RUNNING", "PRUNED", 1, "alice", "note-save"
    )


def test_waiting_trials_can_be_failed(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    r = save(app_for(storage_url), study._study_id, ids["waiting"], 1, "FAIL")
    assert r.outcome["action"] == "applied"
    assert state(storage_url, ids["waiting"]) is TrialState.FAIL


def test_the_dashboard_shows_the_new_state_at_once(storage_url: str) -> None:
    """Regression: the dashboard's per-study trial cache must be cleared after a change."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    path = f"/api/studies/{study._study_id}"
    before = {t["trial_id"]: t["state"] for t in call(app, "GET", path).json()["trials"]}
    assert before[ids["running"]] == "Running"
    save(app, study._study_id, ids["running"], 1, "PRUNE")
    after = {t["trial_id"]: t["state"] for t in call(app, "GET", path).json()["trials"]}
    assert after[ids["running"]] == "Pruned"


def test_retroactive_relabel_keeps_everything_and_undo_restores_complete(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    tid = ids["complete"]
    before = RDBStorage(storage_url).get_trial(tid)

    r = save(app, study._study_id, tid, 1, "bogus split: FAIL")
    assert r.outcome["action"] == "applied" and r.outcome["to"] == "FAIL"
    relabelled = RDBStorage(storage_url).get_trial(tid)
    assert relabelled.state is TrialState.FAIL
    for field in ("values", "params", "intermediate_values", "user_attrs", "system_attrs",
                  "datetime_start", "datetime_complete"):
        assert getattr(relabelled, field) == getattr(before, field), field

    r = save(app, study._study_id, tid, 2, "bogus split: PRUNE instead")
    assert (r.outcome["from"], r.outcome["to"]) == ("FAIL", "PRUNED")

    r = save(app, study._study_id, tid, 3, "bogus split? no, fine")
    assert r.outcome["action"] == "applied" and r.outcome["to"] == "COMPLETE"
    restored = RDBStorage(storage_url).get_trial(tid)
    assert restored.state is TrialState.COMPLETE and restored.values == before.values

    rows = audit_rows(storage_url)
    assert [(r.from_state, r.to_state, bool(r.retroactive), bool(r.is_undo)) for r in rows] == [
        ("COMPLETE", "FAIL", True, False),
        ("FAIL", "PRUNED", True, False),
        ("PRUNED", "COMPLETE", True, True),
    ]
    # Saving the same note again changes nothing more.
    r = save(app, study._study_id, tid, 4, "bogus split? no, fine")
    assert r.outcome["action"] == "nothing to do" and len(audit_rows(storage_url)) == 3


def test_trials_ended_by_their_worker_are_not_touched(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = save(app, study._study_id, ids["pruned_by_worker"], 1, "FAIL")
    assert r.outcome["action"] == "refused" and "its worker ended it" in r.outcome["reason"]
    r = save(app, study._study_id, ids["failed_by_worker"], 1, "nothing")
    assert r.outcome["action"] == "nothing to do"
    assert state(storage_url, ids["pruned_by_worker"]) is TrialState.PRUNED
    assert audit_rows(storage_url) == []


def test_active_only_refuses_relabels(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    r = save(app_for(storage_url, retroactive=False), study._study_id, ids["complete"], 1, "FAIL")
    assert r.outcome["action"] == "refused" and "--active-only" in r.outcome["reason"]
    assert state(storage_url, ids["complete"]) is TrialState.COMPLETE


def test_dry_run_reports_and_changes_nothing(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    r = save(app_for(storage_url, dry_run=True), study._study_id, ids["running"], 1, "PRUNE")
    assert r.outcome["action"] == "dry run" and r.outcome["to"] == "PRUNED"
    assert state(storage_url, ids["running"]) is TrialState.RUNNING
    assert audit_rows(storage_url) == []


def test_study_filter_leaves_other_studies_alone(storage_url: str) -> None:
    a, ids_a = make_study(storage_url, "a")
    b, ids_b = make_study(storage_url, "b")
    app = app_for(storage_url, studies=("a",))
    assert save(app, b._study_id, ids_b["running"], 1, "PRUNE").outcome["action"] == (
        "not monitored"
    )
    assert save(app, a._study_id, ids_a["running"], 1, "PRUNE").outcome["action"] == "applied"
    assert state(storage_url, ids_b["running"]) is TrialState.RUNNING


def test_version_conflict_keeps_the_dashboards_409_and_changes_nothing(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    assert save(app, study._study_id, ids["running"], 1, "first").status == 204
    r = save(app, study._study_id, ids["running"], 1, "PRUNE")
    assert r.status == 409 and "has changed" in r.json()["reason"]
    assert r.json()["note"] == {"version": 1, "body": "first"}
    assert "X-Hitl-Outcome" not in r.headers
    assert state(storage_url, ids["running"]) is TrialState.RUNNING


@pytest.mark.parametrize(
    "raw, reason",
    [
        pytest.param(b"{not json", "must be JSON", id="malformed"),
        pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
        pytest.param(b'{"body": "PRUNE"}', '"version" must be an integer', id="no-version"),
        pytest.param(b'{"version": "1", "body": "PRUNE"}', '"version"', id="string-version"),
        pytest.param(b'{"version": 1}', '"body" must be a string', id="no-body"),
        pytest.param(b'{"version": 1, "body": 5}', '"body" must be a string', id="number-body"),
    ],
)
def test_bad_bodies_get_a_400_and_change_nothing(
    sqlite_url: str, raw: bytes, reason: str
) -> None:
    study, ids = make_study(sqlite_url)
    r = call(app_for(sqlite_url), "PUT", f"/api/studies/{study._study_id}/{ids['running']}/note",
             raw=raw)
    assert r.status == 400 and reason in r.json()["reason"]
    assert state(sqlite_url, ids["running"]) is TrialState.RUNNING


def test_unknown_ids_and_foreign_trials_get_404_and_no_note(storage_url: str) -> None:
    a, ids_a = make_study(storage_url, "a")
    b, _ = make_study(storage_url, "b")
    app = app_for(storage_url)
    for study_id, trial_id in ((a._study_id, 99999), (99999, ids_a["running"]),
                               (b._study_id, ids_a["running"])):
        r = save(app, study_id, trial_id, 1, "PRUNE")
        assert r.status == 404, (study_id, trial_id)
        assert f"study_id={study_id} has no trial with trial_id={trial_id}" in r.json()["reason"]
    assert state(storage_url, ids_a["running"]) is TrialState.RUNNING
    storage = RDBStorage(storage_url)
    assert not any(k.startswith("dashboard:") for k in storage.get_study_system_attrs(b._study_id))


def test_a_one_megabyte_note_is_refused_and_changes_nothing(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = save(app, study._study_id, ids["running"], 1, "PRUNE " + "x" * 1_000_000)
    assert r.status == 413 and "at most 100 KiB" in r.json()["reason"]
    assert state(storage_url, ids["running"]) is TrialState.RUNNING
    assert get_note(_trial(study, ids["running"])) == ""


def test_long_notes_up_to_the_limit_are_read_whole(storage_url: str) -> None:
    """A command at the end of a note spanning many 2045-character chunks is found."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    app.sweeper.run_once()
    body = "x" * 40_000 + "\nFAIL"
    assert save(app, study._study_id, ids["running"], 1, body).outcome["action"] == "applied"
    note = app.store.notes(study._study_id, [ids["running"]])[ids["running"]]
    assert note.body == body and note.version == 1


def test_other_requests_pass_through_untouched(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    page = call(app, "GET", "/dashboard")
    assert page.status == 200 and "Content-Security-Policy" in page.headers
    assert call(app, "GET", "/api/studies").json()["study_summaries"][0]["study_name"] == "s"
    r = call(app, "POST", f"/api/trials/{ids['running']}/tell", {"state": "Complete",
                                                                 "values": [1.0]})
    assert r.status == 204 and state(sqlite_url, ids["running"]) is TrialState.COMPLETE
    r = call(app, "PUT", f"/api/studies/{study._study_id}/note", {"version": 1, "body": "PRUNE"})
    assert r.status == 204 and "X-Hitl-Outcome" not in r.headers


def _trial(study: object, trial_id: int) -> object:
    import optuna

    return optuna.Trial(study, trial_id)  # type: ignore[arg-type]


def test_outcome_header_is_json(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    r = save(app_for(sqlite_url), study._study_id, ids["running"], 1, "note")
    assert json.loads(r.headers["X-Hitl-Outcome"])["action"] == "nothing to do"
