"""Cooperation through Optuna's storage API, in process (issue 9, item 3): the request as a trial
system attr, the heartbeat as a study system attr, FAIL written by the worker on a journal.

On InMemoryStorage and a journal file the server is ApiStore; on each RDB backend it is SqlStore
and the worker reads what SqlStore wrote through the API (as a worker behind the gRPC proxy
does). tests/test_grpc_proxy.py has the same with real processes.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import time
from typing import Any
from typing import Iterator
import warnings

from backends import BACKENDS
from backends import database
from helpers import save
import optuna
from optuna.pruners import NopPruner
from optuna.storages import BaseStorage
from optuna.storages import InMemoryStorage
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState as S
from processes import HOST
from processes import close_proxy
from processes import free_port
from processes import wait_proxy_ready
import pytest

import hitl_pruner
from hitl_pruner import HumanInTheLoopPruner
from hitl_pruner.api_channel import ApiChannel
from hitl_pruner.requests import REQUEST_ATTR
from hitl_pruner.requests import WORKER_ATTR_PREFIX


@pytest.fixture(params=["inmemory", "journal-file", *(f"proxy-{b}" for b in BACKENDS)])
def served(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[BaseStorage, Any]]:
    """(the workers' storage, the server app on the same storage)."""
    with contextlib.ExitStack() as stack:
        yield _served(request, tmp_path, stack)


def _served(request: pytest.FixtureRequest, tmp_path: Any,
            stack: contextlib.ExitStack) -> tuple[BaseStorage, Any]:
    if request.param == "inmemory":
        storage: BaseStorage = InMemoryStorage()
        server_storage: Any = storage
    elif request.param == "journal-file":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
        server_storage = str(tmp_path / "journal.log")
    else:
        # Optuna's gRPC proxy over each RDB backend, in this process: the worker sees the
        # storage API and nothing else, and the server is SqlStore.
        if not hasattr(optuna.storages, "GrpcStorageProxy"):
            pytest.skip(f"Optuna {optuna.__version__} has no gRPC proxy (it came in 4.2)")
        from optuna.storages import GrpcStorageProxy
        from optuna.storages._grpc.server import make_server

        url = stack.enter_context(database(request.param.removeprefix("proxy-"), tmp_path))
        port = free_port()
        proxy = make_server(RDBStorage(url), HOST, port)
        proxy.start()
        stack.callback(proxy.stop, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = GrpcStorageProxy(host=HOST, port=port)
        wait_proxy_ready(storage, timeout=30)
        stack.callback(close_proxy, storage)
        server_storage = url
    return storage, hitl_pruner.wsgi(server_storage, autostart=False, grace=60)


def study_on(storage: BaseStorage) -> optuna.Study:
    return optuna.create_study(
        study_name=f"s{time.monotonic_ns()}", storage=storage,
        pruner=HumanInTheLoopPruner(NopPruner(), check_interval=0),
    )


def test_a_prune_and_a_fail_reach_the_worker_as_a_trial_attr_and_end_as_asked(
    served: tuple[BaseStorage, Any],
) -> None:
    storage, app = served
    study = study_on(storage)
    pruned, failed = study.ask(), study.ask()
    for t in (pruned, failed):
        t.report(0.5, 0)
        assert t.should_prune() is False  # marks the trial

    for t, body, target in ((pruned, "PRUNE", "PRUNED"), (failed, "FAIL", "FAIL")):
        outcome = save(app, study._study_id, t._trial_id, 1, body).outcome
        assert (outcome["action"], outcome["to"]) == ("requested", target), outcome
        assert storage.get_trial_system_attrs(t._trial_id)[REQUEST_ATTR]["target"] == target
        assert t.should_prune() is True

    # What study.optimize does after the objective raised TrialPruned.
    study.tell(pruned, state=S.PRUNED)
    study.tell(failed, state=S.PRUNED)
    assert storage.get_trial(pruned._trial_id).state is S.PRUNED
    assert storage.get_trial(failed._trial_id).state is S.FAIL
    assert "set_trial_state_values" not in vars(storage), "the rewrite leaves with its trial"
    assert "get_trial" not in vars(storage)
    pickle.dumps(storage)

    app.sweeper.run_once()
    assert app.store.requests(None) == []
    assert sorted((e.trial_id, e.to_state.name, e.how) for e in app.store.audit()) == sorted([
        (pruned._trial_id, "PRUNED", "worker"), (failed._trial_id, "FAIL", "worker"),
    ])


def test_optimize_without_catch_ends_a_failed_trial_fail_and_runs_every_trial(
    served: tuple[BaseStorage, Any],
) -> None:
    """The FAIL told as PRUNED is stored FAIL, and optimize goes on: on Optuna 4.0 to 4.4 too,
    which read the trial back after telling it (fail_tell.py)."""
    storage, app = served
    study = study_on(storage)

    def objective(trial: optuna.Trial) -> float:
        for step in range(3):
            trial.report(step, step)
            if step == 1 and trial.number in (0, 2):
                body = "FAIL" if trial.number == 0 else "PRUNE"
                outcome = save(app, study._study_id, trial._trial_id, 1, body).outcome
                assert outcome["action"] == "requested", outcome
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    study.optimize(objective, n_trials=4)
    assert [t.state for t in study.get_trials()] == [S.FAIL, S.COMPLETE, S.PRUNED, S.COMPLETE]
    assert not {"set_trial_state_values", "get_trial"} & set(vars(storage))


def test_a_trial_not_reported_yet_is_asked_only_while_the_workers_heartbeat_is_fresh(
    served: tuple[BaseStorage, Any],
) -> None:
    storage, app = served
    study = study_on(storage)
    checking = study.ask()
    checking.report(0.5, 0)
    checking.should_prune()  # marks, and beats through the API
    beats = [k for k in storage.get_study_system_attrs(study._study_id)
             if k.startswith(WORKER_ATTR_PREFIX)]
    assert len(beats) == 1

    beat = storage.get_study_system_attrs(study._study_id)[beats[0]]
    fresh = study.ask()
    before = time.time()
    outcome = save(app, study._study_id, fresh._trial_id, 1, "PRUNE").outcome
    after = time.time()
    assert outcome["action"] == "requested", outcome
    # The heartbeat's age as the server saw it, in its words: under load the ask above can
    # take a second or more through the proxy, so the age is read from the clock, not assumed.
    steps = int((after - before) * 100) + 1
    ages = {
        "less than 1 s" if age < 1 else f"{age:.0f} s"
        for age in [before - beat + i / 100 for i in range(steps)] + [after - beat]
    }
    assert any(f"was seen {age} ago" in outcome["reason"] for age in ages), (ages, outcome)

    # The worker exits: its heartbeat says so, and the next trial that has not reported is
    # ended at once.
    from hitl_pruner.worker import _channels

    channel = _channels[storage]
    assert isinstance(channel, ApiChannel)
    channel.retire()
    assert storage.get_study_system_attrs(study._study_id)[beats[0]] is None
    later = study.ask()
    outcome = save(app, study._study_id, later._trial_id, 1, "PRUNE").outcome
    assert (outcome["action"], outcome["to"]) == ("applied", "PRUNED"), outcome
    assert storage.get_trial(later._trial_id).state is S.PRUNED


def test_a_request_its_worker_never_reads_is_forced_after_the_grace_period_once(
    served: tuple[BaseStorage, Any],
) -> None:
    storage, app = served
    study = study_on(storage)
    hung = study.ask()
    hung.report(0.5, 0)
    hung.should_prune()  # marks the trial; then the worker hangs in a step
    outcome = save(app, study._study_id, hung._trial_id, 1, "FAIL").outcome
    assert outcome["action"] == "requested", outcome
    [(request, state)] = app.store.requests(None)
    assert (request.trial_id, request.target, state) == (hung._trial_id, S.FAIL, S.RUNNING)

    past = request.deadline + datetime.timedelta(seconds=1)
    assert app.applier.settle(request, state, past).action == "applied"
    assert app.applier.settle(request, state, past).action != "applied", "closed: once only"
    assert storage.get_trial(hung._trial_id).state is S.FAIL
    assert app.store.requests(None) == []
    assert [(e.trial_id, e.to_state.name, e.how) for e in app.store.audit()] == [
        (hung._trial_id, "FAIL", "grace")
    ]


def test_a_fail_changed_to_prune_after_the_workers_check_ends_pruned(
    served: tuple[BaseStorage, Any],
) -> None:
    """The worker writes what the request says when it ends the trial, as the RDB trigger
    does, not what it said at the check."""
    storage, app = served
    study = study_on(storage)
    trial = study.ask()
    trial.report(0.5, 0)
    trial.should_prune()
    assert save(app, study._study_id, trial._trial_id, 1, "FAIL").outcome["action"] == "requested"
    assert trial.should_prune() is True  # the worker saw FAIL
    outcome = save(app, study._study_id, trial._trial_id, 2, "PRUNE").outcome
    assert (outcome["action"], outcome["to"]) == ("requested", "PRUNED"), outcome
    study.tell(trial, state=S.PRUNED)
    assert storage.get_trial(trial._trial_id).state is S.PRUNED
