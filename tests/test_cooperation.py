"""Cooperation on evidence, not on memory (issue 8, item 10).

The server asks a RUNNING trial's worker instead of ending the trial only on evidence: the
trial's own mark (written by HumanInTheLoopPruner or hitl_pruner.ask), or, for a trial that has
not reported yet, the heartbeat of a wrapped worker of the study that is alive now. Anything
else is forced at once, and the answer says which evidence it went by.

In process on SQLite, PostgreSQL and MariaDB; the worker that comes and goes is a real process
(the worker program of test_worker_processes.py). test_worker_processes.py has the same with a
real server and a heartbeat that grows old in real time.
"""

from __future__ import annotations

from pathlib import Path
import re
import subprocess
import sys
import time

from helpers import app_for
from helpers import audit_rows
from helpers import save
from helpers import state
import optuna
from optuna.pruners import NopPruner
from optuna.storages import RDBStorage
from optuna.trial import TrialState as S
from processes import child_env
import pytest
import sqlalchemy as sa

from hitl_pruner import HumanInTheLoopPruner
from hitl_pruner.requests import COOPERATIVE_ATTR
from hitl_pruner.requests import HEARTBEAT_EVERY
from hitl_pruner.requests import evidence
from hitl_pruner.store import TrialRef

WORKER_PROGRAM = Path(__file__).with_name("test_worker_processes.py")
MARKED = "the trial is marked by HumanInTheLoopPruner or hitl_pruner.ask"
ALIVE = (
    "a worker of this study running HumanInTheLoopPruner was seen less than 1 s ago; this trial "
    "has not reported yet"
)
SEEN = re.compile(
    r"a worker of this study running HumanInTheLoopPruner was seen (less than 1 s|(\d+) s) ago; "
    r"this trial has not reported yet"
)


def assert_seen_within(reason: str, since: float) -> None:
    """The reason says a worker was seen, and no longer ago than ``since``, the test's own
    count from before the heartbeat: "less than 1 s" when the test got there at once, as it
    does on an idle machine; the whole seconds a busy one took, no more."""
    found = SEEN.search(reason)
    assert found, reason
    seconds = 0 if found[2] is None else int(found[2])  # "less than 1 s": 0 when rounded
    assert seconds <= since + 0.5, (reason, since)


def heartbeats(url: str) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM hitl_workers")).all()
    finally:
        engine.dispose()


def ref_of(study: optuna.Study, trial_id: int) -> TrialRef:
    trial = study._storage.get_trial(trial_id)
    return TrialRef(trial_id, study._study_id, study.study_name, trial.number, trial.state)


@pytest.mark.parametrize(
    "marked, reported, seen_ago, expected",
    [
        pytest.param(True, True, None, MARKED, id="marked-reported"),
        pytest.param(True, False, 999.0, MARKED, id="marked-no-heartbeat-needed"),
        pytest.param(False, False, 0.2, ALIVE, id="not-reported-worker-alive"),
        pytest.param(False, False, 3.4, ALIVE.replace("less than 1 s", "3 s"), id="seen-3-s-ago"),
        pytest.param(False, False, 10.5, None, id="not-reported-heartbeat-expired"),
        pytest.param(False, False, None, None, id="not-reported-no-wrapped-worker"),
        pytest.param(False, True, 0.2, None, id="reported-without-marking: plain"),
    ],
)
def test_only_the_trials_mark_or_a_live_wrapped_worker_is_evidence(
    marked: bool, reported: bool, seen_ago: float | None, expected: str | None
) -> None:
    assert evidence(
        marked=marked, reported=reported, seen_ago=seen_ago, alive_for=10.0
    ) == expected


def test_a_study_mark_left_by_an_earlier_version_is_no_evidence(storage_url: str) -> None:
    """Regression: the study system attr `hitl:cooperative` never expired, so every later
    command on a trial that had not reported waited out the grace period."""
    app = app_for(storage_url, grace=60)
    study = optuna.create_study(study_name="s", storage=storage_url)
    study._storage.set_study_system_attr(study._study_id, COOPERATIVE_ATTR, True)
    plain = study.ask()
    r = save(app, study._study_id, plain._trial_id, 1, "PRUNE")
    assert (r.outcome["action"], r.outcome["to"]) == ("applied", "PRUNED"), r.outcome
    assert state(storage_url, plain._trial_id) is S.PRUNED


def test_a_plain_trial_is_forced_at_once_after_a_wrapped_worker_ran_and_exited(
    storage_url: str, tmp_path: Path
) -> None:
    """Regression: one run with HumanInTheLoopPruner made every later PRUNE/FAIL on the study
    answer "requested ... (it uses HumanInTheLoopPruner)" and wait out the grace period."""
    app = app_for(storage_url, grace=60)
    study = optuna.create_study(study_name="s", storage=storage_url)
    ran = subprocess.run(
        [sys.executable, str(WORKER_PROGRAM), "wrapped", storage_url, "s", "2", "2"],
        capture_output=True, text=True, timeout=120, env=child_env(), check=False,
    )
    assert ran.returncode == 0, ran.stderr
    storage = RDBStorage(storage_url)
    wrapped = storage.get_all_trials(study._study_id)
    assert len(wrapped) == 2
    assert all(t.system_attrs.get(COOPERATIVE_ATTR) is True for t in wrapped), "it checked"

    # A plain worker's trial, still in its first step (nothing reported).
    plain = study.ask()
    r = save(app, study._study_id, plain._trial_id, 1, "PRUNE")
    assert (r.outcome["action"], r.outcome["to"]) == ("applied", "PRUNED"), r.outcome
    assert state(storage_url, plain._trial_id) is S.PRUNED
    [row] = audit_rows(storage_url)
    assert (row.trial_id, row.to_state, row.how) == (plain._trial_id, "PRUNED", "forced")
    assert heartbeats(storage_url) == [], "an exiting worker takes its heartbeat with it"


def test_a_trial_not_reported_yet_is_asked_while_a_wrapped_worker_is_alive_and_says_why(
    storage_url: str,
) -> None:
    app = app_for(storage_url, grace=60)
    study = optuna.create_study(
        study_name="s", storage=storage_url,
        pruner=HumanInTheLoopPruner(NopPruner(), check_interval=0),
    )
    checking = study.ask()
    checking.report(0.5, 0)
    beat = time.monotonic()
    assert checking.should_prune() is False  # marks the trial, and beats

    fresh = study.ask()  # this worker's next trial (or another's), before its first report
    r = save(app, study._study_id, fresh._trial_id, 1, "PRUNE")
    assert (r.outcome["action"], r.outcome["to"]) == ("requested", "PRUNED"), r.outcome
    assert_seen_within(r.outcome["reason"], time.monotonic() - beat)
    assert "marked" not in r.outcome["reason"]
    assert state(storage_url, fresh._trial_id) is S.RUNNING

    r = save(app, study._study_id, checking._trial_id, 1, "FAIL")
    assert r.outcome["action"] == "requested", r.outcome
    assert MARKED in r.outcome["reason"] and "was seen" not in r.outcome["reason"], r.outcome

    # A trial that reported without marking itself runs in a plain worker, heartbeat or not.
    reported = study.ask()
    reported.report(0.5, 0)
    r = save(app, study._study_id, reported._trial_id, 1, "PRUNE")
    assert r.outcome["action"] == "applied", r.outcome


def test_a_heartbeat_counts_only_for_its_window_on_the_databases_clock(storage_url: str) -> None:
    """The heartbeat's age is measured on the database's clock, on every backend."""
    app = app_for(storage_url)
    study = optuna.create_study(
        study_name="s", storage=storage_url,
        pruner=HumanInTheLoopPruner(NopPruner(), check_interval=0),
    )
    checking = study.ask()
    checking.report(0.5, 0)
    beat = time.monotonic()
    checking.should_prune()
    fresh = study.ask()
    ref = ref_of(study, fresh._trial_id)

    alive = app.store.worker(ref, alive_for=HEARTBEAT_EVERY)
    assert alive.cooperates is True
    assert_seen_within(alive.evidence, time.monotonic() - beat)
    assert SEEN.fullmatch(alive.evidence), alive.evidence
    time.sleep(0.5)
    gone = app.store.worker(ref, alive_for=0.4)
    assert (gone.cooperates, gone.evidence) == (False, "")
    assert app.store.worker(ref_of(study, checking._trial_id), alive_for=0.4).cooperates, (
        "the trial's own mark does not expire"
    )
