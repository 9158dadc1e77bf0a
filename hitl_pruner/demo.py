"""A demo study for newcomers: finished trials to relabel and running trials to prune.

``python -m hitl_pruner serve --demo`` seeds the study and runs ``main`` in a child process, a
slow ask-and-tell worker that keeps two trials RUNNING and moves on when a human ends one, and
starts none while a human has the study stopped.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time

import optuna
from optuna.storages import BaseStorage
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from optuna_dashboard import save_note

from .study_stop import study_stopped

STUDY = "hitl-demo"
STEPS = 60
STEP_SECONDS = 2.0


def _storage(url: str) -> BaseStorage:
    if "://" in url:
        return RDBStorage(url)
    return JournalStorage(JournalFileBackend(url))


def _loss(x: float, step: int) -> float:
    return (x - 2) ** 2 + 10 / math.sqrt(step + 1)


def seed(url: str) -> None:
    """Create the demo study with a few finished trials, once."""
    study = optuna.create_study(study_name=STUDY, storage=_storage(url), load_if_exists=True)
    if study.trials:
        return
    for _ in range(6):
        trial = study.ask()
        x = trial.suggest_float("x", -10, 10)
        for step in range(5):
            trial.report(_loss(x, step), step)
        study.tell(trial, _loss(x, 5))
    first, second = (optuna.Trial(study, t._trial_id) for t in study.trials[:2])
    save_note(first, "Looks fine.")
    save_note(second, "Bogus data split? Add the word fail in capitals and save: it is relabelled.")


def _run_trials(study: optuna.Study, stop: threading.Event) -> None:
    storage = study._storage
    while not stop.is_set():
        # A human stopped the study (Stop study, or STOP in its note): start no trial until
        # they resume it. A real worker's optimize would return; the demo waits to show Resume.
        while study_stopped(study):
            if stop.wait(1.0):
                return
        trial = study.ask()
        x = trial.suggest_float("x", -10, 10)
        for step in range(STEPS):
            if stop.wait(STEP_SECONDS):
                # Leave no trial RUNNING forever when the demo stops.
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                return
            # A human may have ended this trial from the dashboard: then go to the next one.
            if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                break
            trial.report(_loss(x, step), step)
        else:
            study.tell(trial, _loss(x, STEPS), skip_if_finished=True)


def main(argv: list[str] | None = None) -> int:
    url = (argv if argv is not None else sys.argv[1:])[0]
    study = optuna.load_study(study_name=STUDY, storage=_storage(url))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workers = [threading.Thread(target=_run_trials, args=(study, stop)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        while any(w.is_alive() for w in workers):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for w in workers:
            w.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
