"""Benchmark hitl-pruner's two hot paths on SQLite and PostgreSQL.

1. Note-save latency, in-process WSGI calls, on a study of 1000 trials with a note on every
   tenth (and on the RUNNING trials used, so the note count stays put): a plain note save
   through the bare optuna-dashboard on a database without hitl-pruner, the same on a
   database with its trigger installed, a plain save through hitl-pruner, and a save of
   "PRUNE" on a RUNNING trial through hitl-pruner (which prunes it before answering). The
   four kinds are interleaved so that disk and cache drift hit them alike.
   Target: hitl PRUNE save / bare plain save <= 1.5x.
2. Sweep cost, ``app.sweeper.run_once()`` on studies of 1k, 10k and 100k trials (a note on
   every tenth): idle (nothing changed since the last sweep) and after 100 notes changed
   (100 "PRUNE" notes on RUNNING trials, written straight into the database so the trigger
   queues them). Target: the idle sweep does not grow with the number of trials.

Studies are bulk-inserted with SQLAlchemy Core into Optuna's tables. Each backend/size gets a
fresh database: a file in a temporary directory for SQLite (TMPDIR picks the disk), a
throwaway PostgreSQL database (created and dropped here; HITL_TEST_POSTGRES_URL names the
admin URL, default postgresql+psycopg2://postgres@127.0.0.1:5432/postgres). A PostgreSQL that
cannot be reached is reported and skipped.

    python scripts/bench_core.py [--backends sqlite,postgresql] [--sizes 1000,10000,100000]
                                 [--repeat 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
from pathlib import Path
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any
from typing import Callable
from typing import Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
import optuna_dashboard
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchdb import PG_ADMIN_URL  # noqa: E402
from benchdb import Unavailable  # noqa: E402
from benchdb import database  # noqa: E402

from hitl_pruner import Settings  # noqa: E402
from hitl_pruner import create_app  # noqa: E402

LATENCY_TRIALS = 1000
NOTE_EVERY = 10
CHANGED = 100
WARMUP = 5
INSERT_BATCH = 5000

trials_t: sa.Table = models.TrialModel.__table__  # type: ignore[assignment]
values_t: sa.Table = models.TrialValueModel.__table__  # type: ignore[assignment]
attrs_t: sa.Table = models.StudySystemAttributeModel.__table__  # type: ignore[assignment]


# --- databases -------------------------------------------------------------------------------




def server_version(backend: str) -> str:
    if backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    engine = sa.create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return "PostgreSQL " + str(conn.exec_driver_sql("SHOW server_version").scalar())
    except sa.exc.OperationalError as exc:
        raise Unavailable(str(exc.orig).strip().splitlines()[0]) from None
    finally:
        engine.dispose()


# --- studies ---------------------------------------------------------------------------------


def batched(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), INSERT_BATCH):
        yield rows[start : start + INSERT_BATCH]


def populate(
    url: str, name: str, n_trials: int, n_running: int, *, note_running: bool = False
) -> tuple[int, list[int], set[int]]:
    """A study of n_trials, the last n_running RUNNING and the others COMPLETE with a value,
    and a plain (command-free) note on every tenth trial, and on every RUNNING one if
    note_running. Returns (study_id, trial ids by number, ids of the trials with a note).
    """
    storage = RDBStorage(url)  # creates Optuna's schema
    study_id = optuna.create_study(study_name=name, storage=storage)._study_id
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    first_running = n_trials - n_running
    with storage.engine.begin() as conn:
        rows = [
            {
                "number": i,
                "study_id": study_id,
                "state": TrialState.COMPLETE if i < first_running else TrialState.RUNNING,
                "datetime_start": now,
                "datetime_complete": now if i < first_running else None,
            }
            for i in range(n_trials)
        ]
        for chunk in batched(rows):
            conn.execute(sa.insert(trials_t), chunk)
        ids = list(
            conn.execute(
                sa.select(trials_t.c.trial_id)
                .where(trials_t.c.study_id == study_id)
                .order_by(trials_t.c.number)
            ).scalars()
        )
        finite = models.TrialValueModel.TrialValueType.FINITE
        values = [
            {"trial_id": tid, "objective": 0, "value": i / n_trials, "value_type": finite}
            for i, tid in enumerate(ids[:first_running])
        ]
        for chunk in batched(values):
            conn.execute(sa.insert(values_t), chunk)
        noted = {
            tid
            for i, tid in enumerate(ids)
            if i % NOTE_EVERY == 0 or (note_running and i >= first_running)
        }
        notes = [
            row
            for i, tid in enumerate(ids)
            if tid in noted
            for row in (
                {"study_id": study_id, "key": f"dashboard:{tid}:note_ver", "value_json": "1"},
                {
                    "study_id": study_id,
                    "key": f"dashboard:{tid}:note_str:0",
                    "value_json": json.dumps(f"Trial #{i}: loss plateaued, lr looks fine."),
                },
            )
        ]
        for chunk in batched(notes):
            conn.execute(sa.insert(attrs_t), chunk)
    storage.engine.dispose()
    return study_id, ids, noted


def write_notes(engine: sa.Engine, study_id: int, notes: dict[int, tuple[int, str]]) -> None:
    """Write notes {trial_id: (version, body)} the way the dashboard stores them."""
    with engine.begin() as conn:
        existing = set(
            conn.execute(
                sa.select(attrs_t.c.key)
                .where(attrs_t.c.study_id == study_id)
                .where(attrs_t.c.key.in_([f"dashboard:{tid}:note_ver" for tid in notes]))
            ).scalars()
        )
        new: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        for tid, (version, body) in notes.items():
            ver_key = f"dashboard:{tid}:note_ver"
            rows = old if ver_key in existing else new
            rows.append({"study_id": study_id, "key": ver_key, "value_json": json.dumps(version)})
            rows.append({
                "study_id": study_id,
                "key": f"dashboard:{tid}:note_str:0",
                "value_json": json.dumps(body),
            })
        if new:
            conn.execute(sa.insert(attrs_t), new)
        if old:
            conn.execute(
                sa.update(attrs_t)
                .where(attrs_t.c.study_id == sa.bindparam("b_study"))
                .where(attrs_t.c.key == sa.bindparam("b_key"))
                .values(value_json=sa.bindparam("b_value")),
                [{"b_study": r["study_id"], "b_key": r["key"], "b_value": r["value_json"]}
                 for r in old],
            )


def queue_length(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT COUNT(*) FROM hitl_note_changes").scalar() or 0)


# --- timing ----------------------------------------------------------------------------------


def put_note(app: Any, study_id: int, trial_id: int, version: int, body: str) -> tuple[str, dict]:
    """One in-process PUT of a trial note; returns (status, headers)."""
    data = json.dumps({"version": version, "body": body}).encode()
    environ = {
        "REQUEST_METHOD": "PUT",
        "PATH_INFO": f"/api/studies/{study_id}/{trial_id}/note",
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=status, headers=dict(headers))
        return lambda _: None

    result = app(environ, start_response)
    try:
        b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return captured["status"], captured["headers"]


def ms(samples: list[float]) -> float:
    return statistics.median(samples)


# --- 1. note-save latency --------------------------------------------------------------------


class Trials:
    """A latency study in one database, and the note versions of its trials."""

    def __init__(self, url: str, n_running: int) -> None:
        # The RUNNING trials have a note already, so PRUNE saves rewrite their keys instead
        # of adding new ones: the study's note count, which the dashboard's save reads in
        # full, stays the same in both databases.
        self.study_id, ids, noted = populate(
            url, "latency", LATENCY_TRIALS, n_running, note_running=True
        )
        self.versions = {tid: 1 if tid in noted else 0 for tid in ids}
        self.noted = itertools.cycle(ids[: LATENCY_TRIALS - n_running : NOTE_EVERY])  # COMPLETE
        self.running = iter(ids[-n_running:])

    def save(self, app: Any, tid: int, body: str) -> tuple[float, dict]:
        """Save a note as the dashboard's editor does (stored version + 1); (ms, headers)."""
        start = time.perf_counter()
        status, headers = put_note(app, self.study_id, tid, self.versions[tid] + 1, body)
        took = (time.perf_counter() - start) * 1000
        if not status.startswith("204"):
            raise RuntimeError(f"note save of trial {tid} answered {status}")
        self.versions[tid] += 1
        return took, headers

    def plain(self, app: Any) -> float:
        return self.save(app, next(self.noted), "Looks fine, keep it running.")[0]

    def prune(self, app: Any) -> float:
        tid = next(self.running)
        took, headers = self.save(app, tid, "PRUNE")
        outcome = json.loads(headers["X-Hitl-Outcome"])
        if outcome["action"] != "applied":
            raise RuntimeError(f"PRUNE of trial {tid} was not applied: {outcome}")
        return took


def bench_latency(bare_url: str, hitl_url: str, repeat: int) -> dict[str, float]:
    """Bare dashboard on a database without hitl-pruner, everything else on one with it."""
    n_running = repeat + WARMUP
    plain_db, hitl_db = Trials(bare_url, n_running), Trials(hitl_url, n_running)
    bare = optuna_dashboard.wsgi(RDBStorage(bare_url))
    bare_on_hitl_db = optuna_dashboard.wsgi(RDBStorage(hitl_url))
    hitl = create_app(Settings(storage_url=hitl_url), autostart=False)
    hitl.sweeper.run_once()  # drain the bootstrap queue (not timed)
    runs: dict[str, Callable[[], float]] = {
        "bare": lambda: plain_db.plain(bare),
        "bare_trigger": lambda: hitl_db.plain(bare_on_hitl_db),
        "hitl_plain": lambda: hitl_db.plain(hitl),
        "hitl_prune": lambda: hitl_db.prune(hitl),
    }
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for i in range(WARMUP + repeat):  # interleaved, so drift hits all four alike
        for key, run in runs.items():
            took = run()
            if i >= WARMUP:
                samples[key].append(took)
    hitl.store.engine.dispose()
    return {key: ms(values) for key, values in samples.items()}


# --- 2. sweep cost ---------------------------------------------------------------------------


def bench_sweep(url: str, n_trials: int, repeat: int, rounds: int) -> dict[str, float]:
    n_running = rounds * CHANGED
    if n_running > n_trials:
        raise SystemExit(f"--rounds {rounds} needs studies of at least {n_running} trials")
    study_id, ids, noted = populate(url, f"sweep{n_trials}", n_trials, n_running)
    app = create_app(Settings(storage_url=url), autostart=False)
    engine = app.store.engine
    bootstrap = app.sweeper.run_once()  # drains what install's bootstrap queued (not timed)
    assert queue_length(engine) == 0, "the bootstrap queue was not drained"

    idle = []
    for _ in range(WARMUP + repeat):
        stats = app.sweeper.run_once()
        assert stats.changes == 0, stats
        idle.append(stats.seconds * 1000)

    changed = []
    for r in range(rounds):
        first = n_trials - n_running + r * CHANGED
        notes = {  # a trial that has a note (every tenth) gets its version 2
            ids[i]: (2 if ids[i] in noted else 1, f"PRUNE: diverged (round {r})")
            for i in range(first, first + CHANGED)
        }
        write_notes(engine, study_id, notes)
        stats = app.sweeper.run_once()
        if stats.applied != CHANGED:
            raise RuntimeError(f"sweep applied {stats.applied} of {CHANGED} notes: {stats}")
        changed.append(stats.seconds * 1000)
    engine.dispose()
    return {
        "bootstrap": bootstrap.seconds * 1000,
        "bootstrap_changes": bootstrap.changes,
        "idle": ms(idle[WARMUP:]),
        "changed": ms(changed),
        "changed_min": min(changed),
        "changed_max": max(changed),
    }


# --- report ----------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def skip(backend: str, exc: Exception) -> None:
    admin = sa.make_url(PG_ADMIN_URL).render_as_string(hide_password=True)
    print(f"!! {backend} skipped: cannot use {admin} ({exc})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="study sizes, in trials, for the sweep (default 1000,10000,100000)")
    parser.add_argument("--repeat", type=int, default=50,
                        help="timed note saves per kind, and idle sweeps per size (default 50)")
    parser.add_argument("--rounds", type=int, default=5,
                        help=f"timed sweeps of {CHANGED} changed notes per size (default 5)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()

    versions = []
    for backend in list(backends):
        try:
            versions.append(server_version(backend))
        except Unavailable as exc:
            skip(backend, exc)
            backends.remove(backend)
    print(
        f"machine: Python {platform.python_version()}, optuna {optuna.__version__}, "
        f"optuna-dashboard {optuna_dashboard.__version__}, SQLAlchemy {sa.__version__}, "
        f"{', '.join(versions)}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"settings: repeat={args.repeat} rounds={args.rounds} (medians; in-process WSGI calls)")
    sys.stdout.flush()

    latency: dict[str, dict[str, float]] = {}
    sweeps: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="hitl-bench-") as tmp:
        for backend in backends:
            try:
                print(f".. {backend}: note-save latency", file=sys.stderr, flush=True)
                with database(backend, Path(tmp)) as bare_url, database(
                    backend, Path(tmp)
                ) as url:
                    latency[backend] = bench_latency(bare_url, url, args.repeat)
                sweeps[backend] = {}
                for n in sizes:
                    print(f".. {backend}: sweep on {n:,} trials", file=sys.stderr, flush=True)
                    with database(backend, Path(tmp)) as url:
                        sweeps[backend][n] = bench_sweep(url, n, args.repeat, args.rounds)
            except Unavailable as exc:
                skip(backend, exc)
                latency.pop(backend, None)
                sweeps.pop(backend, None)

    print(
        f"\n## Note-save latency, ms (study of {LATENCY_TRIALS} trials, a note on every "
        f"{NOTE_EVERY}th and on the {args.repeat + WARMUP} RUNNING ones; median of {args.repeat})"
    )
    rows = []
    for backend, r in latency.items():
        rows.append([
            backend, f"{r['bare']:.2f}", f"{r['bare_trigger']:.2f}", f"{r['hitl_plain']:.2f}",
            f"{r['hitl_prune']:.2f}", f"{r['hitl_plain'] / r['bare']:.2f}x",
            f"{r['hitl_prune'] / r['bare']:.2f}x",
            "ok" if r["hitl_prune"] / r["bare"] <= 1.5 else "OVER",
        ])
    print(table(
        ["backend", "bare plain", "bare plain (trigger on)", "hitl plain", "hitl PRUNE",
         "hitl plain / bare", "PRUNE / bare", "<= 1.5x"],
        rows,
    ))

    print(
        f"\n## Sweep run_once, ms (idle: median of {args.repeat}; changed: median of "
        f"{args.rounds} sweeps applying {CHANGED} PRUNE notes)"
    )
    rows = []
    for backend, by_size in sweeps.items():
        base = by_size[min(by_size)]["idle"]
        for n, r in by_size.items():
            rows.append([
                backend, f"{n:,}", f"{r['idle']:.2f}", f"{r['idle'] / base:.2f}x",
                f"{r['changed']:.0f} ({r['changed_min']:.0f}-{r['changed_max']:.0f})",
                f"{r['bootstrap']:.0f} ({int(r['bootstrap_changes']):,})",
            ])
    print(table(
        ["backend", "trials", "idle", f"idle / {min(sizes):,}", f"{CHANGED} changed (min-max)",
         "bootstrap drain (queued)"],
        rows,
    ))
    print(
        f"\ntotal runtime {time.perf_counter() - started:.0f} s, "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
