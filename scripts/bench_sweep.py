"""Benchmark the sweep on SQLite, PostgreSQL and MariaDB/MySQL (issue 11, items 1 and 2).

Per backend, each on a fresh database:

1. **Script note -> applied.** A sweeping process (``create_app`` and its sweep thread at the
   default settings, interval 10 s, in a child process) on a study of 1,000 trials; this script
   writes ``--notes`` PRUNE notes on RUNNING trials with ``optuna_dashboard.save_note``, one at
   a time with a random pause, and times each from the save's return to the new state, read on
   a connection of its own. Target: median <= 0.5 s, p95 <= 1 s.
2. **Sweep cost.** ``app.sweeper.run_once()`` in process, on a study of 2,000 trials: idle
   (nothing changed; median of 20), after 100 PRUNE notes on RUNNING trials (median of 5
   rounds, after a warm-up), after 1,000. Seconds and SQL statements (``before_cursor_execute``; an
   executemany counts once). Targets: 100 notes <= 100 ms and <= 15 statements; 1,000 <= 1 s.
3. **Bootstrap.** 10,000 trials that each have a note before hitl-pruner first meets the
   database: ``create_app`` (installs, and queues every note) and the first sweep. Target <= 1 s
   for the sweep.
4. **Idle CPU.** The sweeping process of 1., idle, over ``--idle`` seconds (utime + stime from
   /proc), on studies of 1,000 and 100,000 trials. Target <= 1% of one core, flat.

Databases: an SQLite file in a temporary directory; throwaway PostgreSQL and MySQL databases,
created and dropped here (HITL_TEST_POSTGRES_URL / HITL_TEST_MYSQL_URL name the admin URLs, as
for the tests). A server that cannot be reached is reported and skipped.

    python scripts/bench_sweep.py [--backends sqlite,postgresql,mysql] [--notes 20] [--idle 20]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
from pathlib import Path
import random
import select
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any
from typing import Iterator
import uuid

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
from optuna_dashboard import save_note
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hitl_pruner import Settings  # noqa: E402
from hitl_pruner import create_app  # noqa: E402

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "HITL_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    ),
    "mysql": os.environ.get("HITL_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/"),
}
INSERT_BATCH = 5000
trials_t: sa.Table = models.TrialModel.__table__  # type: ignore[assignment]
values_t: sa.Table = models.TrialValueModel.__table__  # type: ignore[assignment]
attrs_t: sa.Table = models.StudySystemAttributeModel.__table__  # type: ignore[assignment]

# The sweeping process: the served application's sweep at the default settings, no HTTP.
SWEEPING = textwrap.dedent(
    """
    import sys, time
    from hitl_pruner import Settings, create_app
    app = create_app(Settings(storage_url=sys.argv[1]), autostart=False)
    app.sweeper.start()
    while not (app.sweeper.active and app.sweeper.last_run is not None):
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.read()
    app.sweeper.stop()
    """
)


class Unavailable(Exception):
    pass


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"hitl_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URLS[backend], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise Unavailable(str(exc.orig).strip().splitlines()[0]) from None
    try:
        yield sa.make_url(ADMIN_URLS[backend]).set(database=name).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


def batched(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), INSERT_BATCH):
        yield rows[start : start + INSERT_BATCH]


def populate(url: str, n_trials: int, n_running: int, *, note_every: int = 10) -> tuple[
    optuna.Study, list[int]
]:
    """A study: the last n_running trials RUNNING, the others COMPLETE with a value, a plain
    note on every ``note_every``-th COMPLETE one. Returns the study and its trial ids."""
    storage = RDBStorage(url)
    study = optuna.create_study(study_name="bench", storage=storage)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    first_running = n_trials - n_running
    with storage.engine.begin() as conn:
        for chunk in batched([
            {"number": i, "study_id": study._study_id,
             "state": TrialState.COMPLETE if i < first_running else TrialState.RUNNING,
             "datetime_start": now, "datetime_complete": now if i < first_running else None}
            for i in range(n_trials)
        ]):
            conn.execute(sa.insert(trials_t), chunk)
        ids = list(conn.execute(
            sa.select(trials_t.c.trial_id).where(trials_t.c.study_id == study._study_id)
            .order_by(trials_t.c.number)
        ).scalars())
        finite = models.TrialValueModel.TrialValueType.FINITE
        for chunk in batched([
            {"trial_id": tid, "objective": 0, "value": 0.5, "value_type": finite}
            for tid in ids[:first_running]
        ]):
            conn.execute(sa.insert(values_t), chunk)
        for chunk in batched([
            row for i, tid in enumerate(ids[:first_running]) if i % note_every == 0
            for row in (
                {"study_id": study._study_id, "key": f"dashboard:{tid}:note_ver",
                 "value_json": "1"},
                {"study_id": study._study_id, "key": f"dashboard:{tid}:note_str:0",
                 "value_json": json.dumps(f"Trial #{i}: loss plateaued, lr looks fine.")},
            )
        ]):
            conn.execute(sa.insert(attrs_t), chunk)
    return study, ids


def write_notes(engine: sa.Engine, study_id: int, notes: dict[int, str]) -> None:
    """Version 1 of each note, written straight into the table (the trigger queues them)."""
    with engine.begin() as conn:
        conn.execute(sa.insert(attrs_t), [
            row for tid, body in notes.items() for row in (
                {"study_id": study_id, "key": f"dashboard:{tid}:note_ver", "value_json": "1"},
                {"study_id": study_id, "key": f"dashboard:{tid}:note_str:0",
                 "value_json": json.dumps(body)},
            )
        ])


class Statements:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.count = engine, 0

    def __call__(self, *args: Any) -> None:
        self.count += 1

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self)


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def sweeping(url: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", SWEEPING, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 120)[0] or proc.stdout.readline() != "ready\n":
            raise RuntimeError("the sweeping process did not start")
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def idle_cpu(proc: subprocess.Popen[str], seconds: float) -> float:
    """The process's CPU over ``seconds`` of idling, as a share of one core."""
    time.sleep(1.0)  # settle after the last note
    before, started = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)


def bench_latency(url: str, notes: int, idle: float) -> dict[str, Any]:
    study, ids = populate(url, 1000, notes)
    engine = sa.create_engine(url)
    query = sa.text("SELECT state FROM trials WHERE trial_id = :t")
    took: list[float] = []
    with sweeping(url) as proc:
        for tid in ids[-notes:]:
            time.sleep(random.uniform(0.1, 0.6))  # any phase of the watch's polling
            save_note(optuna.Trial(study, tid), "PRUNE: diverged")
            written = time.monotonic()
            while True:
                with engine.connect() as conn:
                    if conn.execute(query, {"t": tid}).scalar() == "PRUNED":
                        break
                if time.monotonic() - written > 30:
                    raise RuntimeError(f"trial {tid} was not pruned within 30 s")
                time.sleep(0.005)
            took.append(time.monotonic() - written)
        cpu = idle_cpu(proc, idle)
    engine.dispose()
    return {"min": min(took), "median": statistics.median(took), "p95": p95(took),
            "max": max(took), "n": len(took), "idle_cpu_1k": cpu}


def bench_idle_large(url: str, idle: float) -> float:
    populate(url, 100_000, 10)
    with sweeping(url) as proc:
        return idle_cpu(proc, idle)


def bench_cost(url: str) -> dict[str, Any]:
    study, ids = populate(url, 2000, 1550)
    app = create_app(Settings(storage_url=url), autostart=False)
    engine = app.store.engine
    app.sweeper.run_once()
    results: dict[str, Any] = {}
    idle = []
    for _ in range(20):
        with Statements(engine) as counted:
            stats = app.sweeper.run_once()
        idle.append((stats.seconds, counted.count))
    results[0] = (statistics.median(s for s, _ in idle), max(c for _, c in idle), None)
    running = iter(ids[-1550:])
    write_notes(engine, study._study_id, {next(running): "PRUNE" for _ in range(50)})
    app.sweeper.run_once()  # warm up the statements' caches (not timed)
    for changed, rounds in ((100, 5), (1000, 1)):
        samples = []
        for _ in range(rounds):
            notes = {next(running): "PRUNE: diverged" for _ in range(changed)}
            write_notes(engine, study._study_id, notes)
            cpu = time.process_time()
            with Statements(engine) as counted:
                stats = app.sweeper.run_once()
            cpu = time.process_time() - cpu
            if stats.applied != changed:
                raise RuntimeError(f"{stats.applied} of {changed} notes applied: {stats}")
            samples.append((stats.seconds, counted.count, cpu))
        results[changed] = (statistics.median(s[0] for s in samples),
                            max(s[1] for s in samples), statistics.median(s[2] for s in samples))
    engine.dispose()
    return results


def bench_bootstrap(url: str) -> tuple[float, float, float, int]:
    populate(url, 10_000, 0, note_every=1)
    started = time.perf_counter()
    app = create_app(Settings(storage_url=url), autostart=False)
    installed = time.perf_counter() - started
    cpu = time.process_time()
    stats = app.sweeper.run_once()
    cpu = time.process_time() - cpu
    app.store.engine.dispose()
    return installed, stats.seconds, cpu, stats.trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql,mysql")
    parser.add_argument("--notes", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            print(f"== {backend}", flush=True)
            try:
                with database(backend, Path(tmp)) as url:
                    lat = bench_latency(url, args.notes, args.idle)
                with database(backend, Path(tmp)) as url:
                    cpu_large = bench_idle_large(url, args.idle)
                with database(backend, Path(tmp)) as url:
                    cost = bench_cost(url)
                with database(backend, Path(tmp)) as url:
                    installed, first, first_cpu, trials = bench_bootstrap(url)
            except Unavailable as exc:
                print(f"   skipped: {exc}")
                continue
            print(f"   script note -> applied (n={lat['n']}): min {lat['min']:.3f} s, median "
                  f"{lat['median']:.3f} s ({lat['median'] / 0.5:.2f}x the 0.5 s target), p95 "
                  f"{lat['p95']:.3f} s ({lat['p95']:.2f}x the 1 s target), max {lat['max']:.3f} s")
            for changed, target in ((0, None), (100, 0.1), (1000, 1.0)):
                seconds, count, cpu = cost[changed]
                ratio = f" ({seconds / target:.2f}x the {target:g} s target)" if target else ""
                own = f", {cpu * 1000:.1f} ms CPU in this process" if cpu is not None else ""
                print(f"   sweep of {changed:>4} changed notes: {seconds * 1000:7.1f} ms{ratio}, "
                      f"{count} statements" + (f" ({count / 15:.2f}x the 15 target)"
                                               if changed == 100 else "") + own)
            print(f"   first start over 10,000 notes: install {installed:.3f} s, first sweep "
                  f"{first:.3f} s ({first:.2f}x the 1 s target; {first_cpu:.3f} s CPU in this "
                  f"process) for {trials} notes")
            print(f"   idle CPU of the sweeping process: {lat['idle_cpu_1k'] * 100:.2f}% of a core "
                  f"at 1k trials, {cpu_large * 100:.2f}% at 100k (target 1%)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
