"""The Human actions view for real studies, in process against real databases: its filters,
keyset pages, CSV download and links (GET /hitl/api/actions and /hitl/api/actions.csv)."""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path
from typing import Any

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import save
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import pytest
import sqlalchemy as sa

from hitl_pruner.audit import NOTE_SAVE
from hitl_pruner.audit import AuditEntry
from hitl_pruner.journal import AUDIT_PREFIX
from hitl_pruner.prefix import ProxyMiddleware
from hitl_pruner.rdb import AUDIT_LISTING_INDEXES
from hitl_pruner.rdb import SqlStore
from hitl_pruner.rdb import _audit_row
from hitl_pruner.rdb import audit_t
from hitl_pruner.store import AuditFilter
from hitl_pruner.ui import CSV_COLUMNS


def listed(app: Any, query: str = "", **environ: Any) -> dict[str, Any]:
    r = call(app, "GET", "/hitl/api/actions", environ={"QUERY_STRING": query, **environ})
    assert r.status == 200, r.body
    return r.json()


def entry(study_id: int, trial_id: int, number: int, *, user: str | None = "ann",
          study_name: str = "s", to: TrialState = TrialState.PRUNED,
          at: datetime.datetime | None = None) -> AuditEntry:
    return AuditEntry(
        study_id=study_id, study_name=study_name, trial_id=trial_id, trial_number=number,
        from_state=TrialState.RUNNING, to_state=to, note_version=1, user=user,
        source=NOTE_SAVE, retroactive=False, undo=False,
        **({"at": at} if at is not None else {}),
    )


def insert(url: str, entries: list[AuditEntry]) -> list[int]:
    """Audit rows written as the applier writes them, in one go; returns their ids."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            newest = conn.execute(sa.select(sa.func.max(audit_t.c.id))).scalar() or 0
            conn.execute(sa.insert(audit_t), [_audit_row(e) for e in entries])
            return list(conn.execute(
                sa.select(audit_t.c.id).where(audit_t.c.id > newest).order_by(audit_t.c.id)
            ).scalars())
    finally:
        engine.dispose()


# -- filters ---------------------------------------------------------------------------------


@pytest.fixture
def history(storage_url: str) -> tuple[Any, dict[str, int], dict[str, int]]:
    """Two studies and six human actions of every kind; returns the app, the studies' ids and
    the actions' audit ids by label."""
    a, ta = make_study(storage_url, "a")
    b, tb = make_study(storage_url, "b")
    app = app_for(storage_url)
    sa_, sb = a._study_id, b._study_id
    alice, bob, carol = ({"REMOTE_USER": u} for u in ("alice", "bob", "carol"))
    assert save(app, sa_, ta["running"], 1, "PRUNE", environ=alice).outcome["action"] == "applied"
    assert save(app, sa_, ta["complete"], 1, "FAIL", environ=bob).outcome["action"] == "applied"
    assert save(app, sb, tb["complete"], 1, "PRUNE", environ=alice).outcome["action"] == "applied"
    assert save(app, sb, tb["waiting"], 1, "FAIL", environ=bob).outcome["action"] == "applied"
    relabel = listed(app, f"study={sa_}&action=relabel")["actions"][0]["id"]
    undone = call(app, "POST", f"/hitl/api/actions/{relabel}/undo", {}, environ=carol)
    assert undone.status == 200, undone.body
    assert save(app, sb, tb["running"], 1, "PRUNE").outcome["action"] == "applied"  # no user
    ids = [a["id"] for a in listed(app)["actions"]][::-1]
    labels = ["a-prune-alice", "a-relabel-fail-bob", "b-relabel-prune-alice", "b-fail-bob",
              "a-undo-carol", "b-prune-nobody"]
    return app, {"a": sa_, "b": sb}, dict(zip(labels, ids))


FILTERS = [
    ("", ["b-prune-nobody", "a-undo-carol", "b-fail-bob", "b-relabel-prune-alice",
          "a-relabel-fail-bob", "a-prune-alice"]),
    ("study={a}", ["a-undo-carol", "a-relabel-fail-bob", "a-prune-alice"]),
    ("study={b}", ["b-prune-nobody", "b-fail-bob", "b-relabel-prune-alice"]),
    ("study={a}&trial=0", ["a-undo-carol", "a-relabel-fail-bob"]),  # trial 0: "complete"
    ("study={b}&trial=2", ["b-prune-nobody"]),  # trial 2: "running"
    ("user=alice", ["b-relabel-prune-alice", "a-prune-alice"]),
    ("user=bob", ["b-fail-bob", "a-relabel-fail-bob"]),
    ("user=nobody", []),
    ("action=prune", ["b-prune-nobody", "b-relabel-prune-alice", "a-prune-alice"]),
    ("action=fail", ["b-fail-bob", "a-relabel-fail-bob"]),
    ("action=relabel", ["b-relabel-prune-alice", "a-relabel-fail-bob"]),
    ("action=undo", ["a-undo-carol"]),
    # combined
    ("study={a}&user=bob&action=relabel", ["a-relabel-fail-bob"]),
    ("study={b}&action=prune&user=alice", ["b-relabel-prune-alice"]),
    ("study={b}&user=alice&action=fail", []),
    ("study={a}&trial=0&action=undo&user=carol", ["a-undo-carol"]),
    # empty fields of a form are no filter
    ("study=&trial=&user=&action=", ["b-prune-nobody", "a-undo-carol", "b-fail-bob",
                                     "b-relabel-prune-alice", "a-relabel-fail-bob",
                                     "a-prune-alice"]),
]


def test_each_filter_and_their_combinations_list_exactly_the_matching_actions(
    history: tuple[Any, dict[str, int], dict[str, int]],
) -> None:
    app, studies, ids = history
    name_of = {v: k for k, v in ids.items()}
    for query, expected in FILTERS:
        page = listed(app, query.format(**studies))
        got = [name_of[a["id"]] for a in page["actions"]]
        assert got == expected, query
        assert page["next"] is None, query


def test_the_filter_is_echoed_and_a_hidden_newer_action_still_blocks_undo(
    history: tuple[Any, dict[str, int], dict[str, int]],
) -> None:
    """Undo is offered only on a trial's newest action of the whole audit: a filter that
    leaves the newer undo off the page must not make the undone relabel undoable again."""
    app, studies, ids = history
    page = listed(app, f"study={studies['a']}&action=relabel&user=bob")
    assert page["filter"] == {"study": studies["a"], "trial": None, "user": "bob",
                              "action": "relabel"}
    [relabel] = page["actions"]
    assert relabel["id"] == ids["a-relabel-fail-bob"]
    assert relabel["undoable"] is False
    assert relabel["undo_refused"] == "a newer action changed this trial"
    [other] = listed(app, "action=relabel&user=alice")["actions"]
    assert other["undoable"] is True and other["undo_refused"] is None


def test_filters_work_on_a_journal_storage(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="j", storage=JournalStorage(JournalFileBackend(path)))
    running = [study.ask()._trial_id for _ in range(3)]
    app = app_for(path)
    sid = study._study_id
    save(app, sid, running[0], 1, "PRUNE", environ={"REMOTE_USER": "ann"})
    save(app, sid, running[1], 1, "FAIL", environ={"REMOTE_USER": "bob"})
    save(app, sid, running[2], 1, "PRUNE", environ={"REMOTE_USER": "bob"})
    assert [a["trial_id"] for a in listed(app, "user=bob")["actions"]] == running[2:0:-1]
    assert [a["trial_id"] for a in listed(app, "action=fail")["actions"]] == [running[1]]
    assert [a["trial_id"] for a in listed(app, f"study={sid}&trial=0")["actions"]] == [
        running[0]
    ]
    assert listed(app, f"study={sid + 1}")["actions"] == []


# -- keyset pages ----------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "study={sid}", "user=ann&action=prune"])
def test_pages_walk_every_action_once_while_new_ones_arrive(storage_url: str, query: str) -> None:
    """Keyset pagination: each page starts below the last one's cursor, so actions written
    during the walk (newer than every cursor) neither repeat nor push a row off a page."""
    study, _ = make_study(storage_url, "p")
    other, _ = make_study(storage_url, "q")
    app = app_for(storage_url)
    sid = study._study_id
    rows = [
        entry(s, 1000 + i, i, user=("ann" if i % 3 else "bob"),
              to=(TrialState.PRUNED if i % 4 else TrialState.FAIL))
        for i in range(260) for s in ((sid,) if i % 2 else (other._study_id,))
    ]
    ids = insert(storage_url, rows)
    filtered = listed(app, query.format(sid=sid) + "&limit=1000")["actions"]
    wanted = [a["id"] for a in filtered]
    assert 50 < len(wanted) <= 260 and wanted == sorted(wanted, reverse=True)
    assert set(wanted) <= set(ids)

    walked: list[int] = []
    cursor: int | None = None
    pages = 0
    while True:
        q = query.format(sid=sid) + "&limit=37" + (f"&before={cursor}" if cursor else "")
        page = listed(app, q)
        walked += [a["id"] for a in page["actions"]]
        pages += 1
        # Meanwhile others act: newer actions, some of them matching the filter.
        insert(storage_url, [entry(sid, 5000 + pages, pages), entry(other._study_id, 6000, 1)])
        cursor = page["next"]
        if cursor is None:
            break
        assert len(page["actions"]) == 37
    assert walked == wanted
    assert pages == -(-len(wanted) // 37)
    # The first page, asked again, starts with the newest of them.
    newest = listed(app, query.format(sid=sid) + "&limit=1")["actions"][0]["id"]
    assert newest > max(wanted)


def test_journal_pages_keep_actions_of_one_microsecond_together(tmp_path: Path) -> None:
    """A journal's cursor is a record's time: records of the same microsecond go on one page,
    so none falls between two pages."""
    path = str(tmp_path / "journal.log")
    storage = JournalStorage(JournalFileBackend(path))
    study = optuna.create_study(study_name="j", storage=storage)
    sid = study._study_id
    base = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    times = [0, 1, 1, 1, 2, 3, 3, 4]  # microseconds after base
    for i, us in enumerate(times):
        at = base + datetime.timedelta(microseconds=us)
        storage.set_study_system_attr(
            sid, f"{AUDIT_PREFIX}{i}:{i}", entry(sid, 100 + i, i, at=at).to_json()
        )
    app = app_for(path)
    walked: list[int] = []
    sizes = []
    cursor = None
    while True:
        page = listed(app, "limit=2" + (f"&before={cursor}" if cursor is not None else ""))
        walked += [a["trial_id"] for a in page["actions"]]
        sizes.append(len(page["actions"]))
        cursor = page["next"]
        if cursor is None:
            break
    assert sorted(walked) == [100 + i for i in range(len(times))]
    assert len(set(walked)) == len(walked)
    # Newest first, by microsecond: 4 3 3 | 2 1 1 1 | 0 (each page runs on to its
    # microsecond's end).
    assert sizes == [3, 4, 1]


# -- bad parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, query, reason",
    [
        ("", "study=x", "study must be a study id, an integer from 0 to"),
        ("", "study=-1", "study must be a study id"),
        ("", "study=01", "study must be a study id"),
        ("", "study=%EF%BC%95", "study must be a study id"),  # a fullwidth 5
        ("", "study=9223372036854775808", "study must be a study id"),
        ("", "trial=3", "trial needs study: trial numbers count within a study"),
        ("", "study=1&trial=1.5", "trial must be a trial number"),
        ("", "user=" + "u" * 257, "user must be at most 256 characters, not 257"),
        ("", "action=delete",
         "action must be one of prune, fail, relabel, undo, stop, not 'delete'"),
        ("", "action=PRUNE", "action must be one of"),
        ("", "before=abc", "before must be a cursor"),
        ("", "before=12&before=13", "give before once, not 2 times"),
        ("", "study=1&study=2", "give study once"),
        ("", "studdy=1", "unknown parameter 'studdy'; this takes study, trial, user, action"),
        ("", "limit=0", "limit must be an integer from 1 to 1000"),
        ("", "limit=1001", "limit must be an integer from 1 to 1000"),
        ("", "limit=99999999999999999999", "limit must be an integer from 1 to 1000"),
        (".csv", "limit=5", "unknown parameter 'limit' (the CSV has every matching action)"),
        (".csv", "action=x", "action must be one of"),
    ],
)
def test_a_bad_parameter_is_a_400_that_says_why(
    sqlite_url: str, path: str, query: str, reason: str
) -> None:
    r = call(app_for(sqlite_url), "GET", f"/hitl/api/actions{path}",
             environ={"QUERY_STRING": query})
    assert r.status == 400, r.body
    assert r.headers["Content-Type"] == "application/json"
    assert reason in r.json()["reason"], r.json()


def test_the_csv_route_takes_only_get(sqlite_url: str) -> None:
    r = call(app_for(sqlite_url), "POST", "/hitl/api/actions.csv")
    assert r.status == 405 and r.headers["Allow"] == "GET"


# -- CSV -------------------------------------------------------------------------------------


def read_csv(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))


def test_the_csv_has_every_matching_action_quoted_and_formula_safe(storage_url: str) -> None:
    """Names a user or a script chose are data, never a spreadsheet formula: a cell that
    starts with = + - @ (or a tab or CR) gets a leading ', and commas, quotes and line breaks
    are quoted as RFC 4180 says."""
    study, ids = make_study(storage_url, '=HYPERLINK("http://evil.example/?x"),"x"')
    app = app_for(storage_url)
    sid = study._study_id
    users = ["=cmd|' /C calc'!A0", "+1+2", "-2+3", "@SUM(1)", '\tann, "the" boss\nline 2',
             "plain ann"]
    rows = insert(storage_url, [
        entry(sid, ids["complete"], 0, user=u, study_name=study.study_name) for u in users
    ])
    r = call(app, "GET", "/hitl/api/actions.csv", environ={"QUERY_STRING": f"study={sid}"})
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    disposition = f'attachment; filename="hitl-actions-study-{sid}.csv"'
    assert r.headers["Content-Disposition"] == disposition
    assert "Content-Length" not in r.headers  # streamed
    assert b"\r\n" in r.body and not r.body.replace(b"\r\n", b"").count(b"\n") > 1
    table = read_csv(r.body)
    assert tuple(table[0]) == CSV_COLUMNS
    got = [dict(zip(table[0], row)) for row in table[1:]]
    assert [int(g["id"]) for g in got] == rows[::-1]
    assert [g["user"] for g in got] == [
        "plain ann", '\'\tann, "the" boss\nline 2', "'@SUM(1)", "'-2+3", "'+1+2",
        "'=cmd|' /C calc'!A0",
    ]
    assert {g["study_name"] for g in got} == {"'" + study.study_name}
    first = got[0]
    assert (first["study_id"], first["trial_id"], first["trial_number"]) == (
        str(sid), str(ids["complete"]), "0"
    )
    assert (first["from"], first["to"], first["retroactive"], first["undo"]) == (
        "RUNNING", "PRUNED", "false", "false"
    )
    assert first["state_now"] == "COMPLETE" and first["note_version"] == "1"
    assert datetime.datetime.fromisoformat(first["time"]).tzinfo is not None


def test_the_csv_is_streamed_in_chunks_and_filters_like_the_api(storage_url: str) -> None:
    study, ids = make_study(storage_url, "big")
    sid = study._study_id
    app = app_for(storage_url)
    insert(storage_url, [
        entry(sid, ids["complete"], 0, user=("bob" if i % 5 == 0 else "ann")) for i in range(2500)
    ])
    captured: dict[str, Any] = {}
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/hitl/api/actions.csv", "QUERY_STRING": "",
        "SERVER_NAME": "test", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO(),
    }
    result = app(environ, lambda status, headers, exc_info=None: captured.update(s=status))
    chunks = list(result)
    assert captured["s"] == "200 OK"
    assert len(chunks) == 3  # 1000 rows a chunk: read and sent a page at a time
    table = read_csv(b"".join(chunks))
    assert len(table) == 2501
    ids_seen = [int(row[0]) for row in table[1:]]
    assert ids_seen == sorted(set(ids_seen), reverse=True)

    r = call(app, "GET", "/hitl/api/actions.csv", environ={"QUERY_STRING": "user=bob"})
    bobs = read_csv(r.body)[1:]
    assert len(bobs) == 500 and {row[CSV_COLUMNS.index("user")] for row in bobs} == {"bob"}
    assert r.headers["Content-Disposition"] == 'attachment; filename="hitl-actions.csv"'
    empty = call(app, "GET", "/hitl/api/actions.csv", environ={"QUERY_STRING": "user=nobody"})
    assert read_csv(empty.body) == [list(CSV_COLUMNS)]


# -- links back to the dashboard -------------------------------------------------------------


def test_each_action_links_to_its_study_and_trial_in_the_dashboard(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    sid = study._study_id
    save(app, sid, ids["running"], 1, "PRUNE")
    [action] = listed(app)["actions"]
    assert action["study_url"] == f"/dashboard/studies/{sid}"
    assert action["trial_url"] == f"/dashboard/studies/{sid}/trials?numbers=2"
    # Mounted under a prefix by the WSGI server (SCRIPT_NAME) ...
    [mounted] = listed(app, SCRIPT_NAME="/optuna/")["actions"]
    assert mounted["study_url"] == f"/optuna/dashboard/studies/{sid}"
    assert mounted["trial_url"] == f"/optuna/dashboard/studies/{sid}/trials?numbers=2"
    # ... or behind a proxy at --root-path /optuna, which passes the whole path on.
    proxied = ProxyMiddleware(app, root_path="/optuna")
    r = call(proxied, "GET", "/optuna/hitl/api/actions")
    assert r.status == 200, r.body
    [behind] = r.json()["actions"]
    assert behind["trial_url"] == f"/optuna/dashboard/studies/{sid}/trials?numbers=2"
    # The links lead to the dashboard's page of that study.
    page = call(proxied, "GET", f"/optuna/dashboard/studies/{sid}")
    assert page.status == 200 and b"/optuna/hitl/static/hitl.js" in page.body


# -- the indexes -----------------------------------------------------------------------------


def audit_indexes(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {ix["name"] for ix in sa.inspect(conn).get_indexes("hitl_audit")}
    finally:
        engine.dispose()


def test_install_adds_the_listing_indexes_to_an_older_audit_table(storage_url: str) -> None:
    """A database whose hitl_audit an older version made (without these indexes, with rows)
    gets them on the next start; a second start changes nothing."""
    study, ids = make_study(storage_url)
    store = SqlStore(optuna.storages.RDBStorage(storage_url))
    store.install()
    names = {index.name for index in AUDIT_LISTING_INDEXES}
    assert names <= audit_indexes(storage_url)
    with store.engine.begin() as conn:
        for index in AUDIT_LISTING_INDEXES:
            index.drop(conn)
    insert(storage_url, [entry(study._study_id, ids["complete"], 0) for _ in range(50)])
    assert not names & audit_indexes(storage_url)

    app = app_for(storage_url)  # a start
    assert names <= audit_indexes(storage_url)
    app_for(storage_url)  # and another
    assert names <= audit_indexes(storage_url)
    page = listed(app, f"study={study._study_id}&user=ann&limit=10")
    assert len(page["actions"]) == 10 and page["next"] is not None


FILTERED_PLANS = [
    ("study", {"study": 1}, "ix_hitl_audit_study"),
    ("trial", {"study": 1, "trial": 3}, "ix_hitl_audit_study_trial"),
    ("user", {"user": "ann"}, "ix_hitl_audit_user"),
    ("prune", {"action": "prune"}, "ix_hitl_audit_to_state"),
    ("undo", {"action": "undo"}, "ix_hitl_audit_kind"),
    ("relabel", {"action": "relabel"}, "ix_hitl_audit_kind"),
    ("none", {}, "PRIMARY KEY"),
]


@pytest.mark.parametrize("query, expected", [(q, e) for _, q, e in FILTERED_PLANS],
                         ids=[i for i, _, _ in FILTERED_PLANS])
def test_each_filter_reads_one_index_range_in_id_order(
    sqlite_url: str, query: dict[str, Any], expected: str
) -> None:
    """SQLite's plan for a page: a search of the filter's index below the cursor, and no sort,
    so a deep page costs what the first does (scripts/bench_actions.py measures all three
    databases)."""
    app = app_for(sqlite_url)
    seen: list[tuple[str, Any]] = []
    engine = app.applier.store.engine
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, params, context, many:
                    seen.append((statement, params)))
    where = AuditFilter(study_id=query.get("study"), trial_number=query.get("trial"),
                        user=query.get("user"), action=query.get("action"))
    app.applier.store.audit_page(where, before=10**6, limit=100)
    [(statement, params)] = [s for s in seen if "FROM hitl_audit" in s[0]]
    with engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement,
                                                        params).all()]
    assert len(plan) == 1 and plan[0].startswith("SEARCH hitl_audit USING "), plan
    assert expected in plan[0] and "id<?" in plan[0], plan
