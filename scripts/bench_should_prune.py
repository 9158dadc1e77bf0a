"""The cost of HumanInTheLoopPruner: trial.should_prune() with and without it, as a ratio.

On SQLite and PostgreSQL, a study of --trials COMPLETE trials (each with --steps intermediate
values) and one RUNNING trial that has reported half its steps, in a database where hitl-pruner
is installed and hitl_audit already holds --audit rows. The same running trial is checked
through Study objects that differ only in their pruner, for two wrapped pruners:

- ``MedianPruner()``, Optuna's default, which reads the study's new trials through Optuna's
  cache on every call and computes a median: the cost in a real worker;
- ``NopPruner()``, which does nothing: the check's own cost, with nothing to hide it;

each bare, as ``HumanInTheLoopPruner(pruner, check_interval=0)`` (one more query on every
call), and as ``HumanInTheLoopPruner(pruner)`` (the default throttle: at most one query per
second per trial). All six are interleaved in --rounds rounds of --calls calls each; the median
time of a call is printed, with its ratio to the bare pruner.

PostgreSQL is a throwaway database created and dropped here (HITL_TEST_POSTGRES_URL names the
admin URL, default postgresql+psycopg2://postgres@127.0.0.1:5432/postgres); one that cannot be
reached is reported and skipped.

    python scripts/bench_should_prune.py [--backends sqlite,postgresql] [--trials 200]
        [--steps 20] [--audit 10000] [--calls 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
import platform
import statistics
import sys
import tempfile
import time

import optuna
from optuna.distributions import FloatDistribution
from optuna.pruners import BasePruner
from optuna.pruners import MedianPruner
from optuna.pruners import NopPruner
from optuna.storages import RDBStorage
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchdb import Unavailable  # noqa: E402
from benchdb import database  # noqa: E402

from hitl_pruner import HumanInTheLoopPruner  # noqa: E402
from hitl_pruner.rdb import SqlStore  # noqa: E402
from hitl_pruner.rdb import audit_t  # noqa: E402


def populate(url: str, n_trials: int, steps: int, n_audit: int) -> tuple[int, int]:
    """The study and its running trial; returns (study id, running trial id)."""
    storage = RDBStorage(url)
    SqlStore(storage).install()
    study = optuna.create_study(study_name="bench", storage=storage)
    dist = {"x": FloatDistribution(0, 1)}
    study.add_trials([
        optuna.trial.create_trial(
            params={"x": i / n_trials}, distributions=dist, value=i / n_trials,
            intermediate_values={s: (i + s) / n_trials for s in range(steps)},
        )
        for i in range(n_trials)
    ])
    running = study.ask(dist)
    for s in range(steps // 2):
        running.report(0.0, s)  # the best so far: MedianPruner lets it run
    # Older human relabels, in this study and others: the index the check reads must not care.
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    rows = [
        {"created_at": now, "study_id": study._study_id + (i % 10), "study_name": "bench",
         "trial_id": 1 + i % n_trials, "trial_number": i % n_trials, "from_state": "COMPLETE",
         "to_state": "FAIL", "note_version": 1, "user_name": None, "source": "sweep",
         "retroactive": i % 2 == 0, "is_undo": False, "how": "forced"}
        for i in range(n_audit)
    ]
    with storage.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(sa.insert(audit_t), rows[start:start + 5000])
    storage.engine.dispose()
    return study._study_id, running._trial_id


KINDS = ("bare", "check_interval=0", "default (1 s)")


def bench(url: str, args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """Median seconds per should_prune() by (wrapped pruner, kind)."""
    study_id, trial_id = populate(url, args.trials, args.steps, args.audit)
    storage = RDBStorage(url)  # one storage, as in a worker; each Study wraps it in its cache
    pruners: dict[tuple[str, str], BasePruner] = {}
    for name, make in (("MedianPruner", MedianPruner), ("NopPruner", NopPruner)):
        pruners[name, KINDS[0]] = make()
        pruners[name, KINDS[1]] = HumanInTheLoopPruner(make(), check_interval=0)
        pruners[name, KINDS[2]] = HumanInTheLoopPruner(make())
    trials = {}
    for label, pruner in pruners.items():
        study = optuna.load_study(study_name="bench", storage=storage, pruner=pruner)
        assert study._study_id == study_id
        trial = optuna.Trial(study, trial_id)
        for _ in range(5):  # warm up: caches, the trial's mark, the first check
            assert not trial.should_prune()
        trials[label] = trial
    samples: dict[tuple[str, str], list[float]] = {label: [] for label in trials}
    for _ in range(args.rounds):
        for label, trial in trials.items():
            started = time.perf_counter()
            for _ in range(args.calls):
                trial.should_prune()
            samples[label].append((time.perf_counter() - started) / args.calls)
    return {label: statistics.median(s) for label, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--trials", type=int, default=200, help="COMPLETE trials in the study")
    parser.add_argument("--steps", type=int, default=20, help="intermediate values per trial")
    parser.add_argument("--audit", type=int, default=10000, help="rows already in hitl_audit")
    parser.add_argument("--calls", type=int, default=100, help="should_prune() calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(f"optuna {optuna.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; {args.trials} trials x {args.steps} steps, "
          f"{args.audit} audit rows; median of {args.rounds} rounds x {args.calls} calls")
    print()
    print("| backend    | wrapped pruner | bare      | wrapped, check_interval=0 | "
          "wrapped, default (1 s) |")
    print("|------------|----------------|-----------|---------------------------|"
          "------------------------|")
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with database(backend, Path(tmp)) as url:
                    result = bench(url, args)
            except Unavailable as exc:
                print(f"| {backend:<10} | skipped: {exc}")
                continue
        for name in ("MedianPruner", "NopPruner"):
            base = result[name, KINDS[0]]
            cells = [f"{us(base):>9}"] + [
                f"{us(result[name, kind])} ({result[name, kind] / base:.2f}x)"
                for kind in KINDS[1:]
            ]
            print(f"| {backend:<10} | {name:<14} | {cells[0]} | {cells[1]:>25} | "
                  f"{cells[2]:>22} |")


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


if __name__ == "__main__":
    main()
