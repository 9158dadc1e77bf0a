"""Real workers against a real server: separate processes running study.optimize (or an
ask-and-tell loop), a `python -m hitl_pruner serve` process, and a human acting over HTTP.

This file is also the worker program: ``python tests/test_worker_processes.py MODE URL STUDY
N_TRIALS STEPS`` runs one worker and prints ``{"ran": [trial numbers]}`` when it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

STEP_SECONDS = 0.05
STEPS = 40  # two seconds a trial: time for the test to pick a running trial and act on it
# While the file named by this variable exists, trials wait at this step (workers(gate=...)).
GATE_ENV = "HITL_TEST_GATE"
GATE_STEP = 2
INTERVAL = 0.2


# --- the worker program ----------------------------------------------------------------------


def worker_main(mode: str, url: str | optuna.storages.BaseStorage, study_name: str, n_trials: int,
                steps: int) -> None:
    import logging

    import hitl_pruner

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.NopPruner() if mode in ("plain", "quiet")
        else hitl_pruner.HumanInTheLoopPruner(optuna.pruners.NopPruner(), check_interval=0.1)
    )
    study = optuna.load_study(study_name=study_name, storage=url, pruner=pruner)
    ran: list[int] = []
    gate = os.environ.get(GATE_ENV)

    if mode == "asktell":
        # The shape of a coordinator that hands trials out and collects results.
        for _ in range(n_trials):
            trial = hitl_pruner.ask(study)
            pruned = False
            for step in range(steps):
                trial.report(step / steps, step)
                if trial.should_prune():
                    pruned = True
                    break
                time.sleep(STEP_SECONDS)
            if pruned:
                hitl_pruner.tell(study, trial, state=TrialState.PRUNED)
            else:
                hitl_pruner.tell(study, trial, 1.0)
            ran.append(trial.number)
    else:

        def objective(trial: optuna.Trial) -> float:
            if mode == "quiet":
                # A plain worker whose objective reports nothing (no pruning at all).
                time.sleep(steps * STEP_SECONDS)
                return 1.0
            if mode == "checkfirst":
                # The README's first line of an objective: heeded before its first report,
                # through a first step (say, loading data) that reports nothing for a while.
                if trial.should_prune():
                    raise optuna.TrialPruned()
                time.sleep(steps * STEP_SECONDS)
            for step in range(steps):
                trial.report(step / steps, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                while step == GATE_STEP and gate is not None and os.path.exists(gate):
                    # Held until the test is done acting, asking all the while, so that no
                    # trial it picked can finish first however slow the machine.
                    if trial.should_prune():
                        raise optuna.TrialPruned()
                    time.sleep(STEP_SECONDS)
                if mode == "hung" and step == 1:
                    time.sleep(600)  # stuck in a step: never calls should_prune() again
                time.sleep(STEP_SECONDS)
            return 1.0

        # No catch=: a human's FAIL must not escape optimize, on any supported Optuna.
        study.optimize(objective, n_trials=n_trials,
                       callbacks=[lambda _study, trial: ran.append(trial.number)])
    print(json.dumps({"ran": ran}), flush=True)


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    sys.exit(0)


# --- the tests -------------------------------------------------------------------------------

# Below the worker program, which needs none of these (pytest alone is 0.14 s of CPU in each
# of its processes).
from helpers import audit_rows  # noqa: E402
from processes import Server  # noqa: E402
from processes import child_env  # noqa: E402
from processes import serve_server  # noqa: E402
from processes import wait_for  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.e2e


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err

    def finish(self, timeout: float) -> tuple[int, list[int], str]:
        """Wait for the worker; its exit code, the trials it ran, and its stderr."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker did not finish in {timeout:.0f} s\n{self.err.read_text()}")
        lines = self.out.read_text().strip().splitlines()
        ran = json.loads(lines[-1])["ran"] if lines else []
        return self.proc.returncode, ran, self.err.read_text()


@contextlib.contextmanager
def workers(mode: str, url: str, study: str, count: int, n_trials: int,
            tmp_path: Path, gate: Path | None = None) -> Iterator[list[Worker]]:
    started = []
    env = child_env()
    if gate is not None:
        env[GATE_ENV] = str(gate)
    try:
        for i in range(count):
            out, err = tmp_path / f"{mode}-{i}.out", tmp_path / f"{mode}-{i}.err"
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(
                    [sys.executable, __file__, mode, url, study, str(n_trials), str(STEPS)],
                    stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env,
                )
            started.append(Worker(proc, out, err))
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def running_trial(storage: RDBStorage, study_id: int, taken: set[int], min_steps: int,
                  servers: list[Server]) -> FrozenTrial:
    """A RUNNING trial, not one of ``taken``, that reported at least ``min_steps`` values and
    has most of its steps still ahead."""

    def find() -> FrozenTrial | None:
        for t in storage.get_all_trials(study_id, deepcopy=False):
            if (t.state is TrialState.RUNNING and t._trial_id not in taken
                    and min_steps <= len(t.intermediate_values) <= STEPS // 3):
                return t
        return None

    # The workers' start-up (importing Optuna) is not what the 30 s below allow for: next to
    # test_grpc_proxy's 32 workers starting at once, on 2 cores, it took 45 s.
    wait_for(lambda: storage.get_all_trials(study_id, deepcopy=False), timeout=300,
             what="the workers' first trial", servers=servers, interval=0.05)
    trial = wait_for(find, timeout=30, what="a running trial to act on", servers=servers,
                     interval=0.05)
    taken.add(trial._trial_id)
    return trial


@pytest.mark.parametrize("backend, n_workers", [("sqlite", 2), ("postgres", 4)])
def test_parallel_workers_survive_a_human_prune_fail_and_fail_button(
    backend: str, n_workers: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every worker runs all its trials; each human action costs one trial, not the run."""
    url = request.getfixturevalue(f"{backend}_url")
    n_trials = 4
    study = optuna.create_study(study_name="parallel", storage=url)
    storage = RDBStorage(url)
    # The trials wait at their third step until the three actions are done: under load a
    # trial picked with most of its 2 s ahead had finished before the Fail button reached it.
    gate = tmp_path / "gate"
    gate.touch()
    with serve_server(url, tmp_path, args=["--grace", "60"], interval=INTERVAL) as server, \
            workers("wrapped", url, "parallel", n_workers, n_trials, tmp_path,
                    gate=gate) as procs:
        taken: set[int] = set()
        pruned = running_trial(storage, study._study_id, taken, 2, [server])
        reply = server.put_note(study._study_id, pruned._trial_id, 1, "loss diverges: PRUNE")
        assert reply.status == 204 and reply.outcome["action"] == "requested", reply
        failed = running_trial(storage, study._study_id, taken, 2, [server])
        reply = server.put_note(study._study_id, failed._trial_id, 1, "bogus split: FAIL")
        assert reply.outcome["action"] == "requested", reply
        buttoned = running_trial(storage, study._study_id, taken, 2, [server])
        reply = server.request("POST", f"/api/trials/{buttoned._trial_id}/tell",
                               json={"state": "Fail"})
        assert reply.status == 204 and reply.outcome["action"] == "requested", reply
        gate.unlink()

        for w in procs:
            code, ran, err = w.finish(timeout=120)
            assert code == 0 and "Traceback" not in err, err
            assert len(ran) == n_trials, err

        trials = {t._trial_id: t for t in storage.get_all_trials(study._study_id)}
        assert len(trials) == n_workers * n_trials
        assert trials[pruned._trial_id].state is TrialState.PRUNED
        steps = trials[pruned._trial_id].intermediate_values
        assert 2 <= len(steps) < STEPS and steps == {i: i / STEPS for i in range(len(steps))}
        assert trials[failed._trial_id].state is TrialState.FAIL
        assert len(trials[failed._trial_id].intermediate_values) >= 2
        assert trials[buttoned._trial_id].state is TrialState.FAIL
        others = [t for tid, t in trials.items() if tid not in taken]
        assert all(t.state is TrialState.COMPLETE for t in others)

        rows = wait_for(lambda: len(audit_rows(url)) == 3 and audit_rows(url),
                        what="three audit rows", servers=[server])
        assert sorted((r.trial_id, r.to_state, r.source, r.how) for r in rows) == sorted([
            (pruned._trial_id, "PRUNED", "note-save", "worker"),
            (failed._trial_id, "FAIL", "note-save", "worker"),
            (buttoned._trial_id, "FAIL", "fail-button", "worker"),
        ])
        assert server.output.count("ended by its worker on request") == 3, server.output


def test_a_worker_without_the_wrapper_is_forced_at_once_and_its_optimize_aborts(
    postgres_url: str, tmp_path: Path
) -> None:
    """What the README warns of: the plain worker loses the rest of its run."""
    study = optuna.create_study(study_name="plain", storage=postgres_url)
    storage = RDBStorage(postgres_url)
    with serve_server(postgres_url, tmp_path, args=["--grace", "60"],
                      interval=INTERVAL) as server, \
            workers("plain", postgres_url, "plain", 1, 4, tmp_path) as procs:
        target = running_trial(storage, study._study_id, set(), 2, [server])
        reply = server.put_note(study._study_id, target._trial_id, 1, "PRUNE")
        assert reply.outcome["action"] == "applied", reply
        assert storage.get_trial(target._trial_id).state is TrialState.PRUNED
        code, ran, err = procs[0].finish(timeout=60)
    assert code != 0 and "Cannot tell a PRUNED trial" in err
    assert len(ran) < 4
    [row] = audit_rows(postgres_url)
    assert (row.trial_id, row.to_state, row.how) == (target._trial_id, "PRUNED", "forced")
    assert "forced at once" in server.output


def test_a_hung_cooperative_worker_is_forced_after_the_grace_period(
    postgres_url: str, tmp_path: Path
) -> None:
    grace = 1.5
    study = optuna.create_study(study_name="hung", storage=postgres_url)
    storage = RDBStorage(postgres_url)
    with serve_server(postgres_url, tmp_path, args=["--grace", str(grace)],
                      interval=INTERVAL) as server, \
            workers("hung", postgres_url, "hung", 1, 2, tmp_path):
        target = running_trial(storage, study._study_id, set(), 2, [server])
        asked = time.monotonic()
        reply = server.put_note(study._study_id, target._trial_id, 1, "stuck: PRUNE")
        assert reply.outcome["action"] == "requested", reply
        wait_for(lambda: storage.get_trial(target._trial_id).state is TrialState.PRUNED,
                 what="the trial forced", servers=[server])
        assert time.monotonic() - asked >= grace
        rows = wait_for(lambda: audit_rows(postgres_url), what="the audit row", servers=[server])
    assert [(r.trial_id, r.to_state, r.how) for r in rows] == [
        (target._trial_id, "PRUNED", "grace")
    ]
    assert "forced after the grace period" in server.output


def test_a_first_trial_that_checks_before_reporting_is_asked_and_its_worker_goes_on(
    postgres_url: str, tmp_path: Path
) -> None:
    """The README's remedy for the first-trial window: a worker's first trial, in a study with
    no other wrapped worker alive, has no heartbeat to vouch for it until its first
    ``should_prune()``. An objective that calls it first is marked at once, so a human's PRUNE
    during a long first step that reports nothing is asked, not forced, and optimize goes on."""
    from hitl_pruner.requests import COOPERATIVE_ATTR

    study = optuna.create_study(study_name="first", storage=postgres_url)
    storage = RDBStorage(postgres_url)
    with serve_server(postgres_url, tmp_path, args=["--grace", "60"],
                      interval=INTERVAL) as server, \
            workers("checkfirst", postgres_url, "first", 1, 2, tmp_path) as procs:
        first = wait_for(
            lambda: next((t for t in storage.get_all_trials(study._study_id, deepcopy=False)
                          if t.number == 0 and t.state is TrialState.RUNNING
                          and t.system_attrs.get(COOPERATIVE_ATTR) is True), None),
            timeout=30, what="the first trial, marked", servers=[server], interval=0.02)
        assert first.intermediate_values == {}, "still in its first step"
        reply = server.put_note(study._study_id, first._trial_id, 1, "PRUNE")
        assert reply.outcome["action"] == "requested", reply
        assert "the trial is marked" in reply.outcome["reason"], reply
        code, ran, err = procs[0].finish(timeout=60)
    assert code == 0 and "Traceback" not in err, err
    assert ran == [0, 1]
    assert storage.get_trial(first._trial_id).state is TrialState.PRUNED
    [row] = audit_rows(postgres_url)
    assert (row.trial_id, row.to_state, row.how) == (first._trial_id, "PRUNED", "worker")


def test_an_ask_and_tell_loop_heeds_prune_and_fail_and_finishes(
    sqlite_url: str, tmp_path: Path
) -> None:
    study = optuna.create_study(study_name="loop", storage=sqlite_url)
    storage = RDBStorage(sqlite_url)
    with serve_server(sqlite_url, tmp_path, args=["--grace", "60"], interval=INTERVAL) as server, \
            workers("asktell", sqlite_url, "loop", 1, 4, tmp_path) as procs:
        taken: set[int] = set()
        # hitl_pruner.ask() marks the trial at once: a human is heeded from its first step.
        pruned = running_trial(storage, study._study_id, taken, 0, [server])
        assert server.put_note(study._study_id, pruned._trial_id, 1,
                               "PRUNE").outcome["action"] == "requested"
        failed = running_trial(storage, study._study_id, taken, 1, [server])
        reply = server.request("POST", f"/api/trials/{failed._trial_id}/tell",
                               json={"state": "Fail"})
        assert reply.outcome["action"] == "requested", reply
        code, ran, err = procs[0].finish(timeout=60)
    assert code == 0 and "Traceback" not in err, err
    assert len(ran) == 4
    states = {t._trial_id: t.state for t in storage.get_all_trials(study._study_id)}
    assert states[pruned._trial_id] is TrialState.PRUNED
    assert states[failed._trial_id] is TrialState.FAIL
    assert sorted(states.values(), key=lambda s: s.value).count(TrialState.COMPLETE) == 2


def test_the_worker_program_runs(sqlite_url: str, tmp_path: Path) -> None:
    """The program above on its own, without a server: a plain run of two short trials."""
    optuna.create_study(study_name="alone", storage=sqlite_url)
    out = subprocess.run(
        [sys.executable, __file__, "wrapped", sqlite_url, "alone", "2", "2"],
        capture_output=True, text=True, timeout=60, env=child_env(), check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ran": [0, 1]}
    assert "cannot read human requests" in out.stderr, "no server installed: a warning, no crash"


def heartbeat_rows(url: str) -> list[object]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT * FROM hitl_workers")).all())
    finally:
        engine.dispose()


def test_after_a_wrapped_worker_exits_a_plain_workers_trial_is_forced_at_once(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Regression: once a wrapped worker had run on a study, a human's PRUNE on a plain worker's
    trial that had not reported answered "requested ... (it uses HumanInTheLoopPruner)" and
    waited out the grace period."""
    study = optuna.create_study(study_name="mixed", storage=sqlite_url)
    storage = RDBStorage(sqlite_url)
    with serve_server(sqlite_url, tmp_path, args=["--grace", "60"],
                      interval=INTERVAL) as server:
        with workers("wrapped", sqlite_url, "mixed", 1, 2, tmp_path) as procs:
            code, ran, err = procs[0].finish(timeout=60)
        assert code == 0 and len(ran) == 2, err
        with workers("quiet", sqlite_url, "mixed", 1, 1, tmp_path) as procs:
            target = running_trial(storage, study._study_id, set(), 0, [server])
            reply = server.put_note(study._study_id, target._trial_id, 1, "PRUNE")
            assert reply.outcome["action"] == "applied", reply
            assert storage.get_trial(target._trial_id).state is TrialState.PRUNED
            code, _, err = procs[0].finish(timeout=60)
    assert code != 0 and "Cannot tell a PRUNED trial" in err, "a plain worker, as warned"
    [row] = audit_rows(sqlite_url)
    assert (row.trial_id, row.how) == (target._trial_id, "forced")
    assert heartbeat_rows(sqlite_url) == [], "the wrapped worker took its heartbeat with it"


def test_a_live_wrapped_worker_gets_unreported_trials_asked_until_its_heartbeat_is_old(
    postgres_url: str, tmp_path: Path
) -> None:
    """A trial that has not reported may be a wrapped worker's that could not mark itself yet:
    asked while a wrapped worker of the study is alive, with the answer saying just that; once
    the worker stops checking (it hangs here) for longer than the window, forced at once."""
    from hitl_pruner.requests import worker_alive_for

    grace = 1.0
    study = optuna.create_study(study_name="alive", storage=postgres_url)
    storage = RDBStorage(postgres_url)
    with serve_server(postgres_url, tmp_path, args=["--grace", str(grace)],
                      interval=INTERVAL) as server, \
            workers("hung", postgres_url, "alive", 1, 2, tmp_path):
        wait_for(lambda: heartbeat_rows(postgres_url), what="the wrapped worker's heartbeat",
                 servers=[server], interval=0.05)
        # The row's time is at most now: from here on the worker hangs and never beats again.
        beat_seen = time.monotonic()
        fresh = study.ask()  # a trial with nothing reported yet
        reply = server.put_note(study._study_id, fresh._trial_id, 1, "PRUNE")
        assert reply.outcome["action"] == "requested", reply
        reason = reply.outcome["reason"]
        assert "a worker of this study running HumanInTheLoopPruner was seen" in reason, reason
        assert "this trial has not reported yet" in reason, reason

        time.sleep(max(0.0, beat_seen + worker_alive_for(grace) + 0.5 - time.monotonic()))
        later = study.ask()
        reply = server.put_note(study._study_id, later._trial_id, 1, "PRUNE")
        assert reply.outcome["action"] == "applied", reply
        assert storage.get_trial(later._trial_id).state is TrialState.PRUNED
