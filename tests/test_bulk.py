"""The bulk action (POST /hitl/api/studies/<id>/bulk, bulk.py), in process against real
databases: every selected trial goes through the note-save path with its own note version and
audit row, and the answer says what became of each."""

from __future__ import annotations

import datetime
import time
from typing import Any

from helpers import app_for
from helpers import audit_rows
from helpers import call
from helpers import make_study
from helpers import snapshot
from helpers import state
import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState as S
from optuna_dashboard._note import get_note_from_system_attrs
import pytest
import sqlalchemy as sa

from hitl_pruner import bulk as bulk_module
from hitl_pruner.bulk import MAX_TRIALS

# make_study's trials by number: 0, 1 COMPLETE; 2, 3 RUNNING; 4 PRUNED and 5 FAIL by their
# worker; 6 WAITING.


def bulk(app: Any, study_id: int, body: Any, **environ: Any) -> Any:
    return call(app, "POST", f"/hitl/api/studies/{study_id}/bulk", body,
                environ=environ or None)


def note(study: optuna.Study, trial_id: int) -> dict[str, object]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return dict(get_note_from_system_attrs(attrs, trial_id))


def everything(url: str) -> dict[str, list[str]]:
    engine = sa.create_engine(url)
    try:
        return snapshot(engine)
    finally:
        engine.dispose()


def running_trials(url: str, n: int) -> optuna.Study:
    """A study of ``n`` RUNNING trials, inserted in one go (study.ask takes a second per ten)."""
    storage = RDBStorage(url)
    study = optuna.create_study(study_name="many", storage=storage)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    with storage.engine.begin() as conn:
        conn.execute(sa.insert(models.TrialModel.__table__), [
            {"number": i, "study_id": study._study_id, "state": S.RUNNING,
             "datetime_start": now} for i in range(n)
        ])
    storage.engine.dispose()
    return study


def test_a_state_filter_prunes_every_running_trial_each_with_its_note_and_audit_row(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = bulk(app, study._study_id, {"action": "prune", "filter": {"state": "RUNNING"},
                                    "reason": "bad data split"}, REMOTE_USER="ann")
    assert r.status == 200, r.body
    answer = r.json()
    assert (answer["matched"], answer["counts"], answer["dry_run"]) == (2, {"applied": 2}, False)
    assert [(x["number"], x["action"], x["from"], x["to"], x["note_version"])
            for x in answer["results"]] == [(2, "applied", "RUNNING", "PRUNED", 1),
                                            (3, "applied", "RUNNING", "PRUNED", 1)]
    for label in ("running", "running2"):
        assert state(storage_url, ids[label]) is S.PRUNED
        assert note(study, ids[label]) == {"version": 1, "body": "bad data split\nPRUNE"}
    rows = audit_rows(storage_url)
    assert sorted((r.trial_number, r.to_state, r.source, r.user_name, r.note_version)
                  for r in rows) == [(2, "PRUNED", "bulk", "ann", 1),
                                     (3, "PRUNED", "bulk", "ann", 1)]
    assert state(storage_url, ids["complete"]) is S.COMPLETE


def test_explicit_trials_and_ranges_report_mixed_outcomes_per_trial(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = bulk(app, study._study_id, {"action": "fail", "trials": [0, "3-4", 6]})
    assert r.status == 200, r.body
    got = {x["number"]: (x["action"], x["to"]) for x in r.json()["results"]}
    assert got == {
        0: ("applied", "FAIL"),  # COMPLETE, relabelled
        3: ("applied", "FAIL"),  # RUNNING without a cooperative worker: forced
        4: ("refused", None),  # PRUNED by its own worker: its verdict stands
        6: ("applied", "FAIL"),  # WAITING
    }
    assert "worker" in r.json()["results"][2]["reason"]
    assert r.json()["counts"] == {"applied": 3, "refused": 1}
    assert state(storage_url, ids["pruned_by_worker"]) is S.PRUNED
    assert state(storage_url, ids["running"]) is S.RUNNING  # not named


def test_a_parameter_range_selects_within_the_state_filter(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    xs = {t.number: t.params["x"] for t in study.get_trials() if "x" in t.params}
    low = min(xs[0], xs[1])  # the lower of the two COMPLETE trials' x only
    r = bulk(app_for(storage_url), study._study_id, {
        "action": "prune", "dry_run": True,
        "filter": {"state": "COMPLETE", "param": {"name": "x", "max": low}},
    })
    assert r.status == 200, r.body
    assert [x["number"] for x in r.json()["results"]] == [n for n in (0, 1) if xs[n] == low]


def test_undo_puts_relabelled_trials_back_to_complete_with_an_undo_audit_row(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    assert bulk(app, study._study_id, {"action": "prune", "trials": ["0-1"],
                                       "reason": "suspect"}).json()["counts"] == {"applied": 2}
    assert state(storage_url, ids["complete2"]) is S.PRUNED
    r = bulk(app, study._study_id, {"action": "undo", "trials": [0, 1, 2]})
    assert r.status == 200, r.body
    got = {x["number"]: (x["action"], x["to"]) for x in r.json()["results"]}
    assert got == {0: ("applied", "COMPLETE"), 1: ("applied", "COMPLETE"),
                   2: ("nothing to do", None)}
    assert state(storage_url, ids["complete"]) is S.COMPLETE
    assert note(study, ids["complete"]) == {"version": 2, "body": "suspect"}
    assert [r.is_undo for r in audit_rows(storage_url)[-2:]] == [True, True]


def test_a_dry_run_saves_nothing_and_says_what_each_trial_would_do(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    before = everything(storage_url)
    r = bulk(app, study._study_id, {"action": "prune", "trials": ["0-6"], "dry_run": True})
    assert r.status == 200, r.body
    assert r.json()["dry_run"] is True
    got = {x["number"]: x["action"] for x in r.json()["results"]}
    assert got == {0: "dry run", 1: "dry run", 2: "dry run", 3: "dry run", 4: "nothing to do",
                   5: "refused", 6: "dry run"}
    assert everything(storage_url) == before


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ("not an object", 400, "JSON object"),
        ({"action": "delete", "trials": [1]}, 400, "action must be one of"),
        ({"action": "prune"}, 400, "name the trials"),
        ({"action": "prune", "trials": []}, 400, "non-empty list"),
        ({"action": "prune", "trials": [1.5]}, 400, "not a trial number"),
        ({"action": "prune", "trials": ["9-7"]}, 400, "runs backwards"),
        ({"action": "prune", "trials": [True]}, 400, "not a trial number"),
        ({"action": "prune", "trials": [0, 99]}, 400, "no trial numbered 99"),
        ({"action": "prune", "trials": ["0-99999999999"]}, 400, f"more than {MAX_TRIALS}"),
        ({"action": "prune", "trials": [0], "extra": 1}, 400, "unknown field"),
        ({"action": "prune", "filter": {"state": "DONE"}}, 400, "filter.state must be"),
        ({"action": "prune", "filter": {"param": {"name": "x"}}}, 400, "min, max or both"),
        ({"action": "prune", "filter": {"param": {"name": "x", "min": 2, "max": 1}}}, 400,
         "above max"),
        ({"action": "prune", "filter": {"param": {"name": "x", "min": "a"}}}, 400,
         "finite number"),
        ({"action": "prune", "trials": [0], "dry_run": "yes"}, 400, "true or false"),
        ({"action": "prune", "trials": [0], "reason": "a\nb"}, 400, "one line"),
        ({"action": "undo", "trials": [0], "reason": "why"}, 400, "undo takes no reason"),
    ],
    ids=["not-object", "unknown-action", "no-selection", "empty-list", "float", "backwards",
         "bool", "unknown-trial", "too-many", "unknown-field", "bad-state", "param-no-bound",
         "param-inverted", "param-not-number", "dry-run-not-bool", "reason-two-lines",
         "undo-reason"],
)
def test_bad_input_is_a_400_with_a_reason_and_changes_nothing(
    sqlite_url: str, body: Any, status: int, reason: str,
) -> None:
    study, _ = make_study(sqlite_url)
    app = app_for(sqlite_url)
    call(app, "GET", "/hitl/api/actions")  # our tables exist before the snapshot
    before = everything(sqlite_url)
    r = bulk(app, study._study_id, body)
    assert r.status == status, r.body
    assert reason in r.json()["reason"]
    assert everything(sqlite_url) == before


def test_a_filter_matching_more_than_the_cap_is_refused(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bulk_module, "MAX_TRIALS", 1)
    study, ids = make_study(sqlite_url)
    r = bulk(app_for(sqlite_url), study._study_id, {"action": "prune",
                                                    "filter": {"state": "RUNNING"}})
    assert r.status == 400 and "2 trials match, more than 1" in r.json()["reason"]
    assert state(sqlite_url, ids["running"]) is S.RUNNING


@pytest.mark.parametrize(
    "method, environ, status",
    [
        ("POST", {"HTTP_SEC_FETCH_SITE": "cross-site", "HTTP_ORIGIN": "https://evil.example"}, 403),
        ("POST", {"HTTP_ORIGIN": "http://evil.example", "HTTP_HOST": "127.0.0.1:8080"}, 403),
        ("POST", {"CONTENT_TYPE": "text/plain"}, 415),
        ("GET", {}, 405),
    ],
    ids=["cross-site", "other-origin", "form-post", "get"],
)
def test_other_sites_forms_and_other_methods_are_refused(
    sqlite_url: str, method: str, environ: dict[str, str], status: int,
) -> None:
    study, ids = make_study(sqlite_url)
    r = call(app_for(sqlite_url), method, f"/hitl/api/studies/{study._study_id}/bulk",
             {"action": "prune", "trials": [2]}, environ=environ)
    assert r.status == status, r.body
    assert "reason" in r.json()
    assert state(sqlite_url, ids["running"]) is S.RUNNING


def test_a_user_outside_the_allow_list_is_refused_as_a_whole_and_nothing_is_saved(
    sqlite_url: str,
) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url, allowed_users=("ann",), user_header="X-User",
                  forwarded_allow_ips=("*",))
    r = bulk(app, study._study_id, {"action": "prune", "trials": [2]}, HTTP_X_USER="bob")
    assert r.status == 403 and "'bob' may not" in r.json()["reason"]
    assert note(study, ids["running"]) == {"version": 0, "body": ""}
    ok = bulk(app, study._study_id, {"action": "prune", "trials": [2]}, HTTP_X_USER="ann")
    assert ok.status == 200 and ok.json()["counts"] == {"applied": 1}


def test_an_unknown_study_is_a_404_and_one_outside_study_a_409(sqlite_url: str) -> None:
    study, _ = make_study(sqlite_url)
    r = bulk(app_for(sqlite_url), study._study_id + 5, {"action": "prune", "trials": [2]})
    assert r.status == 404 and "no study" in r.json()["reason"]
    r = bulk(app_for(sqlite_url, studies=("other",)), study._study_id,
             {"action": "prune", "trials": [2]})
    assert r.status == 409 and "outside --study" in r.json()["reason"]


def test_five_hundred_running_trials_in_one_action_on_postgresql(postgres_url: str) -> None:
    """The figure the README quotes (printed, not asserted: the machine's load varies)."""
    study = running_trials(postgres_url, 500)
    app = app_for(postgres_url)
    call(app, "GET", "/hitl/api/actions")  # tables installed: not part of the timing
    start = time.perf_counter()
    r = bulk(app, study._study_id, {"action": "prune", "filter": {"state": "RUNNING"}})
    took = time.perf_counter() - start
    assert r.status == 200 and r.json()["counts"] == {"applied": 500}, r.body[:300]
    print(f"\nbulk PRUNE of 500 RUNNING trials on PostgreSQL: {took:.2f} s")
    assert len(audit_rows(postgres_url)) == 500


def test_the_batched_save_saves_nothing_when_a_trial_left_its_state_and_skips_stale_versions(
    storage_url: str,
) -> None:
    """SqlStore.save_notes, the bulk action's one transaction: a compare-and-set on every
    trial's state (all or nothing: the caller then saves one at a time) and on every note's
    version (a stale one is left out and handed back, the others saved)."""
    from hitl_pruner.audit import AuditEntry
    from hitl_pruner.rdb import SqlStore
    from hitl_pruner.store import Note

    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    store: SqlStore = app.store
    refs = store.trials([ids["running"], ids["running2"]])
    one, two = refs[ids["running"]], refs[ids["running2"]]

    def entry(ref: Any, from_state: S) -> AuditEntry:
        return AuditEntry(study_id=ref.study_id, study_name=ref.study_name,
                          trial_id=ref.trial_id, trial_number=ref.number,
                          from_state=from_state, to_state=S.PRUNED, note_version=1,
                          user=None, source="bulk", retroactive=False, undo=False)

    assert store.save_notes([(one, Note(1, "PRUNE"), entry(one, S.RUNNING)),
                             (two, Note(1, "PRUNE"), entry(two, S.COMPLETE))]) is None
    assert note(study, ids["running"]) == {"version": 0, "body": ""}
    assert state(storage_url, ids["running"]) is S.RUNNING and audit_rows(storage_url) == []
    stale = store.save_notes([(one, Note(1, "PRUNE"), entry(one, S.RUNNING)),
                              (two, Note(2, "PRUNE"), None)])
    assert stale == {two.trial_id: Note(0, "")}
    assert note(study, ids["running"]) == {"version": 1, "body": "PRUNE"}
    assert state(storage_url, ids["running"]) is S.PRUNED
    assert note(study, ids["running2"]) == {"version": 0, "body": ""}


def test_the_reason_is_in_the_audit_row_and_the_actions_json_of_every_path(
    storage_url: str,
) -> None:
    """A reason with the decision: bulk, a script, and a note typed in the dashboard."""
    from helpers import save

    import hitl_pruner

    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    assert bulk(app, study._study_id, {"action": "prune", "trials": [2],
                                       "reason": "loss is NaN"}).status == 200
    hitl_pruner.fail(storage_url, "s", [3], reason="bad split")
    assert save(app, study._study_id, ids["complete"], 1,
                "notes\n\nwrong dataset\nFAIL").outcome["action"] == "applied"
    bulk(app, study._study_id, {"action": "undo", "trials": [0]})
    got = {(r.trial_number, r.is_undo): r.reason for r in audit_rows(storage_url)}
    assert got == {(2, False): "loss is NaN", (3, False): "bad split",
                   (0, False): "wrong dataset", (0, True): None}
    listed = call(app, "GET", "/hitl/api/actions").json()["actions"]
    assert {(a["trial_number"], a["undo"]): a["reason"] for a in listed} == got


def test_an_audit_table_from_before_reasons_gets_the_column_at_start(storage_url: str) -> None:
    study, _ = make_study(storage_url)
    app_for(storage_url)  # installs hitl_audit
    engine = sa.create_engine(storage_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE hitl_audit DROP COLUMN reason")
        app = app_for(storage_url)  # installs again: adds the column back
        assert bulk(app, study._study_id, {"action": "prune", "trials": [2],
                                           "reason": "why"}).status == 200
        assert [r.reason for r in audit_rows(storage_url)] == ["why"]
    finally:
        engine.dispose()
