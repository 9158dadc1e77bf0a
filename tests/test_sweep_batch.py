"""The sweep applies many notes in a few statements (Applier.apply_many), still exactly once."""

from __future__ import annotations

import collections
import datetime
import json
import threading
from typing import Any

from helpers import app_for
from helpers import make_study
from helpers import rows
from helpers import save
import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
from optuna_dashboard import save_note
import sqlalchemy as sa

from hitl_pruner.audit import AuditEntry

trials_t: sa.Table = models.TrialModel.__table__  # type: ignore[assignment]
values_t: sa.Table = models.TrialValueModel.__table__  # type: ignore[assignment]
attrs_t: sa.Table = models.StudySystemAttributeModel.__table__  # type: ignore[assignment]

# The budget for a sweep of 100 changed notes.
MAX_STATEMENTS = 15


def bulk_study(url: str, running: int, complete: int) -> tuple[int, list[int], list[int]]:
    """A study of ``running`` RUNNING trials and ``complete`` COMPLETE ones, inserted in bulk;
    returns (study id, RUNNING ids, COMPLETE ids)."""
    storage = RDBStorage(url)
    study_id = optuna.create_study(study_name="batch", storage=storage)._study_id
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    states = [TrialState.RUNNING] * running + [TrialState.COMPLETE] * complete
    with storage.engine.begin() as conn:
        conn.execute(sa.insert(trials_t), [
            {"number": i, "study_id": study_id, "state": state, "datetime_start": now,
             "datetime_complete": now if state == TrialState.COMPLETE else None}
            for i, state in enumerate(states)
        ])
        ids = list(conn.execute(
            sa.select(trials_t.c.trial_id).where(trials_t.c.study_id == study_id)
            .order_by(trials_t.c.number)
        ).scalars())
        finite = models.TrialValueModel.TrialValueType.FINITE
        if complete:
            conn.execute(sa.insert(values_t), [
                {"trial_id": tid, "objective": 0, "value": 0.5, "value_type": finite}
                for tid in ids[running:]
            ])
    storage.engine.dispose()
    return study_id, ids[:running], ids[running:]


def write_notes(url: str, study_id: int, notes: dict[int, str]) -> None:
    """Write version 1 of each note straight into the table, as a script would; the trigger
    queues them."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.insert(attrs_t), [
            row for tid, body in notes.items() for row in (
                {"study_id": study_id, "key": f"dashboard:{tid}:note_ver", "value_json": "1"},
                {"study_id": study_id, "key": f"dashboard:{tid}:note_str:0",
                 "value_json": json.dumps(body)},
            )
        ])
    engine.dispose()


def audit_by_trial(url: str) -> dict[int, list[tuple[str, str, bool]]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT trial_id, from_state, to_state, retroactive FROM hitl_audit ORDER BY id"
        )).all()
    engine.dispose()
    found: dict[int, list[tuple[str, str, bool]]] = collections.defaultdict(list)
    for tid, from_state, to_state, retroactive in rows:
        found[tid].append((from_state, to_state, bool(retroactive)))
    return found


def states(url: str, ids: list[int]) -> dict[int, str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(trials_t.c.trial_id, trials_t.c.state).where(trials_t.c.trial_id.in_(ids))
        ).all()
    engine.dispose()
    return {tid: state.name for tid, state in rows}


class Statements:
    """Counts the SQL statements an engine sends (an executemany counts once)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sent: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(statement)

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self)


def test_100_changed_notes_are_applied_in_at_most_15_statements_with_one_audit_row_each(
    storage_url: str,
) -> None:
    """Regression: the sweep spent three statements and a commit per trial (307 statements for
    100 notes). Now the facts are read and the changes written for the whole batch: PRUNE on
    RUNNING trials and retroactive FAIL on COMPLETE ones alike."""
    study_id, running, complete = bulk_study(storage_url, 50, 50)
    app = app_for(storage_url)
    app.sweeper.run_once()
    notes = {tid: "PRUNE: diverged" for tid in running}
    notes.update({tid: "FAIL: bad split" for tid in complete})
    write_notes(storage_url, study_id, notes)
    cleared: list[int] = []
    app.applier._on_change = lambda study_id, entries: cleared.append(study_id)

    with Statements(app.store.engine) as statements:
        stats = app.sweeper.run_once()

    assert stats.applied == 100 and stats.trials == 100
    assert len(statements.sent) <= MAX_STATEMENTS, "\n".join(statements.sent)
    assert set(states(storage_url, running).values()) == {"PRUNED"}
    assert set(states(storage_url, complete).values()) == {"FAIL"}
    audit = audit_by_trial(storage_url)
    assert {tid: audit[tid] for tid in running} == {
        tid: [("RUNNING", "PRUNED", False)] for tid in running
    }
    assert {tid: audit[tid] for tid in complete} == {
        tid: [("COMPLETE", "FAIL", True)] for tid in complete
    }
    assert cleared == [study_id]  # the dashboard's cache of the study, forgotten once
    assert app.sweeper.run_once().changes == 0


def test_a_trial_that_changed_under_the_batch_is_decided_again_and_the_others_applied(
    storage_url: str,
) -> None:
    """The batch's compare-and-set finds one trial no longer RUNNING (its worker completed it
    between our read and our write): nothing of the batch is written, the others are applied
    one at a time, and that one is decided again on its new state (a retroactive relabel)."""
    study_id, running, _ = bulk_study(storage_url, 10, 0)
    app = app_for(storage_url)
    app.sweeper.run_once()
    write_notes(storage_url, study_id, {tid: "PRUNE" for tid in running})
    moved = running[3]
    real = app.store.transition_many
    batches: list[list[AuditEntry]] = []

    def completed_meanwhile(entries: list[AuditEntry]) -> list[AuditEntry]:
        batches.append(list(entries))
        if len(batches) == 1:
            engine = sa.create_engine(storage_url)
            with engine.begin() as conn:
                conn.execute(sa.update(trials_t).where(trials_t.c.trial_id == moved)
                             .values(state=TrialState.COMPLETE))
            engine.dispose()
        return real(entries)

    app.store.transition_many = completed_meanwhile

    stats = app.sweeper.run_once()

    assert [len(b) for b in batches] == [10]
    assert stats.applied == 10
    assert set(states(storage_url, running).values()) == {"PRUNED"}
    audit = audit_by_trial(storage_url)
    assert audit[moved] == [("COMPLETE", "PRUNED", True)]
    assert {tid: audit[tid] for tid in running if tid != moved} == {
        tid: [("RUNNING", "PRUNED", False)] for tid in running if tid != moved
    }
    assert app.sweeper.run_once().changes == 0


def test_two_servers_sweeping_at_once_apply_each_note_exactly_once(storage_url: str) -> None:
    study_id, running, complete = bulk_study(storage_url, 30, 30)
    apps = [app_for(storage_url), app_for(storage_url)]
    apps[0].sweeper.run_once()
    notes = {tid: "FAIL" for tid in running}
    notes.update({tid: "PRUNE" for tid in complete})
    write_notes(storage_url, study_id, notes)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def sweep(app: Any) -> None:
        try:
            barrier.wait()
            app.sweeper.run_once()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(app,)) for app in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    audit = audit_by_trial(storage_url)
    assert {tid: len(audit[tid]) for tid in notes} == {tid: 1 for tid in notes}
    assert set(states(storage_url, running).values()) == {"FAIL"}
    assert set(states(storage_url, complete).values()) == {"PRUNED"}


def test_a_batch_reads_notes_of_every_length(storage_url: str) -> None:
    """Short notes come in the first query; a note of many chunks (its command at the end)
    and one shrunk to a shorter version (its old chunks blanked) are read whole."""
    study_id, running, _ = bulk_study(storage_url, 4, 0)
    app = app_for(storage_url)
    app.sweeper.run_once()
    storage = RDBStorage(storage_url)
    study = optuna.load_study(study_name="batch", storage=storage)
    bodies = {
        running[0]: "PRUNE",
        running[1]: "x" * 2044 + " PRUNE",
        running[2]: "y" * (12 * 2045) + " FAIL",
        running[3]: "z" * (3 * 2045),
    }
    for tid, body in bodies.items():
        save_note(optuna.Trial(study, tid), body)
    save_note(optuna.Trial(study, running[3]), "FAIL")  # chunks 1 and 2 blanked
    assert app.sweeper.run_once().applied == 4
    assert states(storage_url, running) == {
        running[0]: "PRUNED", running[1]: "PRUNED", running[2]: "FAIL", running[3]: "FAIL",
    }
    storage.engine.dispose()


def test_a_note_save_racing_a_held_batch_is_applied_once_under_the_saves_name(
    storage_url: str,
) -> None:
    """Another server's sweep reads two notes written by a script and decides, then stops
    before its batch write; meanwhile a human saves the next version of one of them through us,
    which applies it. The batch then writes nothing, the other trial is applied by the sweep
    and the saved one is decided again (nothing to do): one audit row each, the saved one under
    the save's source and user."""
    study, ids = make_study(storage_url)
    sid, saved, scripted = study._study_id, ids["running"], ids["running2"]
    app, other = app_for(storage_url), app_for(storage_url)
    app.sweeper.run_once()
    save_note(optuna.Trial(study, scripted), "PRUNE")
    save_note(optuna.Trial(study, saved), "PRUNE")
    decided, go = threading.Event(), threading.Event()
    real = other.store.transition_many

    def held(entries: list[AuditEntry]) -> list[AuditEntry]:
        decided.set()
        assert go.wait(30)
        return real(entries)

    other.store.transition_many = held
    sweep = threading.Thread(target=other.sweeper.run_once)
    sweep.start()
    assert decided.wait(30), "the other sweep never reached its write"
    reply = save(app, sid, saved, 2, "loss diverges: PRUNE", environ={"REMOTE_USER": "alice"})
    go.set()
    sweep.join(30)
    assert reply.status == 204 and reply.outcome["action"] == "applied", reply.outcome
    found = [
        (r.trial_id, r.from_state, r.to_state, r.source, r.user_name)
        for r in rows(storage_url, "SELECT * FROM hitl_audit ORDER BY trial_id")
    ]
    assert found == sorted([
        (saved, "RUNNING", "PRUNED", "note-save", "alice"),
        (scripted, "RUNNING", "PRUNED", "sweep", None),
    ])
