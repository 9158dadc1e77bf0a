"""Every answer and record names who really acted, by which path (issue 8, items 9 and 11).

The race first: the dashboard commits a note before our note-save applies it, so the sweep (of
this server or another) can carry the note out in between, in either order with our own write.
Whichever runs first, the save answers as if it had acted, and the request and audit rows keep
the save's source, user and note version. Each interleaving is forced here, on SQLite,
PostgreSQL and MariaDB, by running the sweep inside the dashboard's note handler (after its save,
before our apply) or inside a store call.

Then who ended a trial: refusals, the Fail Trial button's reason, a human's own tell after a
request, and the command words themselves.
"""

from __future__ import annotations

from pathlib import Path
import threading
from typing import Any
from typing import Callable
from typing import Iterable

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import rows
from helpers import save
from helpers import state
import optuna
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState as S
import pytest

from hitl_pruner.commands import Command as C
from hitl_pruner.commands import CommandParser
from hitl_pruner.middleware import HitlMiddleware
from hitl_pruner.requests import COOPERATIVE_ATTR
from hitl_pruner.transitions import Action as A
from hitl_pruner.transitions import LastChange
from hitl_pruner.transitions import decide

ALICE = {"REMOTE_USER": "alice"}


def mark(url: str, study_id: int, trial_id: int) -> None:
    """What HumanInTheLoopPruner writes on a trial's first should_prune()."""
    storage = RDBStorage(url)
    storage.set_trial_system_attr(trial_id, COOPERATIVE_ATTR, True)


def audit(url: str) -> list[tuple[Any, ...]]:
    return [
        (r.trial_id, r.from_state, r.to_state, r.source, r.user_name, r.note_version, r.how)
        for r in rows(url, "SELECT * FROM hitl_audit ORDER BY id")
    ]


def requests(url: str) -> list[tuple[Any, ...]]:
    return [
        (r.trial_id, r.target, r.source, r.user_name, r.note_version)
        for r in rows(url, "SELECT * FROM hitl_requests ORDER BY trial_id")
    ]


def hitl(app: Any) -> HitlMiddleware:
    """The HitlMiddleware inside the served stack."""
    layer = app
    while not isinstance(layer, HitlMiddleware):
        layer = vars(layer)["application"]
    return layer


def after_the_note_is_saved(app: Any, then: Callable[[], object]) -> None:
    """Run ``then`` once, after the next note save is committed and before our apply.

    On an RDB storage our store saves the note (Applier.save): ``then`` runs once it saved the
    note alone; a note it saved together with the trial's change has no moment between save
    and apply, and ``then`` runs after both. On a journal the dashboard saves the note."""
    middleware = hitl(app)
    pending = [then]
    store = app.applier.store
    if app.applier.saves_notes:
        real = store.save_note

        def saved(*args: Any, **kwargs: Any) -> Any:
            stored = real(*args, **kwargs)
            if stored is None and pending:
                pending.pop()()
            return stored

        store.save_note = saved
        return
    dashboard = middleware.app

    def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = list(dashboard(environ, start_response))
        if environ["REQUEST_METHOD"] == "PUT" and pending:
            pending.pop()()
        return body

    middleware.app = wrapped


def before_our_write(monkeypatch: pytest.MonkeyPatch, app: Any, method: str,
                     then: Callable[[], object]) -> None:
    """Run ``then`` once, after our applier decided and before it writes (store.ask or
    store.transition): the other party's write lands between our read and our write."""
    store = app.applier.store
    real = getattr(store, method)
    pending = [then]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if pending:
            pending.pop()()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, method, wrapped)


class HeldSweep:
    """Another server's sweep, stopped just before its write (store.ask or store.transition)
    until ``release()``: it decides before our save is applied and writes after."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, other: Any, method: str) -> None:
        self.decided = threading.Event()
        self.go = threading.Event()
        self.error: BaseException | None = None
        store = other.applier.store
        real = getattr(store, method)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.decided.set()
            assert self.go.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(store, method, held)
        self.thread = threading.Thread(target=self._run, args=(other,))

    def _run(self, other: Any) -> None:
        try:
            other.sweeper.run_once()
        except BaseException as exc:  # reported by release()
            self.error = exc
            self.decided.set()

    def start(self) -> None:
        self.thread.start()
        assert self.decided.wait(30), "the sweep never reached its write"

    def release(self) -> None:
        self.go.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and self.error is None, self.error


# (trial label, note before the raced save or None, raced note, expected action, from, to,
#  write method of the path)
PATHS = {
    "ask": ("running", None, "loss diverges: PRUNE", "requested", "RUNNING", "PRUNED", "ask"),
    "apply": ("running", None, "loss diverges: PRUNE", "applied", "RUNNING", "PRUNED",
              "transition"),
    "relabel": ("complete", None, "bogus split: FAIL", "applied", "COMPLETE", "FAIL",
                "transition"),
    "undo": ("complete", "bogus split: FAIL", "the split was fine", "applied", "FAIL",
             "COMPLETE", "transition"),
}


@pytest.mark.parametrize(
    "interleaving", ["sweep-between-save-and-apply", "sweep-between-our-decision-and-write",
                     "sweep-decides-first-writes-last"],
)
def test_a_save_the_sweep_raced_keeps_its_answer_source_user_and_note_version(
    storage_url: str, interleaving: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 8, item 9): a note save that raced the sweep answered "nothing to do"
    and its request or audit row said source=sweep with no user. Each path (ask the worker,
    end a running trial, relabel, undo) in this interleaving."""
    for path, (label, before, note, action, from_state, to_state, write) in PATHS.items():
        study, ids = make_study(storage_url, name=path)
        sid, tid = study._study_id, ids[label]
        app = app_for(storage_url, grace=60)
        other = app_for(storage_url, grace=60)  # a second server on the same database
        if path == "ask":
            mark(storage_url, sid, tid)
        if write == "transition" and app.applier.saves_notes:
            # Saved in one transaction with its change (Applier.save): no sweep can see the
            # note before the change, so no sweep can decide on it first.
            if interleaving == "sweep-decides-first-writes-last":
                continue
            write = "save_note"
        version = 1
        if before is not None:
            assert save(app, sid, tid, 1, before, environ=ALICE).outcome["action"] == "applied"
            version = 2
        app.sweeper.run_once()  # nothing left in the queue from before

        held = None
        with monkeypatch.context() as patch:
            if interleaving == "sweep-between-save-and-apply":
                after_the_note_is_saved(app, app.sweeper.run_once)
            elif interleaving == "sweep-between-our-decision-and-write":
                before_our_write(patch, app, write, other.sweeper.run_once)
            else:
                held = HeldSweep(patch, other, write)
                after_the_note_is_saved(app, held.start)
            reply = save(app, sid, tid, version, note, environ=ALICE)
            if held is not None:
                held.release()

        assert reply.status == 204, path
        assert (reply.outcome["action"], reply.outcome["from"], reply.outcome["to"]) == (
            action, from_state, to_state
        ), (path, reply.outcome)
        mine = [r for r in audit(storage_url) if r[0] == tid]
        if path == "ask":
            assert requests(storage_url) == [(tid, "PRUNED", "note-save", "alice", 1)], path
            assert mine == [], path
            study.tell(optuna.Trial(study, tid), state=S.PRUNED)  # the worker ends it
            app.sweeper.run_once()
            other.sweeper.run_once()
            mine = [r for r in audit(storage_url) if r[0] == tid]
        how = "worker" if path == "ask" else "forced"
        assert mine[-1] == (tid, from_state, to_state, "note-save", "alice", version, how), path
        assert len(mine) == version, (path, "one change, one row")
        assert requests(storage_url) == [], path
        assert state(storage_url, tid).name == to_state, path


def test_a_save_whose_request_the_worker_answered_before_the_save_returned_is_requested(
    storage_url: str,
) -> None:
    """The sweep asked, the worker ended the trial and the sweep recorded it, all between the
    dashboard's save and our apply: the audit row is the save's, and so is the answer."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, sid, tid)

    def sweep_worker_sweep() -> None:
        app.sweeper.run_once()
        study.tell(optuna.Trial(study, tid), state=S.PRUNED)
        app.sweeper.run_once()
        assert audit(storage_url) == [(tid, "RUNNING", "PRUNED", "sweep", None, 1, "worker")]

    after_the_note_is_saved(app, sweep_worker_sweep)
    reply = save(app, sid, tid, 1, "PRUNE", environ=ALICE)
    assert (reply.outcome["action"], reply.outcome["to"]) == ("requested", "PRUNED")
    assert "ended the trial" in reply.outcome["reason"]
    assert audit(storage_url) == [(tid, "RUNNING", "PRUNED", "note-save", "alice", 1, "worker")]


@pytest.mark.parametrize("write", ["transition", "settle"])
def test_a_sweep_that_read_a_request_before_the_save_claimed_it_records_nothing_of_its_own(
    storage_url: str, write: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep read its own request, then the save claimed it, then the sweep forced it past
    the deadline ("transition") or recorded the worker's end ("settle"): that write must not
    record the sweep as the actor. The next sweep records the request under the save's name."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=0)  # its requests are past their deadline at once
    other = app_for(storage_url, grace=0)
    mark(storage_url, sid, tid)
    held = HeldSweep(monkeypatch, other, write)

    def sweep_asks_then_reads_the_request() -> None:
        # What this server's sweep does with the note: ask the worker, as source sweep.
        ref, note = app.store.trials([tid])[tid], app.store.notes(sid, [tid])[tid]
        assert app.applier.apply(ref, note, source="sweep").action == "requested"
        if write == "settle":
            study.tell(optuna.Trial(study, tid), state=S.PRUNED)  # the worker heeds it
        held.start()  # the other server's sweep read the request, and waits to write

    after_the_note_is_saved(app, sweep_asks_then_reads_the_request)
    reply = save(app, sid, tid, 1, "PRUNE", environ=ALICE)
    assert reply.outcome["action"] == "requested", reply.outcome
    held.release()
    assert audit(storage_url) == []
    assert requests(storage_url) == [(tid, "PRUNED", "note-save", "alice", 1)]
    other.sweeper.run_once()
    how = "grace" if write == "transition" else "worker"
    assert audit(storage_url) == [(tid, "RUNNING", "PRUNED", "note-save", "alice", 1, how)]
    assert requests(storage_url) == []


def test_a_note_written_outside_the_dashboard_is_still_the_sweeps(storage_url: str) -> None:
    """Claiming is for the note version our save wrote: a script's note stays source=sweep,
    and a later save of the same command does not take it over."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, sid, tid)
    from optuna_dashboard import save_note

    save_note(optuna.Trial(study, tid), "PRUNE")  # a script: version 1
    app.sweeper.run_once()
    assert requests(storage_url) == [(tid, "PRUNED", "sweep", None, 1)]
    reply = save(app, sid, tid, 2, "PRUNE, says alice too", environ=ALICE)
    assert reply.outcome["action"] == "nothing to do"
    assert "already asked" in reply.outcome["reason"]
    assert "written outside this dashboard" in reply.outcome["reason"]
    assert requests(storage_url) == [(tid, "PRUNED", "sweep", None, 1)]


# --- who ended a trial -----------------------------------------------------------------------


def test_decide_names_the_human_who_ended_a_trial_while_it_ran() -> None:
    """Regression (item 11): "its worker ended it" was said of trials a human ended."""
    by_button = LastChange(S.FAIL, False, source="fail-button", user="bob", how="forced",
                           from_state=S.RUNNING)
    d = decide(S.FAIL, C.PRUNE, by_button, retroactive_allowed=True, retroactive_supported=True)
    assert d.action is A.REFUSE
    assert "its worker ended it" not in d.reason
    assert "'bob' with the dashboard's Fail Trial button ended it while RUNNING" in d.reason

    on_request = LastChange(S.PRUNED, False, source="note-save", user="alice", how="worker",
                            from_state=S.RUNNING, note_version=3)
    d = decide(S.PRUNED, C.FAIL, on_request, retroactive_allowed=True,
               retroactive_supported=True)
    assert d.action is A.REFUSE
    assert "its worker ended it while RUNNING, as asked by 'alice' with a note v3" in d.reason

    d = decide(S.PRUNED, C.FAIL, None, retroactive_allowed=True, retroactive_supported=True)
    assert d.action is A.REFUSE and "its worker ended it" in d.reason, "no audit row: worker"

    d = decide(S.FAIL, C.FAIL, by_button, retroactive_allowed=True, retroactive_supported=True)
    assert d.action is A.NOOP
    assert d.reason == ("trial is already FAIL ('bob' with the dashboard's Fail Trial button "
                        "ended it while RUNNING)")


def test_a_prune_after_a_humans_fail_button_is_refused_naming_who_failed_it(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url)
    r = call(app, "POST", f"/api/trials/{tid}/tell", {"state": "Fail"},
             environ={"REMOTE_USER": "bob"})
    assert r.outcome["action"] == "applied"
    r = save(app, sid, tid, 1, "PRUNE", environ=ALICE)
    assert r.outcome["action"] == "refused"
    assert "its worker ended it" not in r.outcome["reason"]
    assert "'bob' with the dashboard's Fail Trial button ended it while RUNNING" in (
        r.outcome["reason"]
    )
    # The buttons say the same before a click.
    got = call(app, "GET", f"/hitl/api/studies/{sid}/{tid}").json()
    assert "'bob' with the dashboard's Fail Trial button" in got["commands"]["PRUNE"]["reason"]
    # A worker's own verdict is still the worker's.
    r = save(app, sid, ids["pruned_by_worker"], 1, "FAIL", environ=ALICE)
    assert "its worker ended it" in r.outcome["reason"]
    assert state(storage_url, tid) is S.FAIL


def test_the_fail_button_says_it_was_the_fail_button(storage_url: str) -> None:
    """Regression (item 11): the Fail Trial button's answer said "FAIL note"."""
    study, ids = make_study(storage_url)
    r = call(app_for(storage_url), "POST", f"/api/trials/{ids['running']}/tell",
             {"state": "Fail"})
    assert r.outcome["action"] == "applied"
    assert r.outcome["reason"] == "Fail Trial button"


# --- a human's later decision wins over an open request --------------------------------------


def test_a_relabel_after_a_request_carries_the_notes_version(storage_url: str) -> None:
    """Regression (item 11): a request's relabel was audited with no note version."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, sid, tid)
    assert save(app, sid, tid, 1, "PRUNE", environ=ALICE).outcome["action"] == "requested"
    study.tell(optuna.Trial(study, tid), 0.3)  # the worker completed it before it checked
    app.sweeper.run_once()
    assert audit(storage_url) == [(tid, "COMPLETE", "PRUNED", "note-save", "alice", 1, "forced")]


def test_a_humans_tell_after_a_request_drops_the_request(storage_url: str) -> None:
    """The tutorial's flow: Prune on a cooperative trial (requested), then the human answers
    the trial's form (tell Complete). The sweep must not relabel it PRUNED afterwards."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, sid, tid)
    assert save(app, sid, tid, 1, "PRUNE", environ=ALICE).outcome["action"] == "requested"
    ref = app.store.trials([tid])[tid]
    outcome = app.applier.human_told(ref, S.COMPLETE, "carol")
    assert outcome is not None and outcome.action == "dropped"
    assert "'carol' told it COMPLETE" in outcome.reason
    assert "'alice' with a note v1 saved in the dashboard" in outcome.reason
    r = call(app, "POST", f"/api/trials/{tid}/tell", {"state": "Complete", "values": [0.3]})
    assert r.status == 204
    app.sweeper.run_once()
    assert state(storage_url, tid) is S.COMPLETE
    assert requests(storage_url) == [] and audit(storage_url) == []
    assert app.applier.human_told(ref, S.COMPLETE, "carol") is None, "nothing open any more"


def test_a_tell_from_someone_who_may_not_act_leaves_the_request(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60, allowed_users=["alice"])
    mark(storage_url, sid, tid)
    assert save(app, sid, tid, 1, "PRUNE", environ=ALICE).outcome["action"] == "requested"
    outcome = app.applier.human_told(app.store.trials([tid])[tid], S.COMPLETE, "mallory")
    assert outcome is not None and outcome.action == "refused"
    assert "'mallory' may not issue commands" in outcome.reason
    assert requests(storage_url) == [(tid, "PRUNED", "note-save", "alice", 1)]


def test_a_tell_complete_in_the_dashboard_after_a_prune_is_not_relabelled(
    storage_url: str,
) -> None:
    """The tutorial's flow end to end, in process: Prune (requested), then the trial's form
    (tell Complete) through the served app; the sweep leaves the trial COMPLETE."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url, grace=60)
    mark(storage_url, sid, tid)
    assert save(app, sid, tid, 1, "PRUNE", environ=ALICE).outcome["action"] == "requested"
    r = call(app, "POST", f"/api/trials/{tid}/tell", {"state": "Complete", "values": [0.3]},
             environ={"REMOTE_USER": "carol"})
    assert r.status == 204
    app.sweeper.run_once()
    assert state(storage_url, tid) is S.COMPLETE
    assert requests(storage_url) == [] and audit(storage_url) == []


# --- commands stand alone --------------------------------------------------------------------


JOINED = ["this layer is PRUNE-able", "NON-PRUNE run", "PRUNE_ME", "FAIL's cause",
          "cfg.PRUNE = 1", "PRUNE.v2", "PRUNE2", "O'FAIL"]
STANDING_ALONE = {
    "loss diverges. PRUNE.": C.PRUNE, "PRUNE: loss diverges": C.PRUNE, "(FAIL)": C.FAIL,
    "**FAIL**": C.FAIL, "'PRUNE'": C.PRUNE, "- PRUNE": C.PRUNE, "PRUNE-": C.PRUNE,
    "PRUNE...": C.PRUNE, "PRUNE!": C.PRUNE, "PRUNE-able, no: FAIL": C.FAIL,
}


def test_a_command_word_must_stand_alone() -> None:
    """Regression (item 11): \\bPRUNE\\b read "PRUNE-able" as a command. A word joined to
    another by -, _, ' or . is prose; punctuation that ends or opens a phrase is not a join."""
    parser = CommandParser()
    assert {note: parser.parse(note) for note in JOINED} == dict.fromkeys(JOINED)
    assert {note: parser.parse(note) for note in STANDING_ALONE} == STANDING_ALONE


def test_a_joined_command_word_leaves_the_trial_alone(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    r = save(app, study._study_id, ids["running"], 1, "layer 3 is PRUNE-able")
    assert r.outcome["action"] == "nothing to do"
    assert state(sqlite_url, ids["running"]) is S.RUNNING


def test_undo_strips_a_standalone_command_and_keeps_joined_words() -> None:
    parser = CommandParser()
    assert parser.strip("PRUNE-able layers.\nPRUNE") == "PRUNE-able layers."
    assert parser.strip("PRUNE-able layers: PRUNE") == "PRUNE-able layers:"


def test_on_a_journal_a_save_the_sweep_raced_keeps_its_source_and_user(tmp_path: Path) -> None:
    """The same race on a journal storage, whose audit lives in study system attrs."""
    url = str(tmp_path / "journal.log")
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(url)))
    tid = study.ask()._trial_id
    app = app_for(url)
    after_the_note_is_saved(app, app.sweeper.run_once)
    reply = save(app, study._study_id, tid, 1, "PRUNE", environ=ALICE)
    assert (reply.outcome["action"], reply.outcome["to"]) == ("applied", "PRUNED")
    [entry] = app.store.audit()
    assert (entry.source, entry.user, entry.note_version) == ("note-save", "alice", 1)
    # And a FAIL after it is refused naming alice, not "its worker".
    reply = save(app, study._study_id, tid, 2, "FAIL", environ=ALICE)
    assert reply.outcome["action"] == "refused"
    assert "'alice' with a note v1 saved in the dashboard ended it" in reply.outcome["reason"]
