"""The browser side, in process: page injection, static files, the actions API and Undo."""

from __future__ import annotations

from pathlib import Path
import re
from typing import Any

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import save
from helpers import state
import optuna
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import pytest

from hitl_pruner.commands import CommandParser
from hitl_pruner.origin import CrossOriginGuard
from hitl_pruner.requests import COOPERATIVE_ATTR
from hitl_pruner.store import Note
from hitl_pruner.ui import PAGE_CSP
from hitl_pruner.ui import STATIC_DIR

TAGS = (
    '<link rel="stylesheet" href="/hitl/static/hitl.css">'
    '<script defer src="/hitl/static/hitl.js"></script>'
)


def undo(app: Any, action_id: int, **environ: Any) -> Any:
    return call(app, "POST", f"/hitl/api/actions/{action_id}/undo", {}, environ=environ or None)


def actions(app: Any, query: str = "") -> list[dict[str, Any]]:
    r = call(app, "GET", "/hitl/api/actions", environ={"QUERY_STRING": query})
    assert r.status == 200, r.body
    return r.json()["actions"]


# -- the dashboard's page ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/studies/1/trials"])
def test_the_dashboard_page_links_our_files_ahead_of_its_bundle(sqlite_url: str, path: str) -> None:
    """Deferred scripts run in order: ours must wrap fetch before the dashboard's bundle runs."""
    app = app_for(sqlite_url)
    page = call(app, "GET", path)
    text = page.body.decode()
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert int(page.headers["Content-Length"]) == len(page.body)
    assert re.match(r"<!DOCTYPE html>\s*<html[^>]*>\s*<head>" + re.escape(TAGS), text), text[:300]
    assert text.index(TAGS) < text.index('src="/static/bundle.js"')
    assert text.count("hitl.js") == 1
    # The dashboard's CSP stays; it allows same-origin scripts, which ours is.
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-cache"
    assert "ETag" not in page.headers and "Last-Modified" not in page.headers


def test_the_page_is_whole_even_for_conditional_and_head_requests(sqlite_url: str) -> None:
    """Regression: a 304 or a byte range of the dashboard's file would skip the injection."""
    app = app_for(sqlite_url)
    full = call(app, "GET", "/dashboard")
    conditional = call(app, "GET", "/dashboard", environ={
        "HTTP_IF_MODIFIED_SINCE": "Sun, 01 Jan 2090 00:00:00 GMT",
        "HTTP_IF_NONE_MATCH": "*",
        "HTTP_RANGE": "bytes=0-10",
    })
    head = call(app, "HEAD", "/dashboard")
    assert conditional.status == 200 and conditional.body == full.body
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == full.headers["Content-Length"]


def test_everything_else_passes_through(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    # The dashboard reads Accept-Encoding without a default.
    bundle = call(app, "GET", "/static/bundle.js", environ={"HTTP_ACCEPT_ENCODING": "identity"})
    detail = call(app, "GET", f"/api/studies/{study._study_id}")
    assert bundle.status == 200 and b"hitl" not in bundle.body[:1000]
    assert detail.status == 200 and len(detail.json()["trials"]) == len(ids)
    assert save(app, study._study_id, ids["running"], 1, "PRUNE").outcome["action"] == "applied"


# -- our files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("hitl.js", "text/javascript; charset=utf-8"),
        ("hitl.css", "text/css; charset=utf-8"),
        ("actions.html", "text/html; charset=utf-8"),
    ],
)
def test_static_files_are_served_with_etags(sqlite_url: str, name: str, content_type: str) -> None:
    app = app_for(sqlite_url)
    r = call(app, "GET", f"/hitl/static/{name}")
    assert r.status == 200
    assert r.body == (STATIC_DIR / name).read_bytes()
    assert r.headers["Content-Type"] == content_type
    assert int(r.headers["Content-Length"]) == len(r.body)
    etag = r.headers["ETag"]
    again = call(app, "GET", f"/hitl/static/{name}", environ={"HTTP_IF_NONE_MATCH": etag})
    assert again.status == 304 and again.body == b""


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/hitl/static/nope.js", 404),
        ("GET", "/hitl/static/../ui.py", 404),
        ("GET", "/hitl/static/%2e%2e%2fui.py", 404),
        ("GET", "/hitl/elsewhere", 404),
        ("POST", "/hitl/static/hitl.js", 405),
        ("DELETE", "/hitl/api/actions", 405),
        ("GET", "/hitl/api/actions/1/undo", 405),
        ("POST", "/hitl/api/studies/1/1", 405),
    ],
    ids=["unknown", "traversal", "encoded-traversal", "unknown-page", "post-static",
         "delete-actions", "get-undo", "post-trial"],
)
def test_what_we_do_not_serve(sqlite_url: str, method: str, path: str, status: int) -> None:
    r = call(app_for(sqlite_url), method, path)
    assert r.status == status and "reason" in r.json()


def test_the_actions_page(sqlite_url: str) -> None:
    app = app_for(sqlite_url)
    page = call(app, "GET", "/hitl/actions")
    assert page.status == 200 and b"Human actions" in page.body
    assert page.headers["Content-Security-Policy"] == PAGE_CSP
    assert b'src="static/hitl.js"' in page.body
    # Its links are relative to /hitl/actions, so the trailing slash goes.
    slash = call(app, "GET", "/hitl/actions/", environ={"SCRIPT_NAME": "/opt"})
    assert slash.status == 301 and slash.headers["Location"] == "/opt/hitl/actions"


def test_the_package_ships_its_static_files() -> None:
    """pyproject.toml's package-data must list what UiMiddleware serves."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'packages = \[[^\]]*"hitl_pruner.static"', pyproject)
    assert re.search(r'"hitl_pruner.static" = \[[^\]]*"\*"', pyproject)
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"hitl.js", "hitl.css", "actions.html"}


# -- GET /hitl/api/actions -------------------------------------------------------------------


def test_actions_are_listed_newest_first_with_who_and_what(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    sid = study._study_id
    save(app, sid, ids["running"], 1, "PRUNE", environ={"REMOTE_USER": "alice"})
    save(app, sid, ids["complete"], 1, "bad split\n\nFAIL", environ={"REMOTE_USER": "bob"})

    relabel, prune = actions(app)
    assert {k: relabel[k] for k in ("study_id", "study_name", "trial_id", "trial_number", "from",
                                     "to", "note_version", "user", "source", "retroactive",
                                     "undo", "state_now", "undoable", "undo_refused")} == {
        "study_id": sid, "study_name": "s", "trial_id": ids["complete"], "trial_number": 0,
        "from": "COMPLETE", "to": "FAIL", "note_version": 1, "user": "bob",
        "source": "note-save", "retroactive": True, "undo": False, "state_now": "FAIL",
        "undoable": True, "undo_refused": None,
    }
    assert (prune["trial_id"], prune["from"], prune["to"], prune["user"]) == (
        ids["running"], "RUNNING", "PRUNED", "alice"
    )
    assert prune["undoable"] is False
    assert prune["undo_refused"] == "a trial ended while RUNNING stays ended"
    # MySQL keeps whole seconds: the id orders actions within one.
    assert relabel["time"] >= prune["time"] and relabel["id"] > prune["id"]
    assert [a["id"] for a in actions(app, "limit=1")] == [relabel["id"]]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=ten", "limit="])
def test_a_bad_limit_is_a_400_that_says_why(sqlite_url: str, query: str) -> None:
    r = call(app_for(sqlite_url), "GET", "/hitl/api/actions", environ={"QUERY_STRING": query})
    assert r.status == 400 and "limit must be an integer from 1 to 1000" in r.json()["reason"]


def test_an_unexpected_error_is_a_500_without_traceback(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_for(sqlite_url)

    def broken(*args: Any, **kwargs: Any) -> list[Any]:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(app.applier.store, "audit_page", broken)
    r = call(app, "GET", "/hitl/api/actions")
    assert r.status == 500 and r.json() == {"reason": "internal server error"}
    assert "database on fire" in caplog.text


# -- POST /hitl/api/actions/<id>/undo ----------------------------------------------------------


def test_undo_takes_the_command_out_of_the_note_and_the_trial_back(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = app_for(storage_url)
    sid, tid = study._study_id, ids["complete"]
    save(app, sid, tid, 1, "bad split\n\nFAIL")
    [relabel] = actions(app)

    r = undo(app, relabel["id"], REMOTE_USER="carol")

    assert r.status == 200, r.body
    assert r.json() == {
        "outcome": {"action": "applied", "reason": "command removed from the note: undo",
                    "trial_id": tid, "from": "FAIL", "to": "COMPLETE"},
        "note": {"version": 2, "body": "bad split"},
    }
    assert r.outcome == r.json()["outcome"]
    assert state(storage_url, tid) is TrialState.COMPLETE
    assert app.store.notes(sid, [tid])[tid] == Note(2, "bad split")
    newest, older = actions(app)
    assert (newest["from"], newest["to"], newest["undo"], newest["user"]) == (
        "FAIL", "COMPLETE", True, "carol"
    )
    assert newest["note_version"] == 2 and newest["undoable"] is False
    assert older["undoable"] is False
    assert older["undo_refused"] == "a newer action changed this trial"
    again = undo(app, relabel["id"])
    assert again.status == 409
    assert again.json()["reason"] == "cannot undo: a newer action changed this trial"


def test_undo_meets_the_dashboards_conflict_when_the_note_moved_on(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Undo saves through the note API, with its version rule: a stale version gets a 409."""
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    sid, tid = study._study_id, ids["complete"]
    save(app, sid, tid, 1, "FAIL")
    [relabel] = actions(app)
    monkeypatch.setattr(app.store, "notes", lambda study_id, trial_ids: {tid: Note(0, "FAIL")})

    r = undo(app, relabel["id"])

    assert r.status == 409
    assert r.json()["reason"].startswith("The text you are editing has changed.")
    assert state(sqlite_url, tid) is TrialState.FAIL


@pytest.mark.parametrize(
    "content_type, status, reason",
    [
        ("application/x-www-form-urlencoded", 415, "send Content-Type: application/json"),
        ("text/plain", 415, "send Content-Type: application/json"),
        ("", 415, "send Content-Type: application/json"),
    ],
    ids=["form", "text", "none"],
)
def test_undo_wants_json_so_that_no_other_site_can_post_it(
    sqlite_url: str, content_type: str, status: int, reason: str
) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    save(app, study._study_id, ids["complete"], 1, "FAIL")
    [relabel] = actions(app)
    r = call(app, "POST", f"/hitl/api/actions/{relabel['id']}/undo", raw=b"",
             environ={"CONTENT_TYPE": content_type})
    assert r.status == status and reason in r.json()["reason"]
    assert state(sqlite_url, ids["complete"]) is TrialState.FAIL


def test_undo_refuses_what_it_cannot_undo(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    save(app, study._study_id, ids["running"], 1, "PRUNE")
    [prune] = actions(app)
    assert undo(app, 999).status == 404
    r = undo(app, prune["id"])
    assert r.status == 409 and "stays ended" in r.json()["reason"]
    assert state(sqlite_url, ids["running"]) is TrialState.PRUNED


def test_undo_refuses_when_retroactive_changes_are_off(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    save(app_for(sqlite_url), study._study_id, ids["complete"], 1, "FAIL")
    app = app_for(sqlite_url, retroactive=False)
    [relabel] = actions(app)
    assert relabel["undo_refused"] == "retroactive changes are off (--active-only)"
    assert undo(app, relabel["id"]).status == 409


# -- GET /hitl/api/studies/<sid>/<tid>: what the buttons offer -------------------------------


def trial_info(app: Any, study_id: int, trial_id: int) -> dict[str, Any]:
    r = call(app, "GET", f"/hitl/api/studies/{study_id}/{trial_id}")
    assert r.status == 200, r.body
    return r.json()


def verdicts(info: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    return {name: (c["allowed"], c["action"]) for name, c in info["commands"].items()}


def test_a_running_trial_offers_both_commands_with_its_note(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    save(app, study._study_id, ids["running"], 1, "watching this one")
    info = trial_info(app, study._study_id, ids["running"])
    assert {k: info[k] for k in ("trial_id", "study_id", "number", "state", "note", "dry_run")} == {
        "trial_id": ids["running"], "study_id": study._study_id, "number": 2,
        "state": "RUNNING", "note": {"version": 1, "body": "watching this one"}, "dry_run": False,
    }
    assert info["commands"]["PRUNE"] == {
        "allowed": True, "action": "applied", "reason": "PRUNE note", "text": "PRUNE",
        "to": "PRUNED",
    }
    assert verdicts(info)["FAIL"] == (True, "applied")


@pytest.mark.parametrize(
    "label, settings, prune, fail, reason",
    [
        ("complete", {}, (True, "applied"), (True, "applied"), None),
        ("complete", {"retroactive": False}, (False, "refused"), (False, "refused"),
         "trial is COMPLETE and retroactive changes are off (--active-only)"),
        ("complete", {"studies": ("other",)}, (False, "refused"), (False, "refused"),
         "study 's' is outside --study"),
        ("pruned_by_worker", {}, (False, "nothing to do"), (False, "refused"), None),
        ("failed_by_worker", {}, (False, "refused"), (False, "nothing to do"), None),
        ("waiting", {}, (True, "applied"), (True, "applied"), None),
        ("complete", {"dry_run": True}, (True, "applied"), (True, "applied"), None),
    ],
    ids=["complete", "active-only", "not-monitored", "pruned", "failed", "waiting", "dry-run"],
)
def test_the_buttons_follow_the_appliers_rules(
    sqlite_url: str, label: str, settings: dict[str, Any], prune: tuple[bool, str],
    fail: tuple[bool, str], reason: str | None,
) -> None:
    study, ids = make_study(sqlite_url)
    info = trial_info(app_for(sqlite_url, **settings), study._study_id, ids[label])
    assert verdicts(info) == {"PRUNE": prune, "FAIL": fail}
    assert info["dry_run"] is bool(settings.get("dry_run"))
    if reason is not None:
        assert info["commands"]["FAIL"]["reason"] == reason


def test_a_relabelled_trial_offers_the_other_command(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url)
    save(app, study._study_id, ids["complete"], 1, "FAIL")
    info = trial_info(app, study._study_id, ids["complete"])
    assert info["state"] == "FAIL"
    assert verdicts(info) == {"PRUNE": (True, "applied"), "FAIL": (False, "nothing to do")}


def test_a_cooperative_workers_trial_offers_to_ask_it(sqlite_url: str) -> None:
    """A worker running HumanInTheLoopPruner is asked, not forced: the button still shows."""
    study, ids = make_study(sqlite_url)
    RDBStorage(sqlite_url).set_trial_system_attr(ids["running"], COOPERATIVE_ATTR, True)
    app = app_for(sqlite_url)
    sid, tid = study._study_id, ids["running"]
    assert verdicts(trial_info(app, sid, tid)) == {
        "PRUNE": (True, "requested"), "FAIL": (True, "requested")
    }
    assert save(app, sid, tid, 1, "PRUNE").outcome["action"] == "requested"
    info = trial_info(app, sid, tid)
    assert info["state"] == "RUNNING"
    assert verdicts(info) == {"PRUNE": (False, "nothing to do"), "FAIL": (True, "requested")}


def test_a_journal_storage_says_why_finished_trials_have_no_buttons(tmp_path: Path) -> None:
    url = str(tmp_path / "journal.log")
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(url)))
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    app = app_for(url)
    finished = trial_info(app, study._study_id, done._trial_id)
    assert verdicts(finished) == {"PRUNE": (False, "refused"), "FAIL": (False, "refused")}
    assert "journal storage is append-only" in finished["commands"]["PRUNE"]["reason"]
    assert verdicts(trial_info(app, study._study_id, running._trial_id))["PRUNE"] == (
        True, "applied"
    )


def test_patterns_that_do_not_read_the_buttons_words_turn_the_buttons_off(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url, prune_pattern=r"#prune\b")
    info = trial_info(app, study._study_id, ids["running"])
    assert verdicts(info) == {"PRUNE": (False, "refused"), "FAIL": (True, "applied")}
    assert info["commands"]["PRUNE"]["reason"] == (
        "the configured patterns do not read 'PRUNE' as PRUNE"
    )


def test_a_trial_of_another_study_is_a_404(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    path = f"/hitl/api/studies/{study._study_id + 1}/{ids['running']}"
    r = call(app_for(sqlite_url), "GET", path)
    assert r.status == 404 and "has no trial" in r.json()["reason"]


# -- composition -----------------------------------------------------------------------------


def test_create_app_still_offers_the_middlewares_attributes(sqlite_url: str) -> None:
    """gunicorn's hooks and the tests use start_background, stop_background and sweeper."""
    app = app_for(sqlite_url)
    assert isinstance(app, CrossOriginGuard)
    assert callable(app.start_background) and callable(app.stop_background)
    assert app.sweeper.run_once() is not None
    assert app.store is app.applier.store
    assert hasattr(app.app, "_inmemory_cache")  # .app is still the dashboard
    with pytest.raises(AttributeError):
        app.no_such_attribute


# -- CommandParser.strip -------------------------------------------------------------------


@pytest.mark.parametrize(
    "note, stripped",
    [
        ("", ""),
        ("no command here", "no command here"),
        ("bad split\n\nFAIL", "bad split"),
        ("PRUNE", ""),
        ("PRUNE\n", ""),
        ("diverges, PRUNE it", "diverges,  it"),
        ("a\nFAIL\nb\n", "a\nb"),
        ("PRUNE then FAIL", " then"),
        ("pruned layers and Failure analysis\nFAIL", "pruned layers and Failure analysis"),
        ("  keep my indent\nFAIL", "  keep my indent"),
    ],
    ids=["empty", "none", "own-line", "only", "only-newline", "inline", "middle", "both",
         "prose", "indent"],
)
def test_strip_removes_the_command_words_only(note: str, stripped: str) -> None:
    parser = CommandParser()
    assert parser.strip(note) == stripped
    assert parser.parse(parser.strip(note)) is None


def test_strip_follows_custom_patterns_even_across_lines() -> None:
    parser = CommandParser(r"(?s)kill\s+it", r"#fail\b")
    assert parser.strip("ok, kill\nit now\n#fail") == "ok,  now"
    assert parser.parse(parser.strip("ok, kill\nit now\n#fail")) is None
