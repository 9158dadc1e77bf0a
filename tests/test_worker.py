"""HumanInTheLoopPruner and the ask-and-tell helpers, in process, against a server app.

The worker's study and the server use separate storages and engines, as two processes would;
the note saves happen inside the objective, so each test is deterministic. test_worker_processes.py
runs the same with real processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import subprocess
import sys
from typing import Any

from helpers import app_for
from helpers import call
from helpers import save
from helpers import state
import optuna
from optuna.pruners import HyperbandPruner
from optuna.pruners import MedianPruner
from optuna.pruners import NopPruner
from optuna.pruners import PercentilePruner
from optuna.pruners import ThresholdPruner
from optuna.samplers import RandomSampler
from optuna.samplers import TPESampler
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState as S
import pytest
import sqlalchemy as sa

import hitl_pruner
from hitl_pruner import HumanInTheLoopPruner
from hitl_pruner import fail_tell
from hitl_pruner import rdb
from hitl_pruner import worker


def audit_how(url: str) -> list[tuple[int, str, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT trial_number, to_state, how FROM hitl_audit ORDER BY trial_number"
            ))
            return [tuple(r) for r in rows]
    finally:
        engine.dispose()


def hitl_study(url: str, wrapped: optuna.pruners.BasePruner | None = None, **kw: Any) -> (
    optuna.Study
):
    """A worker's study: from the URL, so Optuna caches trials as in any worker."""
    return optuna.create_study(
        study_name="w", storage=url, load_if_exists=True,
        pruner=HumanInTheLoopPruner(wrapped or NopPruner(), check_interval=0), **kw,
    )


def human_at_step_1(app: Any, notes: dict[int, str], steps: int = 4) -> Any:
    """An objective that reports and checks every step; at step 1 of trial number n a human
    saves notes[n] on it through the dashboard."""

    def objective(trial: optuna.Trial) -> float:
        for step in range(steps):
            trial.report(step / 10, step)
            if step == 1 and trial.number in notes:
                r = save(app, trial.study._study_id, trial._trial_id, 1, notes[trial.number])
                assert r.outcome["action"] == "requested", r.outcome
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    return objective


def test_prune_and_fail_notes_end_their_trials_and_optimize_runs_every_trial(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_for(storage_url, grace=60)
    study = hitl_study(storage_url)
    with caplog.at_level(logging.INFO, logger="hitl_pruner"):
        # No catch=...: a human's FAIL must not escape optimize.
        study.optimize(human_at_step_1(app, {1: "PRUNE", 2: "FAIL"}), n_trials=4)
    trials = RDBStorage(storage_url).get_all_trials(study._study_id)
    assert [t.state for t in trials] == [S.COMPLETE, S.PRUNED, S.FAIL, S.COMPLETE]
    assert trials[1].intermediate_values == {0: 0.0, 1: 0.1}
    assert trials[2].intermediate_values == {0: 0.0, 1: 0.1}
    assert "a human asked to FAIL trial 2" in caplog.text
    app.sweeper.run_once()
    assert audit_how(storage_url) == [(1, "PRUNED", "worker"), (2, "FAIL", "worker")]


def test_the_fail_button_ends_a_running_trial_as_fail_and_optimize_goes_on(
    sqlite_url: str,
) -> None:
    app = app_for(sqlite_url, grace=60)
    study = hitl_study(sqlite_url)

    def objective(trial: optuna.Trial) -> float:
        for step in range(3):
            trial.report(step, step)
            if step == 1 and trial.number == 0:
                r = call(app, "POST", f"/api/trials/{trial._trial_id}/tell", {"state": "Fail"})
                assert r.outcome["action"] == "requested"
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.get_trials()] == [S.FAIL, S.COMPLETE]


def test_a_fail_note_ends_its_trial_as_fail_under_optimize_with_catch_too(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Scripts written for older releases of this README pass catch=(optuna.TrialPruned,): the
    same FAIL, the same log, nothing caught."""
    app = app_for(sqlite_url, grace=60)
    study = hitl_study(sqlite_url)
    with caplog.at_level(logging.INFO, logger="hitl_pruner"):
        study.optimize(human_at_step_1(app, {0: "FAIL"}), n_trials=2,
                       catch=(optuna.TrialPruned,))
    assert [t.state for t in study.get_trials()] == [S.FAIL, S.COMPLETE]
    assert "a human asked to FAIL trial 0" in caplog.text
    assert "catch=" not in caplog.text


def test_the_tell_is_left_as_it_was_once_the_failed_trial_is_told(sqlite_url: str) -> None:
    """What fail_tell puts on the study's storage for a FAIL request (Optuna 4.0 to 4.4: the
    read-back) is gone once the trial is told: no later trial is read or written through it."""
    app = app_for(sqlite_url, grace=60)
    study = hitl_study(sqlite_url)
    seen: list[bool] = []
    study.optimize(human_at_step_1(app, {0: "FAIL"}), n_trials=2,
                   callbacks=[lambda s, t: seen.append(fail_tell.pending(s._storage))])
    assert seen == [False, False]
    assert "get_trial" not in vars(study._storage)


def heartbeats(url: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT study_id, worker FROM hitl_workers"
            ))]
    finally:
        engine.dispose()


def test_a_trial_is_marked_on_its_first_should_prune_and_the_process_beats_not_the_study(
    sqlite_url: str,
) -> None:
    """The study is not marked: a study mark never expired, and outlived every wrapped worker."""
    app_for(sqlite_url)
    study = hitl_study(sqlite_url)
    trial = study.ask()
    trial.report(1.0, 0)
    storage = RDBStorage(sqlite_url)
    assert "hitl:cooperative" not in storage.get_trial(trial._trial_id).system_attrs
    assert heartbeats(sqlite_url) == []
    assert trial.should_prune() is False
    assert storage.get_trial(trial._trial_id).system_attrs["hitl:cooperative"] is True
    assert "hitl:cooperative" not in storage.get_study_system_attrs(study._study_id)
    [(study_id, name)] = heartbeats(sqlite_url)
    assert study_id == study._study_id and f":{os.getpid()}:" in name

    worker._retire_all()  # what the process does when it exits
    assert heartbeats(sqlite_url) == []


@pytest.mark.parametrize(
    "make_pruner",
    [
        pytest.param(lambda: MedianPruner(n_startup_trials=2), id="median"),
        pytest.param(lambda: PercentilePruner(40.0, n_startup_trials=2), id="percentile"),
        pytest.param(lambda: ThresholdPruner(upper=0.6), id="threshold"),
        pytest.param(lambda: HyperbandPruner(min_resource=1, max_resource=6), id="hyperband"),
    ],
)
def test_the_wrapper_prunes_exactly_like_the_wrapped_pruner(
    sqlite_url: str, make_pruner: Any
) -> None:
    def run(url: str, pruner: optuna.pruners.BasePruner) -> list[tuple[S, int | None]]:
        app_for(url)
        # The same study name in two databases: Hyperband's brackets hash the name.
        study = optuna.create_study(study_name="s", storage=url, pruner=pruner,
                                    sampler=RandomSampler(seed=1))

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", 0, 1)
            for step in range(6):
                trial.report(x * (1 + step / 10), step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return x

        study.optimize(objective, n_trials=12)
        return [(t.state, t.last_step) for t in study.trials]

    bare = run(sqlite_url, make_pruner())
    wrapped = run(sqlite_url[:-3] + "-wrapped.db",
                  HumanInTheLoopPruner(make_pruner(), check_interval=0))
    assert wrapped == bare
    assert any(s is S.PRUNED for s, _ in bare), "the case must prune something"


def test_the_wrapper_of_a_hyperband_pruner_keeps_the_samplers_bracket_view(
    sqlite_url: str,
) -> None:
    """Optuna gives the sampler one bracket's trials only when study.pruner is a Hyperband."""
    pruner = HumanInTheLoopPruner(HyperbandPruner(min_resource=1, max_resource=9))
    assert isinstance(pruner, HyperbandPruner) and isinstance(pruner, HumanInTheLoopPruner)
    study = optuna.create_study(storage=sqlite_url, pruner=pruner)
    for _ in range(3):
        t = study.ask()
        t.report(1.0, 8)
        t.should_prune()
        study.tell(t, 1.0)
    trial = study.trials[-1]
    filtered = optuna.pruners._filter_study(study, trial)
    assert filtered is not study and type(filtered).__name__ == "_BracketStudy"
    assert not isinstance(HumanInTheLoopPruner(MedianPruner()), HyperbandPruner)


def test_the_worker_side_imports_optuna_and_not_the_dashboard() -> None:
    """A worker process imports hitl_pruner for its pruner, ask/tell and the study stop: that
    must not cost it the dashboard, bottle and boto3 (about 0.3 s of CPU each start)."""
    code = (
        "import sys\n"
        "from hitl_pruner import HumanInTheLoopPruner, ask, tell, requested_state\n"
        "from hitl_pruner import StudyStopped, stop_if_asked, study_stopped\n"
        "print(sorted(m for m in ('optuna_dashboard', 'bottle', 'boto3', 'optuna.artifacts')"
        " if m in sys.modules))\n"
        "import hitl_pruner\n"
        "hitl_pruner.create_app\n"
        "print('optuna_dashboard' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "True"], run.stdout


def test_the_default_wrapped_pruner_is_optunas_default() -> None:
    assert isinstance(HumanInTheLoopPruner().wrapped, MedianPruner)
    with pytest.raises(ValueError, match="check_interval"):
        HumanInTheLoopPruner(check_interval=-1)


def test_the_pruner_pickles_like_optunas_own(sqlite_url: str) -> None:
    copy = pickle.loads(pickle.dumps(HumanInTheLoopPruner(ThresholdPruner(upper=1.0),
                                                          check_interval=5)))
    assert isinstance(copy.wrapped, ThresholdPruner) and copy.check_interval == 5


class Statements:
    """The SQL a worker's engine runs that touches our tables."""

    def __init__(self, study: optuna.Study) -> None:
        self.engine = worker._rdb_backend(study._storage).engine  # type: ignore[union-attr]
        self.seen: list[str] = []
        sa.event.listen(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "hitl_" in statement:
            self.seen.append(statement)


def test_a_check_is_one_query_and_check_interval_throttles_it(sqlite_url: str) -> None:
    app_for(sqlite_url)
    study = hitl_study(sqlite_url)
    statements = Statements(study)
    trial = study.ask()
    for step in range(5):
        trial.report(step, step)
        trial.should_prune()
    checks = [s for s in statements.seen if "hitl_workers" not in s]
    assert len(checks) == 5, "one query per should_prune() with check_interval=0"
    assert all("hitl_requests" in s and "hitl_audit" in s for s in checks)
    beats = [s for s in statements.seen if "hitl_workers" in s]
    # The first heartbeat of the process on the study: clear rows of long-gone workers, then
    # update-or-insert its own row; none again within HEARTBEAT_EVERY seconds.
    assert [s.split()[0] for s in beats] == ["DELETE", "UPDATE", "INSERT"], beats
    assert worker.HEARTBEAT_EVERY >= 1.0

    throttled = optuna.load_study(study_name="w", storage=sqlite_url,
                                  pruner=HumanInTheLoopPruner(NopPruner(), check_interval=3600))
    statements = Statements(throttled)
    trial = throttled.ask()
    for step in range(5):
        trial.report(step, step)
        trial.should_prune()
    checks = [s for s in statements.seen if "hitl_workers" not in s]
    assert len(checks) == 1, "the first call checks, then none within check_interval"


def test_the_check_uses_indexes_only(sqlite_url: str) -> None:
    """SQLite's plan for the worker's query: primary-key and index searches, no table scan."""
    app_for(sqlite_url)
    study = hitl_study(sqlite_url)
    statements = Statements(study)
    trial = study.ask()
    trial.report(1, 0)
    trial.should_prune()
    [query] = [s for s in statements.seen if "hitl_workers" not in s]
    [beat] = [s for s in statements.seen if s.startswith("UPDATE hitl_workers")]
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + query, (trial._trial_id, study._study_id)
        ).all()
        beat_plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + beat, (study._study_id, "w")
        ).all()
    engine.dispose()
    details = [row[-1] for row in plan]
    scans = [d for d in details if d.startswith("SCAN") and d != "SCAN CONSTANT ROW"]
    assert not scans, details
    assert any("ix_hitl_audit_relabels" in d for d in details), details
    # The heartbeat's update finds its row through the primary key's index.
    [beat_detail] = [row[-1] for row in beat_plan]
    assert beat_detail.startswith("SEARCH hitl_workers USING ") and beat_detail.endswith(
        "(study_id=? AND worker=?)"
    ), beat_detail


class SpyTPE(TPESampler):
    """TPE that notes which COMPLETE trials it sampled from, per trial number."""

    def __init__(self) -> None:
        super().__init__(n_startup_trials=0, seed=0)
        self.used: dict[int, set[int]] = {}

    def _sample(self, study: optuna.Study, trial: Any, search_space: Any) -> Any:
        # The read TPE's own _sample makes, narrowed to COMPLETE trials.
        complete = study._get_trials(
            deepcopy=False, states=(S.COMPLETE,), use_cache=not self._constant_liar
        )
        self.used[trial.number] = {t.number for t in complete}
        return super()._sample(study, trial, search_space)


@pytest.mark.parametrize("wrapped", [True, False], ids=["with-wrapper", "plain"])
def test_a_running_workers_tpe_stops_using_a_trial_relabelled_fail(
    storage_url: str, wrapped: bool
) -> None:
    """Optuna's trial cache keeps a finished trial's old state until the worker restarts; with
    the wrapper, the worker reads relabels made since its last check from its next trial on."""
    app = app_for(storage_url)
    sampler = SpyTPE()
    pruner = HumanInTheLoopPruner(NopPruner(), check_interval=0) if wrapped else NopPruner()
    study = optuna.create_study(storage=storage_url, sampler=sampler, pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 0)
        trial.should_prune()
        return x

    def relabel_trial_0_after_trial_3(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 3:
            first = study.trials[0]
            r = save(app, study._study_id, first._trial_id, 1, "bogus split: FAIL")
            assert r.outcome["action"] == "applied" and r.outcome["to"] == "FAIL"

    study.optimize(objective, n_trials=7, callbacks=[relabel_trial_0_after_trial_3])
    assert state(storage_url, study.trials[0]._trial_id) is S.FAIL
    assert 0 in sampler.used[4], "trial 4 sampled before any check could see the relabel"
    if wrapped:
        assert all(0 not in sampler.used[n] for n in (5, 6))
        assert study.trials[0].state is S.FAIL
    else:
        assert all(0 in sampler.used[n] for n in (5, 6)), "the problem the wrapper solves"


def test_undoing_a_relabel_reaches_the_running_worker_too(sqlite_url: str) -> None:
    app = app_for(sqlite_url)
    study = hitl_study(sqlite_url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    first = study.trials[0]
    save(app, study._study_id, first._trial_id, 1, "FAIL")
    live = study.ask()
    live.report(0, 0)
    live.should_prune()
    assert study.trials[0].state is S.FAIL
    save(app, study._study_id, first._trial_id, 2, "fine after all")
    live.report(1, 1)
    live.should_prune()
    assert study.trials[0].state is S.COMPLETE


def test_ask_and_tell_heeds_a_human_from_the_first_step_and_tells_as_asked(
    storage_url: str,
) -> None:
    app = app_for(storage_url, grace=60)
    study = hitl_study(storage_url)
    trial = hitl_pruner.ask(study)  # marked at once, before any report
    r = save(app, study._study_id, trial._trial_id, 1, "FAIL")
    assert r.outcome["action"] == "requested"
    assert hitl_pruner.requested_state(study, trial) is S.FAIL
    trial.report(0.5, 0)
    assert trial.should_prune() is True
    # Whatever the loop meant to tell, the human's verdict wins.
    assert hitl_pruner.tell(study, trial, 0.5).state is S.FAIL

    plain = hitl_pruner.ask(study)
    assert hitl_pruner.requested_state(study, plain.number) is None
    assert hitl_pruner.tell(study, plain.number, 0.25).state is S.COMPLETE


def test_ask_and_tell_does_not_crash_on_a_trial_forced_after_the_grace_period(
    sqlite_url: str,
) -> None:
    app = app_for(sqlite_url, grace=0)
    study = hitl_study(sqlite_url)
    trial = hitl_pruner.ask(study)
    trial.report(0.5, 0)
    save(app, study._study_id, trial._trial_id, 1, "PRUNE")
    app.sweeper.run_once()  # the loop was slow: forced
    assert state(sqlite_url, trial._trial_id) is S.PRUNED
    assert hitl_pruner.tell(study, trial, 0.5).state is S.PRUNED
    with pytest.raises(ValueError, match="Cannot tell a PRUNED trial"):
        study.tell(trial, 0.5)  # what the helper's skip_if_finished=True avoids


def test_without_the_server_tables_the_wrapper_is_the_wrapped_pruner(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    study = hitl_study(sqlite_url, ThresholdPruner(upper=1.0))
    trial = study.ask()
    with caplog.at_level(logging.WARNING, logger="hitl_pruner"):
        trial.report(0.5, 0)
        assert trial.should_prune() is False
        trial.report(2.0, 1)
        assert trial.should_prune() is True
    assert caplog.text.count("cannot read human requests") == 1


def test_a_server_without_the_heartbeat_table_still_gets_its_requests_read(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server installed by an earlier version has no hitl_workers: the worker warns once,
    and its checks go on."""
    app_for(sqlite_url)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE hitl_workers")
    study = hitl_study(sqlite_url)

    def objective(trial: optuna.Trial) -> float:
        for step in range(3):
            trial.report(step, step)
            if step == 1 and trial.number == 0:
                # What the earlier server writes for a marked trial.
                now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                with engine.begin() as conn:
                    conn.execute(sa.insert(rdb.requests_t).values(
                        trial_id=trial._trial_id, study_id=study._study_id, study_name="w",
                        trial_number=0, target="PRUNED", source="note-save",
                        requested_at=now, deadline=now + datetime.timedelta(seconds=60),
                    ))
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    with caplog.at_level(logging.WARNING, logger="hitl_pruner"):
        study.optimize(objective, n_trials=2)
    engine.dispose()
    assert [t.state for t in study.get_trials()] == [S.PRUNED, S.COMPLETE]
    assert caplog.text.count("cannot record this worker's heartbeat") == 1, caplog.text
    assert "cannot read human requests" not in caplog.text


@pytest.mark.parametrize("kind", ["inmemory", "journal"])
def test_on_other_storages_the_wrapper_is_the_wrapped_pruner(tmp_path: Any, kind: str) -> None:
    storage = (
        None if kind == "inmemory"
        else JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    )
    study = optuna.create_study(
        storage=storage, pruner=HumanInTheLoopPruner(ThresholdPruner(upper=1.0))
    )
    trial = study.ask()
    trial.report(2.0, 0)
    assert trial.should_prune() is True
    assert hitl_pruner.requested_state(study, trial) is None
    assert hitl_pruner.tell(study, trial, 1.0).state is S.COMPLETE


# --- the Optuna internals and behaviours this design rests on (optuna 5.0) -------------------


def test_optuna_optimize_survives_trial_pruned_and_nothing_else_without_catch() -> None:
    """Why a FAIL request ends through TrialPruned plus a trigger, not through an exception."""

    def pruned(trial: optuna.Trial) -> float:
        raise optuna.TrialPruned()

    def failed(trial: optuna.Trial) -> float:
        raise RuntimeError("human FAIL")

    study = optuna.create_study()
    study.optimize(pruned, n_trials=2)
    with pytest.raises(RuntimeError):
        study.optimize(failed, n_trials=2)


def test_optuna_calls_the_pruner_only_from_should_prune() -> None:
    """Why a trial is marked on its first should_prune() and not when it starts."""
    calls = []

    class Spy(NopPruner):
        def prune(self, study: optuna.Study, trial: Any) -> bool:
            calls.append(trial.number)
            return False

    study = optuna.create_study(pruner=Spy())

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        trial.report(1.0, 0)
        return 1.0

    study.optimize(objective, n_trials=2)
    assert calls == []


def test_optuna_wraps_an_rdb_storage_in_its_trial_cache(sqlite_url: str) -> None:
    for given in (sqlite_url, RDBStorage(sqlite_url)):
        study = optuna.create_study(storage=given)
        backend = worker._rdb_backend(study._storage)
        assert isinstance(backend, RDBStorage)
        assert study._storage is not backend
    assert worker._rdb_backend(optuna.create_study()._storage) is None


def test_the_cache_refresh_replaces_a_finished_cached_trial(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url)
    study.optimize(lambda t: 1.0, n_trials=2)
    assert [t.state for t in study.trials] == [S.COMPLETE, S.COMPLETE]
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE trials SET state = 'FAIL' WHERE number = 0"))
    engine.dispose()
    assert study.trials[0].state is S.COMPLETE, "Optuna's cache keeps the old state"
    first = study.trials[0]._trial_id
    assert worker._refresh_cached_trials(study._storage, study._study_id, [first, 999]) == 1
    assert study.trials[0].state is S.FAIL
