"""Stop a study: STOP in the study's note (or the Stop study button) ends every worker's
``study.optimize`` after its current trial, which completes as usual; removing the word lets
new workers run again. Real worker processes on SQLite and PostgreSQL, the rest in process.

This file is also the worker program: ``python tests/test_study_stop.py MODE URL STUDY
N_TRIALS`` runs one worker and prints ``{"ran": [numbers], "stopped": bool}`` when it is done.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
import pickle
import subprocess
import sys
import time
from typing import Any
from typing import Iterator

import optuna
from optuna.trial import TrialState

STEP_SECONDS = 0.05
STEPS = 30  # 1.5 s a trial


def worker_main(mode: str, url: str, study_name: str, n_trials: int) -> None:
    import hitl_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = hitl_pruner.HumanInTheLoopPruner(optuna.pruners.NopPruner(), check_interval=0.1)
    storage: Any = url
    if url.startswith("grpc:"):
        from test_grpc_proxy import open_spec

        storage = open_spec(url)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        for step in range(STEPS):
            if mode == "pruner":
                trial.report(step / STEPS, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            time.sleep(STEP_SECONDS)
        return 1.0

    callbacks: list[Any] = [lambda _study, trial: ran.append(trial.number)]
    if mode == "quiet":
        # An objective that never calls should_prune(): the documented callback.
        callbacks.append(hitl_pruner.stop_if_asked)
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks)
    print(json.dumps({"ran": ran, "stopped": hitl_pruner.study_stopped(study)}), flush=True)


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    sys.exit(0)


# --- the tests -------------------------------------------------------------------------------

# Below the worker program, which needs none of these (pytest alone is 0.14 s of CPU in each
# of its processes).
from helpers import app_for  # noqa: E402
from helpers import audit_rows  # noqa: E402
from helpers import call  # noqa: E402
from optuna_dashboard import save_note  # noqa: E402
from processes import child_env  # noqa: E402
from processes import wait_for  # noqa: E402
import pytest  # noqa: E402
from test_browser import browser  # noqa: E402,F401  (fixtures)
from test_browser import pages  # noqa: E402,F401

import hitl_pruner  # noqa: E402
from hitl_pruner import study_stop  # noqa: E402
from hitl_pruner.study_stop import STOP_ATTR  # noqa: E402


@contextlib.contextmanager
def workers(mode: str, url: str, study: str, count: int, n_trials: int,
            tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            out = open(tmp_path / f"{mode}-{i}-{time.time_ns()}.out", "wb+")
            proc = subprocess.Popen(
                [sys.executable, __file__, mode, url, study, str(n_trials)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
            )
            proc.out = out  # type: ignore[attr-defined]
            started.append(proc)
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.out.close()  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = proc.out  # type: ignore[attr-defined]
    out.seek(0)
    text = out.read().decode()
    assert proc.returncode == 0, text
    return json.loads(text.strip().splitlines()[-1])


def attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def note(app: Any, study_id: int, body: str, user: str | None = "alice") -> Any:
    version = app.stops.state(study_id)["note"]["version"] + 1
    environ = {"REMOTE_USER": user} if user else {}
    return call(app, "PUT", f"/api/studies/{study_id}/note",
                {"version": version, "body": body}, environ=environ)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "postgres_url"}[
        request.param])


@pytest.mark.e2e
def test_stop_ends_each_workers_optimize_after_its_trial_completes_and_resume_lets_one_run(
    url: str, tmp_path: Path
) -> None:
    study = optuna.create_study(storage=url, study_name="stop-me")
    sid = study._study_id
    app = app_for(url, interval=0.2)
    with workers("pruner", url, "stop-me", 2, 50, tmp_path) as procs:
        # Both workers are in a trial and have checked (their heartbeats are written).
        wait_for(lambda: sum(t.state == TrialState.RUNNING and len(t.intermediate_values) > 3
                             for t in study.get_trials()) == 2, timeout=30)
        r = note(app, sid, "The data loader is broken.\nSTOP")
        assert r.status == 204
        assert r.outcome is not None
        assert r.outcome["action"] == "applied" and r.outcome["workers"] == 2
        at_stop = {t.number for t in study.get_trials()}
        results = [finish(p, 30) for p in procs]
    trials = study.get_trials()
    # No trial started after the stop, and the trials running then completed as usual.
    assert {t.number for t in trials} == at_stop
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert all(r["stopped"] for r in results)
    assert sum(len(r["ran"]) for r in results) == len(trials)
    assert attrs(study)[STOP_ATTR]["user"] == "alice"

    # Taking the word out clears it; a worker started afterwards runs.
    r = note(app, sid, "The data loader is fixed.")
    assert r.outcome is not None and r.outcome["action"] == "applied"
    assert attrs(study)[STOP_ATTR] is None
    with workers("pruner", url, "stop-me", 1, 1, tmp_path) as procs:
        again = finish(procs[0], 30)
    assert len(again["ran"]) == 1 and not again["stopped"]
    rows = [r for r in audit_rows(url) if r.trial_id == -1]
    assert [(r.how, r.user_name, r.trial_number, r.is_undo) for r in rows] == [
        ("stop:2", "alice", -1, False), ("resume:0", "alice", -1, True)
    ]


@pytest.mark.e2e
def test_a_worker_behind_the_grpc_proxy_stops_through_the_storage_api(
    sqlite_url: str, tmp_path: Path
) -> None:
    from test_grpc_proxy import grpc_proxy

    study = optuna.create_study(storage=sqlite_url, study_name="proxied")
    app = app_for(sqlite_url, interval=0.2)
    with grpc_proxy(sqlite_url, tmp_path) as spec:
        with workers("pruner", spec, "proxied", 1, 50, tmp_path) as procs:
            wait_for(lambda: any(len(t.intermediate_values) > 3 for t in study.get_trials()),
                     timeout=30)
            r = note(app, study._study_id, "STOP")
            # Its heartbeat is a study system attr (hitl:worker:*): it counts as told.
            assert r.outcome is not None and r.outcome["workers"] == 1
            count = len(study.get_trials())
            result = finish(procs[0], 30)
    trials = study.get_trials()
    assert len(trials) == count and all(t.state == TrialState.COMPLETE for t in trials)
    assert result["stopped"] and len(result["ran"]) == count


@pytest.mark.e2e
def test_a_stop_written_by_a_script_reaches_workers_whose_objective_never_asks_should_prune(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The sweep applies a study note saved outside the dashboard (the trigger queues the study
    note's keys); a worker passing stop_if_asked stops after its trial though it never checks."""
    study = optuna.create_study(storage=sqlite_url, study_name="quiet")
    app = app_for(sqlite_url, interval=0.2)
    app.start_background()
    try:
        with workers("quiet", sqlite_url, "quiet", 1, 50, tmp_path) as procs:
            wait_for(lambda: len(study.get_trials()) >= 2, timeout=30)
            save_note(study, "STOP")
            wait_for(lambda: attrs(study).get(STOP_ATTR) is not None, timeout=5)
            count = len(study.get_trials())
            result = finish(procs[0], 30)
    finally:
        app.stop_background()
    trials = study.get_trials()
    assert len(trials) == count and all(t.state == TrialState.COMPLETE for t in trials)
    assert result["stopped"]
    assert attrs(study)[STOP_ATTR]["source"] == "sweep"


# --- in process ------------------------------------------------------------------------------


@pytest.mark.parametrize("body, stops", [
    ("STOP", True),
    ("bad data\n\n**STOP**", True),
    ("STOP.", True),
    ("(STOP)", True),
    ("stop", False),
    ("STOPPED", False),
    ("do not STOP-gap", False),
    ("NONSTOP", False),
    ("cfg.STOP", False),
    ("", False),
])
def test_the_study_note_stops_on_the_word_stop_standing_alone(body: str, stops: bool) -> None:
    assert study_stop.says_stop(body) is stops


def test_the_button_appends_stop_and_takes_it_out_again() -> None:
    assert study_stop.with_stop("") == "STOP"
    assert study_stop.with_stop("loader broken\n") == "loader broken\n\nSTOP"
    assert study_stop.without_stop("loader broken\n\nSTOP") == "loader broken"
    assert study_stop.without_stop("STOP please, STOPPED\nkeep") == "please, STOPPED\nkeep"


def test_stop_and_resume_are_audited_and_listed_as_study_actions(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="s")
    app = app_for(sqlite_url)
    assert note(app, study._study_id, "STOP", user="bob").outcome["action"] == "applied"
    assert note(app, study._study_id, "STOP, really").outcome["action"] == "nothing to do"
    assert note(app, study._study_id, "").outcome["action"] == "applied"
    actions = call(app, "GET", "/hitl/api/actions").json()["actions"]
    assert [(a["action"], a["from"], a["to"], a["user"], a["workers"], a["trial_id"],
             a["undoable"]) for a in actions] == [
        ("resume study", "STOPPED", "RUNNING", "alice", 0, None, False),
        ("stop study", "RUNNING", "STOPPED", "bob", 0, None, False),
    ]
    assert "STOP" in actions[0]["undo_refused"]
    assert actions[0]["trial_url"] == actions[0]["study_url"]
    # A trial filter never lists them; --notify-url says what happened in words.
    query = {"QUERY_STRING": f"study={study._study_id}&trial=0"}
    assert call(app, "GET", "/hitl/api/actions", environ=query).json()["actions"] == []
    from hitl_pruner.notify import message

    entry = app.applier.store.audit(1)[0]
    assert message(entry)["text"] == (
        "hitl-pruner: study 's' resumed by alice, 0 live worker(s) told, note v3, via note-save"
    )


def test_a_user_off_the_allow_list_cannot_stop_and_the_sweep_does_not_either(
    sqlite_url: str
) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="s")
    app = app_for(sqlite_url, allowed_users=("alice",))
    r = note(app, study._study_id, "STOP", user="mallory")
    assert r.status == 204
    assert r.outcome["action"] == "refused" and "mallory" in r.outcome["reason"]
    app.sweeper.run_once()
    assert attrs(study).get(STOP_ATTR) is None
    # The same note, saved by someone allowed, stops it.
    assert note(app, study._study_id, "STOP").outcome["action"] == "applied"


def test_ask_refuses_and_study_stopped_says_so_for_ask_and_tell_loops(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="s",
                                pruner=hitl_pruner.HumanInTheLoopPruner(check_interval=0))
    app = app_for(sqlite_url)
    assert not hitl_pruner.study_stopped(study)
    trial = hitl_pruner.ask(study)
    note(app, study._study_id, "STOP")
    assert hitl_pruner.study_stopped(study)
    with pytest.raises(hitl_pruner.StudyStopped, match="alice"):
        hitl_pruner.ask(study)
    # Outside study.optimize the pruner does not call study.stop() (which would raise there):
    # the trial asked before goes on and is told as usual.
    trial.report(1.0, 0)
    assert not trial.should_prune()
    hitl_pruner.tell(study, trial, 1.0)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_a_stop_after_a_trials_last_should_prune_still_keeps_the_next_trial_from_starting(
) -> None:
    """The pruner's first check arms a look at the end of every trial (the sampler's
    after_trial): a stop made after a trial's last should_prune() is seen before the next."""
    study = optuna.create_study(pruner=hitl_pruner.HumanInTheLoopPruner(check_interval=0))
    stop = {"user": "x", "at": "now", "source": "test", "note_version": 1}

    def objective(trial: optuna.Trial) -> float:
        trial.report(0.0, 0)
        assert not trial.should_prune()
        if trial.number == 2:  # after its last check, as a human's stop may come
            study._storage.set_study_system_attr(study._study_id, STOP_ATTR, stop)
        return 1.0

    study.optimize(objective, n_trials=10)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    # The wrapped sampler still pickles (without the study) and samples.
    sampler = pickle.loads(pickle.dumps(study.sampler))
    assert isinstance(sampler.sampler, optuna.samplers.TPESampler)


def test_a_stop_on_a_journal_is_applied_by_the_sweep(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")
    study = optuna.create_study(
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path)),
        study_name="j",
    )
    app = app_for(path)
    save_note(study, "STOP")
    app.sweeper.run_once()
    assert hitl_pruner.study_stopped(study)
    actions = call(app, "GET", "/hitl/api/actions").json()["actions"]
    assert [a["action"] for a in actions] == ["stop study"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "journal"])
def test_the_stop_filter_lists_exactly_the_study_stops_and_resumes(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The Human actions view's "Stop or resume study" filter (action=stop), in SQL and on a
    journal: study-level rows only, never a trial's change; and no other filter lists them."""
    if backend == "journal":
        where: str = str(tmp_path / "journal.log")
        storage: Any = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(where))
    else:
        where = storage = request.getfixturevalue(
            {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[backend])
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = study.ask()._trial_id  # a plain worker's trial, forced at once
    app = app_for(where)
    r = call(app, "PUT", f"/api/studies/{study._study_id}/{trial_id}/note",
             {"version": 1, "body": "PRUNE"}, environ={"REMOTE_USER": "bob"})
    assert r.status == 204, r.body
    save_note(study, "STOP")
    app.sweeper.run_once()
    save_note(study, "")
    app.sweeper.run_once()

    def listed(query: str) -> list[str]:
        page = call(app, "GET", "/hitl/api/actions", environ={"QUERY_STRING": query}).json()
        # A trial's row has no "action": its states say what happened.
        return [a.get("action", f"{a['from']} -> {a['to']}") for a in page["actions"]]

    assert listed("") == ["resume study", "stop study", "RUNNING -> PRUNED"]
    assert listed("action=stop") == ["resume study", "stop study"]
    assert listed(f"study={study._study_id}&action=stop") == ["resume study", "stop study"]
    assert listed("action=stop&user=bob") == []
    assert listed("action=prune") == ["RUNNING -> PRUNED"]
    assert listed("action=relabel") == listed("action=undo") == []


def test_a_stop_written_before_the_first_start_is_applied_by_the_first_sweep(
    storage_url: str,
) -> None:
    """Regression: a study note that said STOP before hitl-pruner first ran on the database
    (no trigger queued it) took effect only when someone saved that note again."""
    study = optuna.create_study(storage=storage_url, study_name="s")
    save_note(study, "the data pipeline is broken\n\nSTOP")
    other = optuna.create_study(storage=storage_url, study_name="other")
    save_note(other, "nothing to stop here")
    app = app_for(storage_url)
    app.sweeper.run_once()
    assert hitl_pruner.study_stopped(study)
    assert not hitl_pruner.study_stopped(other)
    [row] = audit_rows(storage_url)
    assert (row.study_id, row.source, row.how) == (study._study_id, "sweep", "stop:0")
    app.sweeper.run_once()
    assert len(audit_rows(storage_url)) == 1, "queued once, applied once"


def test_the_stop_endpoint_edits_the_study_note_and_refuses_bad_input(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="s")
    sid = study._study_id
    app = app_for(sqlite_url)
    path = f"/hitl/api/studies/{sid}/stop"
    save_note(study, "notes")
    r = call(app, "POST", path, {"stop": True}, environ={"REMOTE_USER": "carol"})
    assert r.status == 200, r.body
    assert r.json()["stopped"] and r.json()["note"] == {"version": 2, "body": "notes\n\nSTOP"}
    state = call(app, "GET", path).json()
    assert state["stopped"] and state["stop"]["user"] == "carol"
    r = call(app, "POST", path, {"stop": False})
    assert r.status == 200 and not r.json()["stopped"]
    assert r.json()["note"]["body"] == "notes"
    for body, status in [({"stop": "yes"}, 400), ([], 400), ({}, 400)]:
        r = call(app, "POST", path, body)
        assert r.status == status and "reason" in r.json()
    assert call(app, "POST", path, raw=b"{not json").status == 400
    r = call(app, "POST", path, {"stop": True}, environ={"CONTENT_TYPE": "text/plain"})
    assert r.status == 415
    assert call(app, "POST", "/hitl/api/studies/999/stop", {"stop": True}).status == 404
    assert call(app, "DELETE", path).status == 405
    # Another site's page cannot stop a study with the user's browser.
    r = call(app, "POST", path, {"stop": True}, environ={
        "HTTP_ORIGIN": "http://evil.example", "HTTP_SEC_FETCH_SITE": "cross-site",
    })
    assert r.status == 403
    assert not call(app, "GET", path).json()["stopped"]


def test_a_study_note_save_keeps_the_dashboards_answers(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="s")
    app = app_for(sqlite_url)
    path = f"/api/studies/{study._study_id}/note"
    assert call(app, "PUT", path, {"version": 1, "body": "x"}).status == 204
    stale = call(app, "PUT", path, {"version": 1, "body": "STOP"})
    assert stale.status == 409 and stale.json()["note"]["body"] == "x"
    assert call(app, "PUT", path, {"version": "2", "body": "STOP"}).status == 400
    assert not hitl_pruner.study_stopped(study)


# --- in Chromium -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_stop_study_button_stops_the_study_and_the_banner_says_who(
    sqlite_url: str, pages: Any, tmp_path: Path  # noqa: F811  (the fixture)
) -> None:
    import os

    from processes import gunicorn_server

    from hitl_pruner.auth import hash_password

    study = optuna.create_study(storage=sqlite_url, study_name="stop-in-chromium")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    sid = study._study_id
    env = {"HITL_BASIC_AUTH": f"alice:{hash_password('pw')}"}
    # Every page needs a login but /healthz: the readiness check asks that.
    with gunicorn_server(sqlite_url, tmp_path, env=env, ready="none") as server:
        wait_for(lambda: _healthy(server.base), timeout=30)
        page, _ = pages.open(http_credentials={"username": "alice", "password": "pw"})
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{server.base}/dashboard/studies/{sid}")
        stop = page.locator(".hitl-study-stop button[data-stop=true]")
        stop.click()
        banner = page.locator(".hitl-study-stop[data-stopped=true]")
        banner.wait_for()
        assert "Study stopped by alice" in banner.inner_text()
        assert hitl_pruner.study_stopped(study)
        assert attrs(study)[STOP_ATTR]["user"] == "alice"
        assert study_stop.says_stop(attrs(study)["dashboard:note_str:0"])
        # After a reload, the banner is back at once (it is the server's state, not the page's).
        page.reload()
        banner.wait_for()
        page.mouse.move(1, 1)
        shots = Path(os.environ.get("HITL_TEST_SCREENSHOTS") or tmp_path)
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / "study-stop.png"))

        page.locator(".hitl-study-stop button[data-stop=false]").click()
        page.locator(".hitl-study-stop[data-stopped=false]").wait_for()
        assert not hitl_pruner.study_stopped(study)

        # The Human actions view lists both, in the trial's column, linked to the study.
        page.goto(f"{server.base}/hitl/actions")
        page.wait_for_function("() => document.body.dataset.loaded === 'true'")
        rows = page.locator("#hitl-actions tr")
        assert rows.count() == 2
        assert "resume study" in rows.nth(0).inner_text()
        assert "stop study" in rows.nth(1).inner_text()
        assert "RUNNING" in rows.nth(1).inner_text() and "STOPPED" in rows.nth(1).inner_text()
        page.screenshot(path=str(tmp_path / "study-stop-actions.png"))
        pages.finish()


def _healthy(base: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def test_a_study_outside_study_is_not_stopped(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="other")
    app = app_for(sqlite_url, studies=("watched",))
    r = note(app, study._study_id, "STOP")
    assert r.status == 204 and r.outcome is not None
    assert r.outcome["action"] == "not monitored"
    app.sweeper.run_once()
    assert not hitl_pruner.study_stopped(study)
