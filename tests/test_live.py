"""Live updates in process: the changes feed a page polls, and every process's dashboard cache.

Two apps on one database stand for two gunicorn worker processes: each has its own dashboard
and trial cache, as a forked worker has.
"""

from __future__ import annotations

import datetime
from pathlib import Path
import time
from typing import Any

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import save
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
import pytest
import sqlalchemy as sa

from hitl_pruner import live
from hitl_pruner import ui


def changes(app: Any, study_id: int, since: int | None = None) -> dict[str, Any]:
    query = "" if since is None else f"since={since}"
    r = call(app, "GET", f"/hitl/api/studies/{study_id}/changes",
             environ={"QUERY_STRING": query})
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    return dict(r.json())


def states(app: Any, study_id: int) -> dict[int, str]:
    """trial_id -> state, as the dashboard's study detail answers."""
    r = call(app, "GET", f"/api/studies/{study_id}")
    assert r.status == 200, r.body
    return {t["trial_id"]: t["state"] for t in r.json()["trials"]}


def cached(app: Any, study_id: int) -> Any:
    """The dashboard's cached trial list of the study (None: not cached)."""
    return app.app._inmemory_cache._trials_cache.get(study_id)


def keep_cached(app: Any, study_id: int) -> None:
    """Make the dashboard's copy of the study last, as a big study's (10 s) would."""
    cache = app.app._inmemory_cache
    with cache._trials_cache_lock:
        cache._trials_last_fetched_at[study_id] = datetime.datetime.now() + datetime.timedelta(
            hours=1
        )


def journal_study(tmp_path: Path) -> tuple[str, int, int]:
    """A journal storage with one RUNNING trial: (path, study_id, trial_id)."""
    path = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(path)))
    trial = study.ask()
    return path, study._study_id, trial._trial_id


# -- the changes feed ------------------------------------------------------------------------


def test_the_changes_of_a_study_come_after_since_oldest_first(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    other, other_ids = make_study(storage_url, "other")
    sid = study._study_id
    app = app_for(storage_url)
    start = changes(app, sid)
    assert start == {"study_id": sid, "since": None, "latest": 0, "more": False, "changes": []}

    assert save(app, sid, ids["running"], 1, "PRUNE").status == 204
    assert save(app, other._study_id, other_ids["running"], 1, "FAIL").status == 204
    assert save(app, sid, ids["complete"], 1, "FAIL").status == 204
    got = changes(app, sid, since=0)
    assert got["since"] == 0 and got["more"] is False
    # Only this study's records; the cursor moves past the other study's too.
    assert [(c["trial_id"], c["to_state"]) for c in got["changes"]] == [
        (ids["running"], "PRUNED"), (ids["complete"], "FAIL"),
    ]
    first, last = got["changes"]
    assert set(first) == {"id", "trial_id", "number", "to_state"}
    assert first["number"] == 2 and last["number"] == 0
    assert first["id"] < last["id"] == got["latest"]
    assert changes(app, other._study_id, since=0)["changes"][0]["trial_id"] == other_ids["running"]

    # From the latest on, nothing until the next change; a fresh page starts from there.
    assert changes(app, sid, since=got["latest"])["changes"] == []
    assert changes(app, sid)["latest"] == got["latest"]
    assert changes(app, sid, since=first["id"])["changes"] == [last]
    assert save(app, sid, ids["complete"], 2, "").status == 204  # undo
    undone = changes(app, sid, since=got["latest"])["changes"]
    assert [(c["trial_id"], c["to_state"]) for c in undone] == [(ids["complete"], "COMPLETE")]


def test_a_page_far_behind_gets_the_changes_in_parts(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui, "CHANGES_LIMIT", 2)
    study, ids = make_study(sqlite_url)
    sid = study._study_id
    app = app_for(sqlite_url)
    for label in ("running", "running2", "complete"):
        assert save(app, sid, ids[label], 1, "FAIL").status == 204
    part = changes(app, sid, since=0)
    assert part["more"] is True and len(part["changes"]) == 2
    assert part["latest"] == part["changes"][-1]["id"]
    rest = changes(app, sid, since=part["latest"])
    assert rest["more"] is False
    assert [c["trial_id"] for c in part["changes"] + rest["changes"]] == [
        ids["running"], ids["running2"], ids["complete"]
    ]


@pytest.mark.parametrize(
    "query",
    ["since=", "since=-1", "since=abc", "since=01", "since=1.5", "since=%EF%BC%95",
     f"since={2**63}", "since=1&since=2"],
)
def test_a_bad_since_is_a_json_400_with_the_reason(sqlite_url: str, query: str) -> None:
    make_study(sqlite_url)
    r = call(app_for(sqlite_url), "GET", "/hitl/api/studies/1/changes",
             environ={"QUERY_STRING": query})
    assert r.status == 400
    assert "since must be one integer from 0 to" in r.json()["reason"]


@pytest.mark.parametrize(
    "method, path, status",
    [("POST", "/hitl/api/studies/1/changes", 405),
     ("GET", "/hitl/api/studies/01/changes", 404),
     ("GET", "/hitl/api/studies/%D9%A1/changes", 404)],
)
def test_the_changes_route_is_get_only_with_plain_ids(
    sqlite_url: str, method: str, path: str, status: int
) -> None:
    r = call(app_for(sqlite_url), method, path)
    assert r.status == status and "reason" in r.json()


def test_a_journal_storage_has_changes_too(tmp_path: Path) -> None:
    path, sid, trial_id = journal_study(tmp_path)
    app = app_for(path)
    start = changes(app, sid)
    assert start["latest"] == 0 and start["changes"] == []
    before = time.time()
    assert save(app, sid, trial_id, 1, "PRUNE").status == 204
    got = changes(app, sid, since=0)
    (change,) = got["changes"]
    assert (change["trial_id"], change["number"], change["to_state"]) == (trial_id, 0, "PRUNED")
    # A journal's cursor is the record's time, in microseconds.
    assert before * 1e6 - 1e6 < change["id"] == got["latest"] < time.time() * 1e6 + 1e6
    assert changes(app, sid, since=got["latest"])["changes"] == []
    assert changes(app, sid)["latest"] == got["latest"]


# -- every process's dashboard cache -------------------------------------------------------


def audit_queries(app: Any) -> list[str]:
    """Every statement on hitl_audit the app's engine runs from now on."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "hitl_audit" in statement:
            seen.append(statement)

    sa.event.listen(app.store.engine, "before_cursor_execute", record)
    return seen


def test_a_change_made_in_another_process_is_not_served_from_this_ones_cache(
    storage_url: str,
) -> None:
    """Regression: each gunicorn worker kept its dashboard's copy of a study changed by another
    worker (or a script) until the copy expired, 2 to 10 s, and served the old states."""
    study, ids = make_study(storage_url)
    sid = study._study_id
    one, two = app_for(storage_url), app_for(storage_url)
    assert states(two, sid)[ids["running"]] == "Running"
    keep_cached(two, sid)
    copy = cached(two, sid)
    # Nothing changed: the copy stays, however often the page asks.
    time.sleep(live.CHECK_EVERY)
    assert states(two, sid)[ids["running"]] == "Running"
    assert cached(two, sid) is copy

    assert save(one, sid, ids["running"], 1, "PRUNE").status == 204
    time.sleep(live.CHECK_EVERY)
    assert states(two, sid)[ids["running"]] == "Pruned"
    assert cached(two, sid) is not copy


def test_a_changes_poll_also_refreshes_the_changed_trial_in_the_processs_cache(
    sqlite_url: str,
) -> None:
    study, ids = make_study(sqlite_url)
    sid = study._study_id
    one, two = app_for(sqlite_url), app_for(sqlite_url)
    states(two, sid)
    keep_cached(two, sid)
    copy = cached(two, sid)
    assert save(one, sid, ids["running"], 1, "PRUNE").status == 204
    time.sleep(live.CHECK_EVERY)
    assert [c["to_state"] for c in changes(two, sid, since=0)["changes"]] == ["PRUNED"]
    # Only the changed trial was read again; the others are the objects cached before.
    fresh = {t._trial_id: t for t in cached(two, sid)}
    assert fresh[ids["running"]].state.name == "PRUNED"
    assert all(fresh[t._trial_id] is t for t in copy if t._trial_id != ids["running"])


def test_a_change_made_here_is_in_the_dashboards_next_answer_without_reading_the_study_whole(
    sqlite_url: str,
) -> None:
    """The process that changed a trial reads that trial again, not the whole study (which costs
    seconds of CPU on a study of 10k trials), before its dashboard answers next."""
    study, ids = make_study(sqlite_url)
    sid = study._study_id
    app = app_for(sqlite_url)
    states(app, sid)
    keep_cached(app, sid)
    copy = cached(app, sid)
    assert save(app, sid, ids["running"], 1, "PRUNE").status == 204
    assert states(app, sid)[ids["running"]] == "Pruned"
    assert all(a is b for a, b in zip(cached(app, sid), copy) if a._trial_id != ids["running"])


def test_a_journal_change_made_in_another_process_is_not_served_from_this_ones_cache(
    tmp_path: Path,
) -> None:
    path, sid, trial_id = journal_study(tmp_path)
    one, two = app_for(path), app_for(path)
    assert states(two, sid)[trial_id] == "Running"
    keep_cached(two, sid)
    assert save(one, sid, trial_id, 1, "FAIL").status == 204
    time.sleep(live.CHECK_EVERY)
    assert states(two, sid)[trial_id] == "Fail"


def test_the_process_looks_for_changes_once_per_interval_with_one_query(sqlite_url: str) -> None:
    """The study detail poll must pass through at the bare dashboard's pace: most requests
    make no query of ours, and a look when nothing changed is one primary-key query."""
    study, ids = make_study(sqlite_url)
    sid = study._study_id
    app = app_for(sqlite_url)
    queries = audit_queries(app)
    started = time.monotonic()
    for _ in range(5):
        states(app, sid)
    elapsed = time.monotonic() - started
    assert 1 <= len(queries) <= 1 + elapsed / live.CHECK_EVERY, queries
    assert "max(hitl_audit.id)" in queries[0]
    # Routes that do not read the dashboard's trial cache never look.
    time.sleep(live.CHECK_EVERY)
    del queries[:]
    for path in ("/api/studies", "/api/meta", "/dashboard", "/hitl/static/hitl.js"):
        call(app, "GET", path)
    assert queries == []
