"""The README's first command: serve --demo gives a newcomer running trials to prune at once."""

from __future__ import annotations

from pathlib import Path
import time

from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import serve_server
from processes import wait_for
import pytest

pytestmark = pytest.mark.e2e


def test_demo_has_running_trials_to_prune_and_its_worker_goes_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    with serve_server(url, tmp_path, args=["--demo"], interval=1) as server:
        study_id = server.get_json("/api/studies")["study_summaries"][0]["study_id"]

        def running() -> list[int]:
            return sorted(t for t, s in server.trial_states(study_id).items() if s == "Running")

        wait_for(lambda: len(running()) == 2, timeout=30, what="two running demo trials",
                 servers=[server])
        first = running()
        r = server.put_note(study_id, first[0], 1, "PRUNE")
        assert r.status == 204 and r.outcome["action"] == "applied"
        assert server.trial_states(study_id)[first[0]] == "Pruned"
        # The demo worker notices and starts another trial instead of crashing.
        wait_for(lambda: len(running()) == 2 and max(running()) > max(first), timeout=30,
                 what="a new running demo trial", servers=[server])
        # The seeded note that only talks about failing changes nothing.
        assert "Complete" in server.trial_states(study_id).values()
    storage = RDBStorage(url)
    wait_for(
        lambda: all(t.state != TrialState.RUNNING for t in storage.get_all_trials(study_id)),
        timeout=20, what="the demo worker to end its trials when the server stops",
    )


def test_the_demo_worker_starts_no_trial_while_the_study_is_stopped(tmp_path: Path) -> None:
    """Try-it's Stop study: the demo's running trials go on, none starts until Resume study."""
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    with serve_server(url, tmp_path, args=["--demo"], interval=1) as server:
        study_id = server.get_json("/api/studies")["study_summaries"][0]["study_id"]

        def running() -> list[int]:
            return sorted(t for t, s in server.trial_states(study_id).items() if s == "Running")

        wait_for(lambda: len(running()) == 2, timeout=30, what="two running demo trials",
                 servers=[server])
        stopped = server.request("POST", f"/hitl/api/studies/{study_id}/stop", json={"stop": True})
        assert stopped.status == 200, stopped
        before = set(server.trial_states(study_id))
        for tid in running():
            assert server.put_note(study_id, tid, 1, "PRUNE").outcome["action"] == "applied"
        time.sleep(3.0)  # the worker looks once a second before it asks for a trial
        assert set(server.trial_states(study_id)) == before, "no trial started while stopped"

        resumed = server.request("POST", f"/hitl/api/studies/{study_id}/stop",
                                 json={"stop": False})
        assert resumed.status == 200, resumed
        wait_for(lambda: len(running()) == 2, timeout=30, what="the demo to run again",
                 servers=[server])
