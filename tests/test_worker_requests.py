"""The server side of cooperative workers: ask or force, the grace period, the Fail button.

In process, on SQLite, PostgreSQL and MariaDB. A "cooperative" trial here is one marked the way
HumanInTheLoopPruner marks it; the worker's own side is in test_worker.py.
"""

from __future__ import annotations

import datetime
import logging

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import rows
from helpers import save
from helpers import state
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState as S
import pytest
import sqlalchemy as sa

from hitl_pruner import HumanInTheLoopPruner
from hitl_pruner.commands import Command as C
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve
from hitl_pruner.requests import COOPERATIVE_ATTR
from hitl_pruner.requests import Settle
from hitl_pruner.requests import settle
from hitl_pruner.transitions import Action as A
from hitl_pruner.transitions import Worker
from hitl_pruner.transitions import decide

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
LATER = NOW + datetime.timedelta(seconds=30)
COOPERATIVE = Worker(cooperates=True)


# --- the pure rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, command, worker, action, target",
    [
        pytest.param(S.RUNNING, C.PRUNE, COOPERATIVE, A.ASK, S.PRUNED, id="ask-prune"),
        pytest.param(S.RUNNING, C.FAIL, COOPERATIVE, A.ASK, S.FAIL, id="ask-fail"),
        pytest.param(S.RUNNING, C.PRUNE, Worker(False), A.APPLY, S.PRUNED, id="plain-forced"),
        pytest.param(S.RUNNING, C.PRUNE, None, A.APPLY, S.PRUNED, id="unknown-forced"),
        pytest.param(S.RUNNING, C.PRUNE, Worker(True, S.PRUNED), A.NOOP, None,
                     id="asked-already"),
        pytest.param(S.RUNNING, C.FAIL, Worker(True, S.PRUNED), A.ASK, S.FAIL,
                     id="fail-replaces-prune"),
        pytest.param(S.WAITING, C.FAIL, COOPERATIVE, A.APPLY, S.FAIL, id="waiting-has-no-worker"),
        pytest.param(S.COMPLETE, C.FAIL, COOPERATIVE, A.APPLY, S.FAIL, id="finished-relabel"),
        pytest.param(S.RUNNING, None, COOPERATIVE, A.NOOP, None, id="no-command"),
    ],
)
def test_decide_asks_a_cooperative_running_trials_worker(
    state: S, command: C | None, worker: Worker | None, action: A, target: S | None
) -> None:
    d = decide(state, command, None, retroactive_allowed=True, retroactive_supported=True,
               worker=worker)
    assert (d.action, d.target) == (action, target)


@pytest.mark.parametrize(
    "target, state, now, verdict",
    [
        pytest.param(S.PRUNED, S.RUNNING, NOW, Settle.WAIT, id="running-in-grace"),
        pytest.param(S.PRUNED, S.RUNNING, LATER, Settle.FORCE, id="running-past-deadline"),
        pytest.param(S.PRUNED, S.PRUNED, NOW, Settle.BY_WORKER, id="worker-pruned"),
        pytest.param(S.FAIL, S.FAIL, LATER, Settle.BY_WORKER, id="worker-failed"),
        pytest.param(S.FAIL, S.COMPLETE, NOW, Settle.RELABEL, id="completed-first"),
        pytest.param(S.PRUNED, S.FAIL, NOW, Settle.DROP, id="crashed-first"),
        pytest.param(S.FAIL, S.PRUNED, NOW, Settle.DROP, id="pruned-itself-first"),
        pytest.param(S.FAIL, None, NOW, Settle.DROP, id="trial-gone"),
    ],
)
def test_settle(target: S, state: S | None, now: datetime.datetime, verdict: Settle) -> None:
    assert settle(target, state, LATER, now) is verdict


# Which evidence makes a worker cooperative: test_cooperation.py.


# --- on the databases ------------------------------------------------------------------------


def mark(url: str, study_id: int, trial_id: int) -> None:
    """What HumanInTheLoopPruner writes on a trial's first should_prune()."""
    RDBStorage(url).set_trial_system_attr(trial_id, COOPERATIVE_ATTR, True)


def requests(url: str) -> dict[int, str]:
    return {r.trial_id: r.target for r in rows(url, "SELECT * FROM hitl_requests")}


def audit(url: str) -> list[tuple[str, str, str, str]]:
    return [
        (r.from_state, r.to_state, r.source, r.how)
        for r in rows(url, "SELECT * FROM hitl_audit ORDER BY id")
    ]


def test_a_cooperative_workers_trial_is_asked_not_ended(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, ids["running"])
    r = save(app, study._study_id, ids["running"], 1, "PRUNE")
    assert r.status == 204
    assert (r.outcome["action"], r.outcome["to"]) == ("requested", "PRUNED")
    assert state(storage_url, ids["running"]) is S.RUNNING
    assert requests(storage_url) == {ids["running"]: "PRUNED"}
    assert audit(storage_url) == []  # recorded when the trial actually ends


def test_a_plain_workers_trial_is_forced_at_once_and_audited_so(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    # Another trial of the study cooperates, but this one reported without marking itself.
    mark(storage_url, study._study_id, ids["running2"])
    r = save(app, study._study_id, ids["running"], 1, "PRUNE")
    assert r.outcome["action"] == "applied"
    assert state(storage_url, ids["running"]) is S.PRUNED
    assert audit(storage_url) == [("RUNNING", "PRUNED", "note-save", "forced")]


def test_a_trial_that_has_not_reported_yet_gets_the_grace_period_while_a_wrapped_worker_lives(
    storage_url: str,
) -> None:
    """Optuna calls a pruner only from should_prune(): a new trial cannot have marked itself."""
    study, ids = make_study(storage_url)
    fresh = study.ask()
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, ids["running"])
    r = save(app, study._study_id, fresh._trial_id, 1, "PRUNE")
    assert r.outcome["action"] == "applied", "no wrapped worker checking in: forced"

    # A wrapped worker checks in on the study (its heartbeat).
    wrapped = optuna.load_study(study_name=study.study_name, storage=storage_url,
                                pruner=HumanInTheLoopPruner(check_interval=0))
    mine = wrapped.ask()
    mine.report(0.5, 0)
    mine.should_prune()
    fresh2 = study.ask()
    r = save(app, study._study_id, fresh2._trial_id, 1, "FAIL")
    assert r.outcome["action"] == "requested"
    assert state(storage_url, fresh2._trial_id) is S.RUNNING


def test_the_audit_row_keeps_the_reason_given_when_the_worker_was_asked(
    storage_url: str,
) -> None:
    """Regression: the audit row written when the worker ended its trial read the reason from
    the note then, and had none when the note had been edited since the request."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    tid = ids["running"]
    mark(storage_url, study._study_id, tid)
    assert save(app, study._study_id, tid, 1,
                "loss diverges\nPRUNE").outcome["action"] == "requested"
    assert save(app, study._study_id, tid, 2,
                "loss diverges\nPRUNE\n\nlater: it was the data").outcome["action"] == \
        "nothing to do"
    RDBStorage(storage_url).set_trial_state_values(tid, S.PRUNED)  # the worker heeds it
    app.sweeper.run_once()
    [row] = rows(storage_url, "SELECT * FROM hitl_audit")
    assert (row.trial_id, row.to_state, row.how, row.note_version, row.reason) == (
        tid, "PRUNED", "worker", 1, "loss diverges")


def test_a_second_command_replaces_the_request_and_the_same_one_is_not_repeated(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    tid = ids["running"]
    mark(storage_url, study._study_id, tid)
    assert save(app, study._study_id, tid, 1, "PRUNE").outcome["action"] == "requested"
    r = save(app, study._study_id, tid, 2, "PRUNE, really")
    assert r.outcome["action"] == "nothing to do" and "already asked" in r.outcome["reason"]
    assert save(app, study._study_id, tid, 3, "PRUNE, no: FAIL").outcome["to"] == "FAIL"
    assert requests(storage_url) == {tid: "FAIL"}


def test_the_sweep_forces_a_request_still_running_after_the_grace_period(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No command is lost to a worker that hangs or never calls should_prune()."""
    study, ids = make_study(storage_url)
    tid = ids["running"]
    mark(storage_url, study._study_id, tid)
    patient = app_for(storage_url, grace=3600)
    save(patient, study._study_id, tid, 1, "PRUNE")
    patient.sweeper.run_once()
    assert state(storage_url, tid) is S.RUNNING, "within the grace period"

    impatient = app_for(storage_url, grace=0)
    mark(storage_url, study._study_id, ids["running2"])
    save(impatient, study._study_id, ids["running2"], 1, "FAIL")
    with caplog.at_level(logging.INFO, logger="hitl_pruner"):
        stats = impatient.sweeper.run_once()
    assert stats.settled == 1
    assert state(storage_url, ids["running2"]) is S.FAIL
    assert state(storage_url, tid) is S.RUNNING, "its deadline is the one set when asked"
    assert audit(storage_url) == [("RUNNING", "FAIL", "note-save", "grace")]
    assert "forced after the grace period" in caplog.text
    assert requests(storage_url) == {tid: "PRUNED"}


def test_the_sweep_records_a_trial_its_worker_ended_on_request(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    study, ids = make_study(storage_url)
    tid = ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, tid)
    save(app, study._study_id, tid, 1, "PRUNE", environ={"REMOTE_USER": "alice"})
    study.tell(optuna.Trial(study, tid), state=S.PRUNED)  # what the worker's optimize does
    with caplog.at_level(logging.INFO, logger="hitl_pruner"):
        assert app.sweeper.run_once().settled == 1
    [row] = rows(storage_url, "SELECT * FROM hitl_audit")
    assert (row.from_state, row.to_state, row.how, row.user_name, row.note_version) == (
        "RUNNING", "PRUNED", "worker", "alice", 1
    )
    assert "ended by its worker on request" in caplog.text
    assert requests(storage_url) == {}
    assert app.sweeper.run_once().settled == 0


def test_a_workers_pruned_becomes_fail_when_a_human_asked_fail(storage_url: str) -> None:
    """study.optimize survives only TrialPruned, so the FAIL is made in the worker's update."""
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    for tid in (ids["running"], ids["running2"]):
        mark(storage_url, study._study_id, tid)
    save(app, study._study_id, ids["running"], 1, "FAIL")
    save(app, study._study_id, ids["running2"], 1, "PRUNE")
    for tid in (ids["running"], ids["running2"]):
        study.tell(optuna.Trial(study, tid), state=S.PRUNED)
    assert state(storage_url, ids["running"]) is S.FAIL
    assert state(storage_url, ids["running2"]) is S.PRUNED
    # Without a request nothing changes: a worker's own PRUNED stays PRUNED.
    other = study.ask()
    study.tell(other, state=S.PRUNED)
    assert state(storage_url, other._trial_id) is S.PRUNED
    app.sweeper.run_once()
    assert sorted(audit(storage_url)) == [
        ("RUNNING", "FAIL", "note-save", "worker"),
        ("RUNNING", "PRUNED", "note-save", "worker"),
    ]


def test_a_trial_completed_before_its_worker_read_the_request_is_relabelled(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    tid = ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, tid)
    # The button, not a note: the sweep would relabel a noted trial through its note anyway.
    fail_button(app, tid)
    study.tell(optuna.Trial(study, tid), 0.3)
    app.sweeper.run_once()
    assert state(storage_url, tid) is S.FAIL
    assert audit(storage_url) == [("COMPLETE", "FAIL", "fail-button", "forced")]
    assert requests(storage_url) == {}


def test_a_trial_its_worker_ended_otherwise_first_keeps_its_state(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    tid = ids["running"]
    app = app_for(storage_url, grace=0)
    mark(storage_url, study._study_id, tid)
    save(app, study._study_id, tid, 1, "PRUNE")
    study.tell(optuna.Trial(study, tid), state=S.FAIL)  # the objective crashed
    app.sweeper.run_once()
    assert state(storage_url, tid) is S.FAIL
    assert audit(storage_url) == [] and requests(storage_url) == {}


def test_two_servers_settling_at_once_record_the_workers_end_once(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    tid = ids["running"]
    first, second = app_for(storage_url, grace=60), app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, tid)
    save(first, study._study_id, tid, 1, "PRUNE")
    study.tell(optuna.Trial(study, tid), state=S.PRUNED)
    [(request, now_state)] = first.store.requests(None)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert first.applier.settle(request, now_state, now).action == "applied"
    second.applier.settle(request, now_state, now)
    assert len(audit(storage_url)) == 1


def test_a_dry_run_asks_nobody(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    mark(storage_url, study._study_id, ids["running"])
    r = save(app_for(storage_url, dry_run=True), study._study_id, ids["running"], 1, "PRUNE")
    assert (r.outcome["action"], r.outcome["to"]) == ("dry run", "PRUNED")
    assert requests(storage_url) == {}


# --- the dashboard's Fail Trial button -------------------------------------------------------


def fail_button(app: object, trial_id: int, body: object = None, **kw: object) -> object:
    return call(app, "POST", f"/api/trials/{trial_id}/tell",
                body if body is not None else {"state": "Fail"}, **kw)  # type: ignore[arg-type]


def test_the_fail_button_asks_a_cooperative_worker(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, ids["running"])
    r = fail_button(app, ids["running"], environ={"REMOTE_USER": "bob"})
    assert r.status == 204
    assert (r.outcome["action"], r.outcome["to"]) == ("requested", "FAIL")
    assert state(storage_url, ids["running"]) is S.RUNNING
    study.tell(optuna.Trial(study, ids["running"]), state=S.PRUNED)
    app.sweeper.run_once()
    [row] = rows(storage_url, "SELECT * FROM hitl_audit")
    assert (row.to_state, row.source, row.how, row.user_name, row.note_version) == (
        "FAIL", "fail-button", "worker", "bob", None
    )


def test_the_fail_button_forces_a_plain_running_trial_and_a_waiting_one(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    assert fail_button(app, ids["running"]).outcome["action"] == "applied"
    assert fail_button(app, ids["waiting"], {"state": "fail"}).outcome["action"] == "applied"
    assert state(storage_url, ids["running"]) is S.FAIL
    assert state(storage_url, ids["waiting"]) is S.FAIL
    assert audit(storage_url) == [
        ("RUNNING", "FAIL", "fail-button", "forced"),
        ("WAITING", "FAIL", "fail-button", "forced"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"state": "Complete", "values": [1.0]}, id="complete"),
        pytest.param({}, id="no-state"),
        pytest.param(["Fail"], id="not-an-object"),
    ],
)
def test_other_tells_go_to_the_dashboard_untouched(storage_url: str, body: object) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    r = fail_button(app, ids["running"], body)
    assert r.outcome is None
    assert audit(storage_url) == []


def test_the_fail_button_on_a_finished_trial_is_refused_with_how_to_relabel(
    sqlite_url: str,
) -> None:
    """Only running trials take a tell; a finished one is relabelled by note (409, not the
    dashboard's 500)."""
    study, ids = make_study(sqlite_url)
    r = fail_button(app_for(sqlite_url), ids["complete"])
    assert r.status == 409 and "relabel a finished trial" in r.json()["reason"]
    assert r.outcome is None
    assert state(sqlite_url, ids["complete"]) is S.COMPLETE


# --- settings --------------------------------------------------------------------------------


def test_grace_defaults_to_three_intervals_and_can_be_set() -> None:
    assert resolve({}, {}).grace_seconds == 30
    assert resolve({"interval": 2}, {}).grace_seconds == 6
    assert resolve({"grace": 5}, {"HITL_GRACE": "7"}).grace_seconds == 5
    assert resolve({}, {"HITL_GRACE": "0"}).grace_seconds == 0
    with pytest.raises(ConfigError, match="--grace"):
        resolve({"grace": -1}, {})
    assert app_for("sqlite:///:memory:", interval=4).applier.grace == 12


def test_uninstall_removes_the_fail_trigger_and_the_requests_table(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url, grace=60)
    mark(storage_url, study._study_id, ids["running"])
    save(app, study._study_id, ids["running"], 1, "FAIL")
    app.store.uninstall()
    engine = sa.create_engine(storage_url)
    try:
        assert "hitl_requests" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    # Optuna's own tell works as before, with nothing of ours left to turn PRUNED into FAIL.
    study.tell(optuna.Trial(study, ids["running"]), state=S.PRUNED)
    assert state(storage_url, ids["running"]) is S.PRUNED


def test_a_human_acting_before_ask_marks_its_new_trial_asks_the_worker(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (CI): hitl_pruner.ask() marks the trial just after Optuna creates it, and on
    a worker's first trial nothing else showed it alive: a PRUNE saved in between forced the
    trial. The heartbeat now comes first, so the request is asked of the worker."""
    import hitl_pruner
    from hitl_pruner import worker

    study = optuna.create_study(storage=storage_url)
    app = app_for(storage_url, grace=60)
    channel = worker._channel(study)
    mark = channel.mark
    outcomes: list[dict[str, object] | None] = []

    def human_first(trial_id: int) -> None:
        outcomes.append(save(app, study._study_id, trial_id, 1, "PRUNE").outcome)
        mark(trial_id)

    monkeypatch.setattr(channel, "mark", human_first)
    trial = hitl_pruner.ask(study)
    [outcome] = outcomes
    assert outcome is not None and outcome["action"] == "requested", outcome
    assert hitl_pruner.requested_state(study, trial) is S.PRUNED
    assert state(storage_url, trial._trial_id) is S.RUNNING
