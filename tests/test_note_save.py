"""A note saved through us on an RDB storage: our store writes it as the dashboard's note API
would, in one transaction, and a note that forces a state carries the change in that same
transaction (Applier.save, SqlStore.save_note)."""

from __future__ import annotations

import threading
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
import optuna_dashboard
from optuna_dashboard._note import get_note_from_system_attrs
import pytest
import sqlalchemy as sa

from tests.helpers import app_for
from tests.helpers import audit_rows
from tests.helpers import make_study
from tests.helpers import rows
from tests.helpers import save
from tests.helpers import state


def stored_note(url: str, study_id: int, trial_id: int) -> dict[str, Any]:
    """The note as the dashboard reads it."""
    attrs = RDBStorage(url).get_study_system_attrs(study_id)
    return dict(get_note_from_system_attrs(attrs, trial_id))


def queued(url: str) -> int:
    return rows(url, "SELECT COUNT(*) FROM hitl_note_changes")[0][0]


class Commits:
    """Transactions committed on an engine while counting."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "commit", self._commit)
        self._engine = engine

    def _commit(self, conn: Any) -> None:
        self.count += 1

    def close(self) -> None:
        sa.event.remove(self._engine, "commit", self._commit)


@pytest.mark.parametrize(
    ("label", "before", "text", "from_state", "to_state"),
    [
        pytest.param("running", None, "loss diverges\nPRUNE", "RUNNING", "PRUNED", id="prune"),
        pytest.param("complete", None, "bogus split: FAIL", "COMPLETE", "FAIL", id="relabel"),
        pytest.param("complete", "bogus split: FAIL", "the split was fine", "FAIL", "COMPLETE",
                     id="undo"),
    ],
)
def test_a_note_that_forces_a_state_is_one_transaction_and_never_reaches_the_sweep(
    storage_url: str, label: str, before: str | None, text: str, from_state: str, to_state: str
) -> None:
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids[label]
    app = app_for(storage_url)
    version = 1
    if before is not None:
        assert save(app, sid, tid, 1, before).outcome["action"] == "applied"
        version = 2
    app.sweeper.run_once()
    commits = Commits(app.store.engine)
    try:
        reply = save(app, sid, tid, version, text)
    finally:
        commits.close()
    assert reply.status == 204 and reply.outcome["action"] == "applied", reply.outcome
    assert (reply.outcome["from"], reply.outcome["to"]) == (from_state, to_state)
    assert commits.count == 1
    assert state(storage_url, tid).name == to_state
    assert stored_note(storage_url, sid, tid) == {"version": version, "body": text}
    row = audit_rows(storage_url)[-1]
    assert (row.trial_id, row.from_state, row.to_state, row.source, row.note_version) == (
        tid, from_state, to_state, "note-save", version
    )
    assert queued(storage_url) == 0
    assert app.sweeper.run_once().applied == 0


def test_a_plain_note_is_one_commit_and_reads_back_as_the_dashboard_wrote_it(
    storage_url: str,
) -> None:
    """Long notes span several system attrs; a shorter one after it empties the rest, as the
    dashboard does, so the dashboard reads each text back exactly."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["complete"]
    app = app_for(storage_url)
    texts = ["é" * 5000 + "\nend", "short, fine", "", "🙂" * 2046]
    for version, text in enumerate(texts, start=1):
        commits = Commits(app.store.engine)
        try:
            reply = save(app, sid, tid, version, text)
        finally:
            commits.close()
        assert reply.status == 204 and reply.outcome["action"] == "nothing to do", reply.body
        assert commits.count == 1
        assert stored_note(storage_url, sid, tid) == {"version": version, "body": text}
    assert state(storage_url, tid) is TrialState.COMPLETE and audit_rows(storage_url) == []


def test_a_save_of_another_version_gets_the_dashboards_own_409_and_saves_nothing(
    storage_url: str,
) -> None:
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url)
    bare = optuna_dashboard.wsgi(RDBStorage(storage_url))
    assert save(app, sid, tid, 1, "first").status == 204
    for version in (1, 3):
        ours, theirs = save(app, sid, tid, version, "PRUNE"), save(bare, sid, tid, version, "PRUNE")
        assert (ours.status, ours.json()) == (theirs.status, theirs.json()) == (
            409, {"reason": theirs.json()["reason"], "note": {"version": 1, "body": "first"}}
        )
    assert save(app, sid, ids["running2"], 2, "PRUNE").json()["note"] == {"version": 0, "body": ""}
    assert state(storage_url, tid) is TrialState.RUNNING and audit_rows(storage_url) == []
    assert stored_note(storage_url, sid, tid) == {"version": 1, "body": "first"}


def test_saves_of_one_version_at_once_save_exactly_one(storage_url: str) -> None:
    """The dashboard reads the version and writes later, so two editors can both pass its
    check; ours is a compare-and-set on the version row."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["complete"]
    app = app_for(storage_url)
    assert save(app, sid, tid, 1, "v1").status == 204
    start = threading.Barrier(6)
    replies: dict[str, int] = {}

    def editor(name: str) -> None:
        start.wait()
        replies[name] = save(app, sid, tid, 2, name).status

    threads = [threading.Thread(target=editor, args=(f"editor {i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [name for name, status in replies.items() if status == 204]
    assert len(replies) == 6 and len(winners) == 1, replies
    assert set(replies.values()) == {204, 409}
    assert stored_note(storage_url, sid, tid) == {"version": 2, "body": winners[0]}


def test_a_trial_that_ends_between_our_decision_and_our_write_keeps_the_note_and_its_end(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker ends the trial after we decided to force it: the combined write loses its
    compare-and-set and writes nothing, the note is saved alone, and is decided again."""
    study, ids = make_study(storage_url)
    sid, tid = study._study_id, ids["running"]
    app = app_for(storage_url)
    store = app.applier.store
    real = store.save_note
    calls: list[bool] = []

    def worker_ends_it_first(ref: Any, note: Any, entry: Any = None) -> Any:
        calls.append(entry is not None)
        if entry is not None:
            study.tell(optuna.Trial(study, tid), state=TrialState.PRUNED)
        return real(ref, note, entry)

    monkeypatch.setattr(store, "save_note", worker_ends_it_first)
    reply = save(app, sid, tid, 1, "FAIL")
    assert calls == [True, False]
    # Decided again on the trial as it is now: its worker ended it, which a note cannot undo.
    assert reply.status == 204 and reply.outcome["action"] == "refused", reply.outcome
    assert "its worker ended it" in reply.outcome["reason"]
    assert state(storage_url, tid) is TrialState.PRUNED and audit_rows(storage_url) == []
    assert stored_note(storage_url, sid, tid) == {"version": 1, "body": "FAIL"}
    assert queued(storage_url) == 0  # answered: the sweep has nothing left to decide
