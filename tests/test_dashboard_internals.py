"""One test per optuna-dashboard internal we use: an upgrade that moves one fails here first."""

from __future__ import annotations

import inspect
from pathlib import Path
import subprocess
import sys

from helpers import call
import optuna
from optuna.storages import RDBStorage
import optuna_dashboard
from optuna_dashboard import _note
from optuna_dashboard import save_note
import pytest

from hitl_pruner import dashboard
from hitl_pruner import notes

BUNDLE = Path(optuna_dashboard.__file__).parent / "public" / "bundle.js"


def test_the_installed_release_is_one_whose_internals_we_know() -> None:
    assert dashboard.known_release(optuna_dashboard.__version__) is dashboard.RELEASE
    for other in ("0.18.0", "0.22.0", "1.0.0"):
        with pytest.raises(dashboard.UnsupportedDashboard, match=r"optuna-dashboard>=0\.19,<0\.22"):
            dashboard.known_release(other)


@pytest.mark.parametrize("server", ["create_app", "wsgi", "HitlMiddleware"])
def test_another_release_refuses_to_start_and_says_why(server: str) -> None:
    """No silent fallback: on a release we do not know, what builds a server fails to import."""
    code = (
        "import optuna_dashboard; optuna_dashboard.__version__ = '0.22.0'; "
        f"from hitl_pruner import {server}"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "UnsupportedDashboard" in run.stderr
    assert "not of the installed 0.22.0: install 'optuna-dashboard>=0.19,<0.22'" in run.stderr


@pytest.mark.parametrize("trial_id", [None, 0, 7])
def test_our_note_keys_and_chunks_are_the_dashboards(trial_id: int | None) -> None:
    """notes.py (which the worker side imports instead of the dashboard) keys and cuts a note
    as optuna_dashboard._note does: the study's note (no trial id) and a trial's."""
    assert notes.note_ver_key(trial_id) == _note.note_ver_key(trial_id)
    assert notes.note_str_key_prefix(trial_id) == _note.note_str_key_prefix(trial_id)
    for length in (0, 1, 2044, 2045, 2046, 4090, 4091, 10_000):
        body = "".join(chr(0x61 + i % 26) for i in range(length))
        assert notes.split_body(body, trial_id) == _note.split_body(body, trial_id), length
    assert dashboard.split_body is notes.split_body


def test_the_bundle_has_one_router_prefix_and_one_api_base_as_its_release_spells_them() -> None:
    bundle = BUNDLE.read_bytes()
    assert bundle.count(dashboard.BUNDLE_ROUTER) == 1
    [(_, default, _)] = dashboard.BUNDLE_API_BASE.findall(bundle)
    assert default in (b"void 0", b'""')  # API_ENDPOINT unset: the API is at the root


def test_the_dashboards_page_sends_the_policy_its_release_does(sqlite_url: str) -> None:
    page = call(optuna_dashboard.wsgi(RDBStorage(sqlite_url)), "GET", "/dashboard")
    assert page.status == 200
    assert page.headers.get("Content-Security-Policy") == dashboard.PAGE_CSP
    # Where it sends none (0.19), ours holds the page to the policy 0.20 introduced.
    assert (dashboard.PAGE_CSP is None) == (dashboard.PAGE_CSP_ADDED is not None)


def test_wsgi_takes_an_llm_provider_from_the_release_that_has_them() -> None:
    takes = "llm_provider" in inspect.signature(optuna_dashboard.wsgi).parameters
    assert takes == (dashboard.RELEASE is not dashboard.RELEASES["0.19"])


def test_trial_notes_live_in_study_system_attrs_under_these_keys(sqlite_url: str) -> None:
    study = optuna.create_study(storage=RDBStorage(sqlite_url))
    trial = study.ask()
    save_note(trial, "x" * 2045 + "PRUNE")
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[dashboard.note_ver_key(trial._trial_id)] == 1
    prefix = dashboard.note_str_key_prefix(trial._trial_id)
    assert prefix == f"dashboard:{trial._trial_id}:note_str:"
    assert attrs[f"{prefix}0"] == "x" * 2045 and attrs[f"{prefix}1"] == "PRUNE"


def test_note_saves_need_the_stored_version_plus_one(sqlite_url: str) -> None:
    storage = RDBStorage(sqlite_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    app = optuna_dashboard.wsgi(storage)
    path = f"/api/studies/{study._study_id}/{trial._trial_id}/note"
    assert call(app, "PUT", path, {"version": 1, "body": "a"}).status == 204
    assert call(app, "PUT", path, {"version": 1, "body": "b"}).status == 409
    assert call(app, "PUT", path, {"version": 2, "body": "b"}).status == 204


def test_a_script_saves_a_note_as_the_dashboards_note_api_does(sqlite_url: str) -> None:
    """dashboard.save_note (prune/fail/undo from a script) uses the dashboard's own
    version_is_incremented and save_note_with_version: the dashboard reads what it wrote."""
    storage = RDBStorage(sqlite_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    sid, tid = study._study_id, trial._trial_id
    assert dashboard.save_note(storage, sid, tid, 1, "y" * 2045 + "FAIL")
    assert not dashboard.save_note(storage, sid, tid, 1, "stale")
    assert dashboard.save_note(storage, sid, tid, 2, "short")
    app = optuna_dashboard.wsgi(storage)
    detail = call(app, "GET", f"/api/studies/{sid}").json()
    [shown] = [t["note"] for t in detail["trials"] if t["trial_id"] == tid]
    assert shown == {"version": 2, "body": "short"}


def test_the_dashboard_caches_trials_per_study_until_we_forget_them(sqlite_url: str) -> None:
    storage = RDBStorage(sqlite_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    app = dashboard.create(storage, None)
    path = f"/api/studies/{study._study_id}"
    assert call(app, "GET", path).json()["trials"][0]["state"] == "Running"
    study.tell(trial, 1.0)
    # Within the cache's TTL the dashboard still answers from memory...
    assert call(app, "GET", path).json()["trials"][0]["state"] == "Running"
    assert study._study_id in app._inmemory_cache._trials_cache
    dashboard.forget_study(app, study._study_id)
    assert study._study_id not in app._inmemory_cache._trials_cache
    assert study._study_id not in app._inmemory_cache._cached_extra_study_property_cache
    # ...and reads the storage again once we forget the study.
    assert call(app, "GET", path).json()["trials"][0]["state"] == "Complete"


def test_we_refresh_changed_trials_in_the_dashboards_cache_without_reading_the_rest(
    sqlite_url: str,
) -> None:
    storage = RDBStorage(sqlite_url)
    study = optuna.create_study(storage=storage)
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    running = study.ask()
    app = dashboard.create(storage, None)
    sid, path = study._study_id, f"/api/studies/{study._study_id}"
    assert [t["state"] for t in call(app, "GET", path).json()["trials"]] == ["Complete"] * 3 + [
        "Running"
    ]
    cached = app._inmemory_cache._trials_cache[sid]
    fetched_at = app._inmemory_cache._trials_last_fetched_at[sid]
    study.tell(running, state=optuna.trial.TrialState.PRUNED)
    dashboard.refresh_trials(app, storage, sid, [running._trial_id], search_space=False)
    # The untouched trials are the very objects read before, and the cache keeps its age...
    refreshed = app._inmemory_cache._trials_cache[sid]
    assert all(a is b for a, b in zip(refreshed[:3], cached[:3]))
    assert app._inmemory_cache._trials_last_fetched_at[sid] == fetched_at
    assert sid in app._inmemory_cache._cached_extra_study_property_cache
    # ...while the changed trial shows its new state at once.
    assert call(app, "GET", path).json()["trials"][3]["state"] == "Pruned"
    dashboard.refresh_trials(app, storage, sid, [running._trial_id], search_space=True)
    assert sid not in app._inmemory_cache._cached_extra_study_property_cache


def test_the_dashboard_takes_an_artifact_store(tmp_path: object, sqlite_url: str) -> None:
    app = dashboard.create(RDBStorage(sqlite_url), str(tmp_path))
    assert call(app, "GET", "/api/meta").json()["artifact_is_available"] is True


def test_optuna_keeps_trial_states_by_name_in_the_trials_table(sqlite_url: str) -> None:
    """rdb.py writes trials.state and reads study_system_attributes through optuna's models."""
    import sqlalchemy as sa

    from hitl_pruner import rdb

    study = optuna.create_study(storage=RDBStorage(sqlite_url))
    study.ask()
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT state FROM trials")).scalar()
    engine.dispose()
    assert raw == "RUNNING"
    assert {"trial_id", "study_id", "number", "state", "datetime_complete"} <= set(
        rdb.trials_t.c.keys()
    )
    assert {"study_id", "key", "value_json"} <= set(rdb.attrs_t.c.keys())
