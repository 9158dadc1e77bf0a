"""End to end: real server processes on loopback ports, real databases, plain HTTP.

Two entry points are exercised: ``gunicorn wsgi:app`` run from the repository root (HITL_*
settings, gunicorn.conf.py and its post-fork hooks) and ``python -m hitl_pruner serve``. The
process helpers live in tests/processes.py. Servers sweep every 0.5 s, so everything the sweep
does shows up within a second or two (tests of the note-save path alone keep the sweep idle, so
that it cannot get there first); the tests poll with deadlines instead of sleeping.

Runs on every backend where the backend matters; where it matters less, the (entry point,
backend) pairs are spread so that each entry point meets each backend somewhere.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import re
import time
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Sequence
import uuid

from backends import database
from helpers import make_study
import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from optuna_dashboard import save_note
from optuna_dashboard._note import get_note_from_system_attrs
from processes import REPO_ROOT
from processes import Ready
from processes import Server
from processes import gunicorn_server
from processes import run_to_exit
from processes import serve_server
from processes import wait_for
import pytest
import sqlalchemy as sa

from hitl_pruner.rdb import SqlStore

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
# For tests of the note-save path alone: after its first run at start-up the sweep stays idle,
# so it cannot apply a note between the dashboard's save and ours (see
# test_note_save_outcome_is_true_while_the_sweep_runs for that race).
SWEEP_IDLE = 300.0
# optuna-dashboard 0.21's header for /dashboard (no LLM provider configured).
DASHBOARD_CSP = ";".join(
    [
        "default-src 'self'",
        "img-src 'self' data: blob:",
        "frame-src 'self'",
        "object-src 'none'",
        "connect-src 'self'",
        "style-src 'self' data: 'unsafe-inline'",
        "script-src 'self' 'unsafe-eval'",
    ]
)
CONFLICT_REASON = (
    "The text you are editing has changed. Please copy your edits and refresh the page."
)
# Our log line for a state change, e.g.
# "2026-... [1234] [hitl] INFO changed study 's' trial #2 (id 3): RUNNING -> PRUNED, note v1,
# via note-save"
CHANGED = re.compile(
    r"\[(?P<pid>\d+)\] \[hitl\] INFO changed study '(?P<study>[^']*)' trial #\d+ "
    r"\(id (?P<tid>\d+)\): (?P<src>\w+) -> (?P<dst>\w+).* via (?P<via>[\w-]+)$",
    re.MULTILINE,
)
WOULD_CHANGE = re.compile(
    r"\[hitl\] INFO dry run, would change study '[^']*' trial #\d+ \(id (?P<tid>\d+)\): "
    r"(?P<src>\w+) -> (?P<dst>\w+).* via (?P<via>[\w-]+)$",
    re.MULTILINE,
)
BOOTED = re.compile(r"Booting worker with pid: (\d+)")


def pairs(*items: tuple[str, str]) -> pytest.MarkDecorator:
    """Parametrize (launcher, storage_url): storage_url's backend is set indirectly."""
    return pytest.mark.parametrize(
        ("launcher", "storage_url"),
        [pytest.param(launcher, backend, id=f"{launcher}-{backend}")
         for launcher, backend in items],
        indirect=["storage_url"],
    )


# Each backend once, the entry points alternating.
SPREAD = [("gunicorn", "sqlite"), ("serve", "postgresql"), ("gunicorn", "mysql")]
SPREAD_OTHER_WAY = [("serve", "sqlite"), ("gunicorn", "postgresql"), ("serve", "mysql")]


class Db:
    """The test's own view of the database, independent of the server under test.

    On a shared server's database (``shared``), ``studies`` are the test's own: audit() and
    pending() then count their rows only."""

    def __init__(self, url: str, studies: Sequence[str] = ()) -> None:
        self.url = url
        self.storage = RDBStorage(url)
        self.engine: sa.Engine = self.storage.engine
        self.studies = list(studies)

    def close(self) -> None:
        self.engine.dispose()

    def trial(self, trial_id: int) -> FrozenTrial:
        return self.storage.get_trial(trial_id)

    def state(self, trial_id: int) -> TrialState:
        return self.trial(trial_id).state

    def states(self, trial_ids: Any) -> dict[int, TrialState]:
        return {tid: self.state(tid) for tid in trial_ids}

    def note(self, study_id: int, trial_id: int) -> dict[str, Any]:
        attrs = self.storage.get_study_system_attrs(study_id)
        return dict(get_note_from_system_attrs(attrs, trial_id))

    def study_attrs(self, study_id: int) -> dict[str, Any]:
        return self.storage.get_study_system_attrs(study_id)

    def save_note(self, study_name: str, trial_id: int, body: str) -> None:
        """What a training script does: optuna_dashboard.save_note on its trial."""
        study = optuna.load_study(study_name=study_name, storage=self.storage)
        save_note(optuna.Trial(study, trial_id), body)

    def _scope(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause on study_id for the test's own studies, if it named them."""
        if not self.studies:
            return "", {}
        ids = {f"s{i}": self.storage.get_study_id_from_name(name)
               for i, name in enumerate(self.studies)}
        return " WHERE study_id IN (" + ", ".join(f":{k}" for k in ids) + ")", ids

    def audit(self) -> list[dict[str, Any]]:
        where, params = self._scope()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT * FROM hitl_audit{where} ORDER BY id"), params
            ).mappings().all()
        return [
            {**row, "retroactive": bool(row["retroactive"]), "is_undo": bool(row["is_undo"])}
            for row in rows
        ]

    def pending(self) -> int:
        """Rows in the sweep's queue: 0 once the sweep has consumed every note written."""
        where, params = self._scope()
        with self.engine.connect() as conn:
            return int(conn.execute(
                sa.text(f"SELECT COUNT(*) FROM hitl_note_changes{where}"), params
            ).scalar_one())


@pytest.fixture
def db(storage_url: str) -> Iterator[Db]:
    database = Db(storage_url)
    try:
        yield database
    finally:
        database.close()


@contextlib.contextmanager
def launch(
    launcher: str,
    url: str,
    tmp_path: Path,
    *,
    ready: Ready = "http",
    interval: float = INTERVAL,
    **kwargs: Any,
) -> Iterator[Any]:
    """_launch(); with an idle sweep, wait until its one run at start is over, so that it
    cannot apply a note the test saves before the save does (it may start late: MariaDB)."""
    with _launch(launcher, url, tmp_path, ready=ready, interval=interval, **kwargs) as server:
        if ready == "http" and interval == SWEEP_IDLE:
            wait_for(
                lambda: server.get_json("/healthz")["sweep"]["seconds_since_last_run"]
                is not None,
                what="the start-up sweep", servers=[server],
            )
        yield server


def _launch(
    launcher: str,
    url: str,
    tmp_path: Path,
    *,
    settings: dict[str, Any] | None = None,
    gunicorn_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready: Ready = "http",
    interval: float = INTERVAL,
) -> Any:
    """Start either entry point with the same settings: HITL_* for gunicorn, flags for serve."""
    settings = settings or {}
    if launcher == "gunicorn":
        hitl_env = dict(env or {})
        for name, value in settings.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(value)
            elif value is True:
                value = "1"
            hitl_env["HITL_" + name.upper()] = str(value)
        return gunicorn_server(
            url, tmp_path, args=gunicorn_args, env=hitl_env, interval=interval, ready=ready
        )
    assert launcher == "serve" and not gunicorn_args
    args: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *value]
        else:
            args += [flag, str(value)]
    return serve_server(url, tmp_path, args=args, env=env, interval=interval, ready=ready)


# The tests that need no fresh process of their own (no start-up, restart, fork, lock or
# setting under test) share one server per (entry point, backend, interval), started when its
# first test asks and stopped at the end of the module. Each test still has studies of its own,
# under names no other test uses, and looks only at them: its audit rows and queue (Db's
# studies), and the server's log from the moment it began (Since). They run in one xdist
# worker, one after the other, so a server serves one test at a time.
SHARED = pytest.mark.xdist_group("e2e-shared")


class Since(Server):
    """``server`` as one test sees it: the same process, its log from now on."""

    def __init__(self, server: Server) -> None:
        self.__dict__.update(server.__dict__)
        self._offset = len(server.output)

    @property
    def output(self) -> str:
        return super().output[self._offset:]


class SharedServers:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._stack = contextlib.ExitStack()
        self._servers: dict[tuple[str, str, float], tuple[Server, str]] = {}

    def get(self, launcher: str, backend: str, interval: float) -> tuple[Server, str]:
        """The running server and its database's URL, started on first use."""
        key = (launcher, backend, interval)
        if key not in self._servers:
            url = self._stack.enter_context(database(backend, self._tmp_path))
            server = self._stack.enter_context(
                launch(launcher, url, self._tmp_path, interval=interval)
            )
            self._servers[key] = (server, url)
        server, url = self._servers[key]
        server.check_alive()
        return server, url

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def shared_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    servers = SharedServers(tmp_path_factory.mktemp("e2e-shared"))
    try:
        yield servers
    finally:
        servers.close()


def shared_pairs(*items: tuple[str, str]) -> pytest.MarkDecorator:
    """Parametrize (launcher, backend) for a test on a shared server."""
    return pytest.mark.parametrize(
        ("launcher", "backend"),
        [pytest.param(launcher, backend, id=f"{launcher}-{backend}")
         for launcher, backend in items],
    )


def unique(name: str) -> str:
    """A study name no other test on a shared server uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared(shared_servers: SharedServers) -> Iterator[Callable[..., Any]]:
    """``shared(launcher, backend, interval, *studies)``: a context giving this test's view
    of that shared server (Since) and a Db scoped to ``studies``, closed after the test."""
    dbs: list[Db] = []

    @contextlib.contextmanager
    def use(launcher: str, backend: str, interval: float, *studies: str) -> Iterator[
        tuple[Since, Db]
    ]:
        server, url = shared_servers.get(launcher, backend, interval)
        dbs.append(Db(url, studies))
        yield Since(server), dbs[-1]

    try:
        yield use
    finally:
        for db in dbs:
            db.close()


def changes_logged(server: Server) -> list[dict[str, str]]:
    return [m.groupdict() for m in CHANGED.finditer(server.output)]


def assert_no_traceback(server: Server) -> None:
    assert "Traceback" not in server.output, server.describe()


def outcome(
    action: str, reason: str, trial_id: int, src: str | None, dst: str | None
) -> dict[str, Any]:
    return {"action": action, "reason": reason, "trial_id": trial_id, "from": src, "to": dst}


# 1. ----------------------------------------------------------------------------------------


# serve meets PostgreSQL and MariaDB in the tests below.
@SHARED
@shared_pairs(
    ("gunicorn", "sqlite"), ("gunicorn", "postgresql"), ("gunicorn", "mysql"), ("serve", "sqlite")
)
def test_note_save_prunes_running_trial_at_once(
    launcher: str, backend: str, shared: Callable[..., Any]
) -> None:
    name = unique("s")
    with shared(launcher, backend, SWEEP_IDLE, name) as (server, db):
        study, ids = make_study(db.url, name)
        sid, tid = study._study_id, ids["running"]
        # With 100 trials or more the dashboard keeps a study's trials for 5 s (2 s below).
        for _ in range(100):
            db.storage.create_new_trial(sid)
        started = time.monotonic()
        before = server.trial_states(sid)  # fills the dashboard's trial cache
        reply = server.put_note(sid, tid, 1, "loss diverged at step 3\n\nPRUNE")
        after = server.trial_states(sid)
        elapsed = time.monotonic() - started
        assert_no_traceback(server)

    assert before[tid] == "Running"
    assert reply.status == 204, reply
    assert reply.outcome == outcome("applied", "PRUNE note", tid, "RUNNING", "PRUNED")
    # Read back within the cache's lifetime: only a dropped cache shows the new state.
    assert elapsed < 5.0, f"too slow ({elapsed:.1f} s) to tell a dropped cache from an expired one"
    assert after[tid] == "Pruned"
    assert {k: v for k, v in after.items() if k != tid} == {
        k: v for k, v in before.items() if k != tid
    }
    assert db.state(tid) == TrialState.PRUNED
    assert db.note(sid, tid) == {"version": 1, "body": "loss diverged at step 3\n\nPRUNE"}
    (row,) = db.audit()
    assert (row["trial_id"], row["from_state"], row["to_state"]) == (tid, "RUNNING", "PRUNED")
    assert (row["source"], row["note_version"], row["retroactive"], row["is_undo"]) == (
        "note-save", 1, False, False
    )
    assert [(c["tid"], c["dst"], c["via"]) for c in changes_logged(server)] == [
        (str(tid), "PRUNED", "note-save")
    ]


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_note_save_outcome_is_true_while_the_sweep_runs(
    storage_url: str, db: Db, tmp_path: Path
) -> None:
    """The trigger queues a note as the dashboard saves it, so a sweep can apply it before the
    note-save does. The answer must still say what happened to the trial: not "lost race"
    ("the trial changed meanwhile") for a trial that is exactly what the note asked for."""
    study = optuna.create_study(study_name="s", storage=db.storage)
    trial_ids = [study.ask()._trial_id for _ in range(30)]
    # A sweep every 10 ms turns a rare race into a frequent one.
    with launch("gunicorn", storage_url, tmp_path, interval=0.01) as server:
        replies = {tid: server.put_note(study._study_id, tid, 1, "PRUNE") for tid in trial_ids}
        assert_no_traceback(server)

    assert all(db.state(tid) == TrialState.PRUNED for tid in trial_ids)
    assert sorted(r["trial_id"] for r in db.audit()) == sorted(trial_ids)  # each changed once
    untrue = {
        tid: reply.outcome for tid, reply in replies.items()
        if reply.outcome is None or reply.outcome["action"] not in ("applied", "nothing to do")
    }
    assert not untrue, (
        f"{len(untrue)} of {len(trial_ids)} PRUNE saves answered as if the trial had not been "
        f"pruned, though it was: {next(iter(untrue.values()))}"
    )


# 2. ----------------------------------------------------------------------------------------


@SHARED
@shared_pairs(*SPREAD)
def test_sweep_applies_notes_saved_by_a_script(
    launcher: str, backend: str, shared: Callable[..., Any]
) -> None:
    name = unique("s")
    with shared(launcher, backend, INTERVAL, name) as (server, db):
        study, ids = make_study(db.url, name)
        sid = study._study_id
        failed, pruned = ids["running"], ids["running2"]
        # Longer than the sweep reads in one query (8 chunks of 2045 characters): the command
        # is at the very end.
        long_note = "the validation curve looks odd. " * 700 + "\nPRUNE"
        assert len(long_note) > 8 * 2045
        assert server.trial_states(sid)[failed] == "Running"
        db.save_note(name, failed, "NaN in the loss: FAIL")
        db.save_note(name, pruned, long_note)
        wait_for(
            lambda: db.states([failed, pruned])
            == {failed: TrialState.FAIL, pruned: TrialState.PRUNED},
            timeout=15, what="the sweep to apply both notes", servers=[server],
        )

        def shown() -> bool:
            states = server.trial_states(sid)
            return (states[failed], states[pruned]) == ("Fail", "Pruned")

        wait_for(shown, timeout=5, what="the dashboard to show the new states", servers=[server])
        wait_for(lambda: db.pending() == 0, timeout=10, what="the sweep to empty its queue",
                 servers=[server])
        # The sweep logs each change just after its commit; the server goes on running.
        wait_for(lambda: len(changes_logged(server)) >= 2, timeout=5,
                 what="the sweep to log both changes", servers=[server])
        assert_no_traceback(server)

    rows = db.audit()
    assert sorted((r["trial_id"], r["to_state"], r["source"], r["note_version"]) for r in rows) == [
        (failed, "FAIL", "sweep", 1),
        (pruned, "PRUNED", "sweep", 1),
    ]
    assert sorted((c["tid"], c["via"]) for c in changes_logged(server)) == [
        (str(failed), "sweep"), (str(pruned), "sweep")
    ]
    # Nothing else moved.
    assert db.state(ids["complete"]) == TrialState.COMPLETE
    assert db.state(ids["waiting"]) == TrialState.WAITING


# 3. ----------------------------------------------------------------------------------------


@SHARED
@shared_pairs(*SPREAD_OTHER_WAY)
def test_retroactive_fail_and_undo_over_http(
    launcher: str, backend: str, shared: Callable[..., Any]
) -> None:
    name = unique("s")
    with shared(launcher, backend, SWEEP_IDLE, name) as (server, db):
        study, ids = make_study(db.url, name)
        sid, tid = study._study_id, ids["complete"]
        original = db.trial(tid)
        assert original.state == TrialState.COMPLETE and original.values == [0.1]

        first = server.put_note(sid, tid, 1, "test data leaked into training: FAIL")
        failed = server.trial_detail(sid, tid)
        while_failed = db.trial(tid)
        second = server.put_note(sid, tid, 2, "checked again, the split was fine")
        restored = server.trial_detail(sid, tid)
        assert_no_traceback(server)
    # A sweep meeting these notes later changes nothing: see
    # test_restart_applies_notes_written_while_down_and_nothing_twice.

    assert first.status == 204, first
    assert first.outcome == outcome("applied", "retroactive relabel", tid, "COMPLETE", "FAIL")
    assert failed["state"] == "Fail"
    assert while_failed.state == TrialState.FAIL
    # Only the state changes: values, params, intermediate values, attrs and times are kept.
    for field in ("values", "params", "intermediate_values", "user_attrs", "datetime_start",
                  "datetime_complete"):
        assert getattr(while_failed, field) == getattr(original, field), field

    assert second.status == 204, second
    assert second.outcome == outcome(
        "applied", "command removed from the note: undo", tid, "FAIL", "COMPLETE"
    )
    assert restored["state"] == "Complete" and restored["values"] == [0.1]
    now = db.trial(tid)
    assert now.state == TrialState.COMPLETE
    for field in ("values", "params", "intermediate_values", "user_attrs", "datetime_start",
                  "datetime_complete"):
        assert getattr(now, field) == getattr(original, field), field

    rows = db.audit()
    assert [
        (r["trial_id"], r["from_state"], r["to_state"], r["retroactive"], r["is_undo"],
         r["note_version"], r["source"])
        for r in rows
    ] == [
        (tid, "COMPLETE", "FAIL", True, False, 1, "note-save"),
        (tid, "FAIL", "COMPLETE", True, True, 2, "note-save"),
    ]


# 4. ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_restart_applies_notes_written_while_down_and_nothing_twice(
    storage_url: str, db: Db, tmp_path: Path
) -> None:
    study, ids = make_study(storage_url)
    sid, pruned, relabelled, later = (
        study._study_id, ids["running"], ids["complete"], ids["running2"]
    )

    # The first server's sweep stays idle; the notes it applied on save are off the queue
    # (they must not be applied again over a later decision), so the next server's sweep meets
    # only the note written while nobody served.
    with launch("gunicorn", storage_url, tmp_path, interval=SWEEP_IDLE) as before:
        replies = [
            before.put_note(sid, pruned, 1, "PRUNE"),
            before.put_note(sid, relabelled, 1, "FAIL: leaked labels"),
            before.put_note(sid, relabelled, 2, "false alarm"),  # the undo
        ]
        assert_no_traceback(before)
    assert before.returncode == 0, before.describe()
    assert [r.outcome["action"] if r.outcome else r.status for r in replies] == ["applied"] * 3
    assert db.pending() == 0

    # Nobody is serving: a worker script writes a command anyway.
    db.save_note("s", later, "FAIL (out of memory)")
    assert db.state(later) == TrialState.RUNNING

    with launch("serve", storage_url, tmp_path) as after:
        wait_for(lambda: db.state(later) == TrialState.FAIL, timeout=15,
                 what="the new server's sweep to apply the note written while down",
                 servers=[after])
        wait_for(lambda: db.pending() == 0, timeout=10, what="the sweep to empty its queue",
                 servers=[after])
        assert_no_traceback(after)

    # Exactly one audit row per change; the restart added one, for the note written while down.
    assert [(r["trial_id"], r["to_state"], r["source"]) for r in db.audit()] == [
        (pruned, "PRUNED", "note-save"),
        (relabelled, "FAIL", "note-save"),
        (relabelled, "COMPLETE", "note-save"),
        (later, "FAIL", "sweep"),
    ]
    assert [(c["tid"], c["via"]) for c in changes_logged(after)] == [(str(later), "sweep")]
    assert db.states([pruned, relabelled]) == {
        pruned: TrialState.PRUNED, relabelled: TrialState.COMPLETE
    }


# 5. ----------------------------------------------------------------------------------------


@pairs(("gunicorn", "sqlite"), ("serve", "mysql"))
def test_dry_run_changes_nothing(launcher: str, storage_url: str, db: Db, tmp_path: Path) -> None:
    study, ids = make_study(storage_url)
    sid, by_http, by_script = study._study_id, ids["running"], ids["running2"]
    settings = {"dry_run": True, "verbose": True}
    with launch(launcher, storage_url, tmp_path, settings=settings) as server:
        reply = server.put_note(sid, by_http, 1, "PRUNE")
        db.save_note("s", by_script, "FAIL")
        said = wait_for(
            lambda: [m for m in WOULD_CHANGE.finditer(server.output)
                     if m["tid"] == str(by_script) and m["via"] == "sweep"],
            timeout=15, what="the sweep to log what it would change", servers=[server],
        )
        # A dry run consumes nothing, so every sweep meets the note again; let a few go by.
        sweeps_then = server.output.count("[hitl] DEBUG sweep:")
        wait_for(lambda: server.output.count("[hitl] DEBUG sweep:") >= sweeps_then + 3,
                 timeout=10, what="three more sweeps", servers=[server])
        states = server.trial_states(sid)
        assert_no_traceback(server)

    assert reply.status == 204, reply
    assert reply.outcome == outcome(
        "dry run", "would change: PRUNE note", by_http, "RUNNING", "PRUNED"
    )
    assert "would change" in server.output
    assert (said[0]["src"], said[0]["dst"]) == ("RUNNING", "FAIL")
    # Said once per note, not once per sweep.
    said_by_trial = [(m["tid"], m["via"]) for m in WOULD_CHANGE.finditer(server.output)]
    assert said_by_trial.count((str(by_script), "sweep")) == 1, server.output
    assert (str(by_http), "note-save") in said_by_trial, server.output
    assert db.states([by_http, by_script]) == {
        by_http: TrialState.RUNNING, by_script: TrialState.RUNNING
    }
    assert (states[by_http], states[by_script]) == ("Running", "Running")
    assert db.note(sid, by_http) == {"version": 1, "body": "PRUNE"}  # the note itself is saved
    assert db.audit() == []
    assert changes_logged(server) == []


# 6. ----------------------------------------------------------------------------------------


@pairs(("serve", "sqlite"), ("gunicorn", "postgresql"))
def test_study_filter(launcher: str, storage_url: str, db: Db, tmp_path: Path) -> None:
    a, ids_a = make_study(storage_url, "a")
    b, ids_b = make_study(storage_url, "b")
    with launch(launcher, storage_url, tmp_path, settings={"study": ["a"]}) as server:
        outside = server.put_note(b._study_id, ids_b["running"], 1, "PRUNE")
        inside = server.put_note(a._study_id, ids_a["running"], 1, "PRUNE")
        # Sweep path: b's note is written first, so the sweep that applies a's has seen b's.
        db.save_note("b", ids_b["running2"], "FAIL")
        db.save_note("a", ids_a["running2"], "FAIL")
        wait_for(lambda: db.state(ids_a["running2"]) == TrialState.FAIL, timeout=15,
                 what="the sweep to apply the note in study a", servers=[server])
        assert_no_traceback(server)

    assert outside.status == 204, outside
    assert outside.outcome == outcome(
        "not monitored", "study 'b' is outside --study", ids_b["running"], None, None
    )
    assert db.note(b._study_id, ids_b["running"]) == {"version": 1, "body": "PRUNE"}
    assert inside.status == 204, inside
    assert db.states([ids_b["running"], ids_b["running2"]]) == {
        ids_b["running"]: TrialState.RUNNING, ids_b["running2"]: TrialState.RUNNING
    }
    assert db.state(ids_a["running"]) == TrialState.PRUNED
    assert sorted((r["study_name"], r["trial_id"]) for r in db.audit()) == sorted(
        [("a", ids_a["running"]), ("a", ids_a["running2"])]
    )


# 7. ----------------------------------------------------------------------------------------


@SHARED
@shared_pairs(*SPREAD)
def test_bad_requests_change_nothing(
    launcher: str, backend: str, shared: Callable[..., Any]
) -> None:
    name_a, name_b = unique("a"), unique("b")
    with shared(launcher, backend, INTERVAL, name_a, name_b) as (server, db):
        _bad_requests_change_nothing(server, db, name_a, name_b)


def _bad_requests_change_nothing(server: Server, db: Db, name_a: str, name_b: str) -> None:
    a, ids_a = make_study(db.url, name_a)
    b, ids_b = make_study(db.url, name_b)
    sa_id, sb_id, tid = a._study_id, b._study_id, ids_a["running"]
    note_path = f"/api/studies/{sa_id}/{tid}/note"
    all_ids = [*ids_a.values(), *ids_b.values()]
    states_before = db.states(all_ids)
    attrs_before = (db.study_attrs(sa_id), db.study_attrs(sb_id))
    one_mb = "PRUNE " + "x" * 1_000_000

    def json_body(value: Any) -> bytes:
        import json

        return json.dumps(value).encode()

    cases = [
        ("malformed JSON", note_path, b'{"version": 1, "body": "PRUNE"', 400, "must be JSON"),
        ("not an object", note_path, json_body(["PRUNE"]), 400, "JSON object"),
        ("missing version", note_path, json_body({"body": "PRUNE"}), 400, '"version"'),
        ("version not a number", note_path, json_body({"version": "1", "body": "PRUNE"}), 400,
         '"version"'),
        ("missing body", note_path, json_body({"version": 1}), 400, '"body"'),
        ("unknown trial", f"/api/studies/{sa_id}/999999/note",
         json_body({"version": 1, "body": "PRUNE"}), 404, "trial_id=999999"),
        ("unknown study", f"/api/studies/999999/{tid}/note",
         json_body({"version": 1, "body": "PRUNE"}), 404, "study_id=999999"),
        ("a trial of another study", f"/api/studies/{sa_id}/{ids_b['running']}/note",
         json_body({"version": 1, "body": "PRUNE"}), 404, f"trial_id={ids_b['running']}"),
        # optuna-dashboard itself takes up to 128 MiB; notes are limited to 100 KiB.
        ("1 MB note", note_path, json_body({"version": 1, "body": one_mb}), 413,
         "the note is too long"),
    ]
    replies = {name: server.put_raw(path, data) for name, path, data, _, _ in cases}

    # The version check is the dashboard's: a stale version gets its 409 and current note.
    looked = server.put_note(sa_id, tid, 1, "first look: fine")
    stale = server.put_note(sa_id, tid, 1, "PRUNE")
    wait_for(lambda: db.pending() == 0, timeout=10, what="the sweep to empty its queue",
             servers=[server])
    assert_no_traceback(server)

    for name, _, _, status, reason in cases:
        reply = replies[name]
        assert reply.status == status, (name, reply)
        assert reason in reply.json["reason"], (name, reply)
        assert "X-Hitl-Outcome" not in reply.headers, (name, reply)

    assert looked.status == 204 and looked.outcome == outcome(
        "nothing to do", "the note carries no command", tid, None, None
    )
    assert stale.status == 409, stale
    assert stale.json == {
        "reason": CONFLICT_REASON, "note": {"version": 1, "body": "first look: fine"}
    }
    assert "X-Hitl-Outcome" not in stale.headers
    assert db.note(sa_id, tid) == {"version": 1, "body": "first look: fine"}

    # No state moved, and no note but the one accepted save changed, in either study.
    assert db.states(all_ids) == states_before
    attrs_a, attrs_b = db.study_attrs(sa_id), db.study_attrs(sb_id)
    assert {k: v for k, v in attrs_a.items() if not k.startswith(f"dashboard:{tid}:")} == {
        k: v for k, v in attrs_before[0].items() if not k.startswith(f"dashboard:{tid}:")
    }
    assert attrs_b == attrs_before[1]
    assert f"dashboard:{ids_b['running']}:note_ver" not in attrs_a
    assert db.audit() == []


# 8. ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gunicorn_args", [["--preload"], ["-w", "2"]], ids=["preload", "2-workers"]
)
def test_sweep_runs_in_gunicorn_workers(
    gunicorn_args: list[str], storage_url: str, db: Db, tmp_path: Path
) -> None:
    study, ids = make_study(storage_url)
    sid = study._study_id
    # Tables and triggers exist already, as on every start but the first: two workers
    # installing at once on a fresh database is test_workers_install_at_once_on_a_fresh_database.
    SqlStore(db.storage).install()
    commands = {ids["running"]: "FAIL", ids["running2"]: "PRUNE", ids["waiting"]: "FAIL"}
    expected = {
        tid: TrialState.FAIL if c == "FAIL" else TrialState.PRUNED for tid, c in commands.items()
    }

    # No HTTP request until the sweep has acted: the middleware's first-request fallback
    # cannot have started it, only the post_worker_init hook.
    with launch(
        "gunicorn", storage_url, tmp_path, gunicorn_args=gunicorn_args, ready="none"
    ) as server:
        for tid, command in commands.items():
            db.save_note("s", tid, command)
        wait_for(lambda: db.states(commands) == expected, timeout=40,
                 what="a worker's sweep to apply the notes", servers=[server])
        workers = {int(p) for p in BOOTED.findall(server.output)}
        n_workers = 2 if "-w" in gunicorn_args else 1
        assert len(workers) == n_workers, server.describe()
        # Every worker runs its own sweep thread next to its main thread.
        wait_for(lambda: all(_threads(pid) >= 2 for pid in workers), timeout=20,
                 what="a sweep thread in every worker", servers=[server])

        # The request path works after the fork too (pooled connections were not shared).
        server.wait_ready()
        reply = server.put_note(sid, ids["complete"], 1, "FAIL")
        wait_for(lambda: db.pending() == 0, timeout=10, what="the sweeps to empty the queue",
                 servers=[server])
        assert_no_traceback(server)

    assert reply.status == 204, reply
    assert db.state(ids["complete"]) == TrialState.FAIL
    logged = changes_logged(server)
    # The sweep wakes on the note write, so it may carry out the saved note a moment before the
    # save's own apply does; the save then records the sweep's change as its own (one audit row,
    # its answer "applied") and says so in the log.
    claimed = "recorded as the note save's" in server.output
    swept_the_save = reply.outcome["action"] != "applied" or claimed
    assert sorted(int(c["tid"]) for c in logged if c["via"] == "sweep") == sorted(
        [*commands, *([ids["complete"]] if swept_the_save else [])]
    )
    assert {int(c["pid"]) for c in logged} <= workers
    assert server.pid not in {int(c["pid"]) for c in logged}
    # Two sweeping workers still change each trial once.
    rows = db.audit()
    assert sorted(r["trial_id"] for r in rows) == sorted([*commands, ids["complete"]])


# Sessions of this database blocked on a lock, and what they run.
BLOCKED_SQL = {
    "postgresql": "SELECT query FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'",
    "mysql": "SELECT info FROM information_schema.PROCESSLIST "
    "WHERE db = DATABASE() AND state LIKE 'Waiting for%%lock%%'",
}
LOCK_SQL = {
    "postgresql": ("LOCK TABLE study_system_attributes IN ACCESS EXCLUSIVE MODE", None),
    "mysql": ("LOCK TABLES study_system_attributes WRITE", "UNLOCK TABLES"),
}


@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_workers_install_at_once_on_a_fresh_database(
    storage_url: str, db: Db, tmp_path: Path
) -> None:
    """`gunicorn -w 2` on a database hitl-pruner has not seen yet: both workers create the
    triggers at the same moment. Holding a lock on study_system_attributes (the triggers' table)
    lines them up, so the race that happens now and then in production happens every time."""
    study, ids = make_study(storage_url)
    backend = db.engine.dialect.name if db.engine.dialect.name == "postgresql" else "mysql"
    lock, unlock = LOCK_SQL[backend]
    locker = sa.create_engine(storage_url, poolclass=sa.pool.NullPool)
    try:
        with launch(
            "gunicorn", storage_url, tmp_path, gunicorn_args=["-w", "2"], ready="none"
        ) as server:
            with locker.connect() as conn:
                with conn.begin():
                    conn.exec_driver_sql(lock)

                    def blocked() -> list[str]:
                        with db.engine.connect() as probe:
                            return [
                                str(q) for (q,) in probe.exec_driver_sql(BLOCKED_SQL[backend])
                                if q and "hitl" in str(q)
                            ]

                    # Both workers wait on the lock (or on each other): let them go together.
                    # Without the lineup after 20 s, go on anyway: the server must come up.
                    deadline = time.monotonic() + 20
                    while len(blocked()) < 2 and time.monotonic() < deadline:
                        if server.returncode is not None:
                            break
                        time.sleep(0.1)
                    if unlock:
                        conn.exec_driver_sql(unlock)
            server.wait_ready()
            wait_for(lambda: server.output.count("[hitl] INFO serving") >= 2, timeout=20,
                     what="both workers to serve", servers=[server])
            reply = server.put_note(study._study_id, ids["running"], 1, "PRUNE")
            db.save_note("s", ids["running2"], "FAIL")
            wait_for(lambda: db.state(ids["running2"]) == TrialState.FAIL, timeout=15,
                     what="a sweep to apply the note", servers=[server])
            assert server.returncode is None, server.describe()
    finally:
        locker.dispose()
    assert reply.status == 204, reply
    assert db.state(ids["running"]) == TrialState.PRUNED


def _threads(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/task").iterdir()))
    except FileNotFoundError:
        return 0


# 9. ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--prune-pattern", "("], {}, ["--prune-pattern", "regular expression"]),
        (["--interval", "0"], {}, ["--interval", "positive"]),
        ([], {"HITL_DRY_RUN": "maybe"}, ["HITL_DRY_RUN", "maybe"]),
        (["--fail-pattern", "[unclosed"], {}, ["--fail-pattern", "regular expression"]),
    ],
    ids=["prune-pattern", "interval", "env-bool", "fail-pattern"],
)
def test_serve_rejects_a_bad_setting(
    args: list[str], env: dict[str, str], expected: list[str], tmp_path: Path
) -> None:
    import sys

    url = f"sqlite:///{tmp_path / 'x.db'}"
    started = time.monotonic()
    result = run_to_exit(
        [sys.executable, "-m", "hitl_pruner", "serve", url, "--port", "1", *args],
        cwd=tmp_path, env=env, timeout=30,
    )
    assert result.returncode == 2, result
    assert result.stderr.startswith("hitl-pruner: error: "), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("gunicorn_args", [[], ["--preload"]], ids=["plain", "preload"])
def test_gunicorn_stops_on_a_bad_setting(gunicorn_args: list[str], tmp_path: Path) -> None:
    import sys

    from processes import free_port

    env = {
        "HITL_STORAGE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "HITL_PRUNE_PATTERN": "(",
        "HITL_HOST": "127.0.0.1",
        "HITL_PORT": str(free_port()),
    }
    # A bad setting cannot get better by trying again: gunicorn must stop, not respawn
    # workers forever. (Without --preload the app loads in the worker, and gunicorn's arbiter
    # halts only when a worker exits with 3, "Worker failed to boot", or 4, "App failed to
    # load"; any other exit code gets a new worker.)
    # The bound is for a gunicorn that never stops; the count below catches respawns. Its
    # start-up alone (importing gunicorn, Optuna and the dashboard) took over 8 s in the version
    # matrix on 2 busy cores.
    result = run_to_exit(
        [sys.executable, "-m", "gunicorn", *gunicorn_args, "wsgi:app"],
        cwd=REPO_ROOT, env=env, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "hitl-pruner: " in output
    assert "--prune-pattern '(' is not a valid regular expression" in output
    assert "Traceback" not in output
    assert output.count("hitl-pruner: ") <= 2, output


# 10. ---------------------------------------------------------------------------------------


@SHARED
@shared_pairs(("gunicorn", "sqlite"), ("serve", "sqlite"))
def test_everything_else_passes_through(
    launcher: str, backend: str, shared: Callable[..., Any]
) -> None:
    name = unique("s")
    with shared(launcher, backend, SWEEP_IDLE, name) as (server, db):
        study, ids = make_study(db.url, name)
        sid = study._study_id
        # Every study in the database, the other tests' on this shared server included.
        every_study = sorted(s.study_name for s in db.storage.get_all_studies())
        root = server.get("/")
        page = server.get("/dashboard")
        deep_link = server.get(f"/dashboard/studies/{sid}")
        script = re.search(r'<script[^>]*src="(/static/[^"]+)"', page.text)
        assert script, page.text[:2000]
        bundle = server.get(script[1])
        studies = server.get_json("/api/studies")
        told = server.request(
            "POST", f"/api/trials/{ids['running']}/tell",
            json={"state": "Complete", "values": [1.5]},
        )
        told_fail = server.request(
            "POST", f"/api/trials/{ids['running2']}/tell", json={"state": "Fail"}
        )
        study_note = server.request(
            "PUT", f"/api/studies/{sid}/note", json={"version": 1, "body": "PRUNE the bad ones"}
        )
        wait_for(lambda: server.trial_states(sid)[ids["running"]] == "Complete", timeout=5,
                 what="the dashboard to show the told trial", servers=[server])
        detail = server.trial_detail(sid, ids["running"])
        assert_no_traceback(server)

    assert root.status == 302 and root.headers["Location"].endswith("/dashboard")
    assert page.status == 200, page
    assert page.headers["Content-Type"].startswith("text/html")
    # The dashboard's own policy, and no other site may frame the page (origin.py).
    assert page.headers["Content-Security-Policy"] == DASHBOARD_CSP + "; frame-ancestors 'self'"
    assert page.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert "X-Hitl-Outcome" not in page.headers
    assert deep_link.status == 200 and deep_link.text == page.text
    assert script[1] == "/static/bundle.js"
    assert bundle.status == 200, bundle
    assert "javascript" in bundle.headers["Content-Type"]
    assert len(bundle.content) > 100_000

    assert sorted(s["study_name"] for s in studies["study_summaries"]) == every_study

    assert told.status == 204 and "X-Hitl-Outcome" not in told.headers, told
    assert detail["state"] == "Complete" and detail["values"] == [1.5]
    trial = db.trial(ids["running"])
    assert trial.state == TrialState.COMPLETE and trial.values == [1.5]
    # The dashboard's Fail Trial button is ours, not passed through: it takes the FAIL note's
    # path (forced here, as no cooperative worker runs the trial) and is audited.
    assert told_fail.status == 204, told_fail
    assert told_fail.outcome is not None and told_fail.outcome["action"] == "applied", told_fail
    assert db.state(ids["running2"]) == TrialState.FAIL

    # The study's own note is not a trial's: saved by the dashboard, no command applied.
    assert study_note.status == 204 and "X-Hitl-Outcome" not in study_note.headers, study_note
    assert get_note_from_system_attrs(db.study_attrs(sid), None)["body"] == "PRUNE the bad ones"
    assert db.state(ids["complete"]) == TrialState.COMPLETE
    assert [(r["trial_id"], r["to_state"], r["source"]) for r in db.audit()] == [
        (ids["running2"], "FAIL", "fail-button")
    ]
