"""Real-time benchmark of hitl-pruner on real servers, per database (issue 11), printing ratios.

Sections (``--only`` picks some; all by default):

latency
    A real server, ``gunicorn wsgi:app`` with HITL_* settings at their defaults (the default
    --interval) from the repository root, on a study of 1,000 trials. (a) ``PUT
    /api/studies/<sid>/<tid>/note`` with ``PRUNE`` (the stored version + 1, as the dashboard's
    editor sends it) on a RUNNING trial; (b) ``optuna_dashboard.save_note(trial, "PRUNE")`` from
    this process (another process, its own connection: a script's write), on RUNNING and
    COMPLETE trials in turn, at random moments (gaps uniform in 0..2 x interval/notes, so the
    writes fall at every phase of the sweep). The clock starts as the PUT is sent or as
    save_note is called; the state counts as changed at the first poll of this process
    (``SELECT trial_id, state FROM trials WHERE trial_id IN (...)`` every --poll seconds, on an
    autocommit connection) that reads the new state. min/median/p95/max.
    Target: a script's note, median <= 0.5 s and p95 <= 1 s.
sweep
    ``app.sweeper.run_once()`` in this process (``create_app(..., autostart=False)``), with a
    SQLAlchemy ``before_cursor_execute`` counter (statements) and ``commit`` counter
    (transactions): with nothing changed, and after 100 and 1,000 ``PRUNE`` notes on RUNNING
    trials written straight into the database (the trigger queues them, as for any script); and
    a first start over 10,000 existing plain notes: ``create_app`` (which installs the tables,
    triggers and bootstrap queue) and its first sweep. Targets: 100 changed <= 100 ms and <= 15
    statements; 1,000 <= 1 s; first start (create_app + first sweep) <= 1 s.
idle
    The idle sweeping process: a single-worker ``gunicorn wsgi:app`` at default settings on a
    study of 1,000 and of --trials trials (a note on every tenth), after its first sweep; CPU
    time of the worker (which holds the sweep) over --idle-seconds, as % of one core, from the
    process's CPU clock (``clock_getcpuclockid``: /proc/<pid>/stat's utime+stime at ns
    resolution). Target: <= 1%, flat from 1k to 100k trials.
passthrough
    SQLite, a study of 1,000 trials (10 RUNNING): ``gunicorn wsgi:app`` against the bare
    ``optuna_dashboard.wsgi(storage)`` (scripts/_bench_bare.py) under the same gunicorn
    settings (./gunicorn.conf.py: one worker, gthread, 4 threads), on the same database file,
    both running, both on the first CPU and the client on the others (``taskset``; --no-pin
    lets them share: on a 2-core machine the client's threads then steal the server's core at
    random, which spread the per-round ratios by +/-10-20%); for each endpoint, --rounds
    rounds, each a leg of --leg seconds in which the client sends to both servers at once,
    --concurrency keep-alive connections each, so that both meet the same slow patches of a
    shared machine at the same moments (one server at a time, alternating, the per-round ratios
    spread +/-25-45% on a noisy 2-core VM; --one-at-a-time does that). Throughput ratio = ours /
    bare, requests answered in the same seconds, each server on half the CPU (target >= 0.97x);
    CPU per request ratio, from the CPU clocks of the server's processes over each leg (target
    <= 1.03x). The median of the per-round ratios, and their min-max. The rounds are spread over
    --generations sets of freshly started servers: one process runs the same code a few % faster
    or slower than another, for its whole life (seen: two bare dashboards 1-1.5% apart through
    eight rounds, under the same PYTHONHASHSEED), so only more sets of servers narrow the
    median, not more rounds on the same ones. --aa runs a second bare dashboard beside the
    first, measured as ours is: its rows (A/A) are the bench's own bias and noise under the same
    conditions. The study detail (with and without ``after=``) reads the dashboard's trial
    cache, which reloads every trial on the first request after 10 s (its TTL for 500 trials or
    more). Short legs would meet a reload by chance, on one side more than the other; so on
    those two endpoints a leg lasts about --cache-leg seconds (0.9 of the TTL), both caches have
    expired before the first leg, and a server mostly idles a leg between two of its own: a leg
    then meets one reload, on both sides alike (--cache-rounds rounds). The "slow" column counts
    requests over 4x the leg's median on each side, so that a cache we cleared or bypassed shows
    there.
saves
    Note-save ratios, in process (WSGI calls, as scripts/bench_core.py; gunicorn's noise is
    wider than the 5% to be told), per database, on studies of 1,000 trials: the bare dashboard
    on a database without hitl-pruner (plain save), the bare dashboard on ours (trigger on),
    a plain save through hitl-pruner, and a ``PRUNE`` save on a RUNNING trial through it,
    interleaved, --rounds rounds of --saves each. Targets: PRUNE through us / bare plain <=
    1.2x; plain through us / bare plain <= 1.05x. Ratios of medians, pooled over all rounds;
    the spread is the per-round min-max.

Databases: a file in a temporary directory for SQLite; throwaway PostgreSQL and MariaDB/MySQL
databases created and dropped here (HITL_TEST_POSTGRES_URL, HITL_TEST_MYSQL_URL name the admin
URLs, as for the tests). A server that cannot be reached is reported and skipped, or stops the
run with --require-all. Progress goes to stderr, the report to stdout.

    python scripts/bench_latency.py [--quick] [--backends sqlite,postgresql,mysql]
        [--require-all] [--only latency,sweep,idle,passthrough,saves] [--trials 100000] ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
from pathlib import Path
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from typing import Callable
from typing import Iterator

import gunicorn
import optuna
from optuna.storages import RDBStorage
import optuna_dashboard
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench_servers as servers  # noqa: E402
from benchdb import BACKENDS  # noqa: E402
from benchdb import Study  # noqa: E402
from benchdb import Unavailable  # noqa: E402
from benchdb import admin_url  # noqa: E402
from benchdb import build_study  # noqa: E402
from benchdb import database  # noqa: E402
from benchdb import server_version  # noqa: E402
from benchdb import write_notes  # noqa: E402

import hitl_pruner  # noqa: E402
from hitl_pruner import Settings  # noqa: E402
from hitl_pruner import create_app  # noqa: E402

SECTIONS = ("latency", "sweep", "idle", "passthrough", "saves")
DEFAULT_INTERVAL = Settings().interval
STUDY_TRIALS = 1000
SWEEP_CHANGED = (100, 1000)
FIRST_START_NOTES = 10_000
WARMUP = 5
MIN_LEG_REQUESTS = 4
# optuna-dashboard's trial cache lives this long for a study of 500 trials or more.
CACHE_TTL = 10.0
SLOW = 4.0


# --- small helpers ---------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f".. {message}", file=sys.stderr, flush=True)


def p95(samples: list[float]) -> float:
    """Nearest rank: the smallest sample with at least 95% of the samples at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(nothing measured)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


class StatementCounter:
    """SQL statements and commits on every engine of this process, while counting."""

    def __init__(self) -> None:
        self.statements = 0
        self.commits = 0
        self.on = False
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._statement)
        sa.event.listen(sa.engine.Engine, "commit", self._commit)

    def _statement(self, *args: Any) -> None:
        if self.on:
            self.statements += 1

    def _commit(self, *args: Any) -> None:
        if self.on:
            self.commits += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[StatementCounter]:
        self.statements = self.commits = 0
        self.on = True
        try:
            yield self
        finally:
            self.on = False


COUNTER = StatementCounter()


class StatePoller:
    """The bench's own cheap look at trial states, on an autocommit connection (so each read
    sees the latest commit: MySQL's REPEATABLE READ would otherwise keep one snapshot)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.conn = self.engine.connect()

    def states(self, trial_ids: Iterator[int] | list[int]) -> dict[int, str]:
        ids = ",".join(str(int(t)) for t in trial_ids)
        rows = self.conn.exec_driver_sql(
            f"SELECT trial_id, state FROM trials WHERE trial_id IN ({ids})"
        )
        return {int(tid): str(state) for tid, state in rows}

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def server_env(url: str) -> dict[str, str]:
    # Everything else at its default: the interval, the grace, one worker.
    return {"HITL_STORAGE_URL": url}


# --- latency: note -> state changed, on a real server ----------------------------------------


@dataclasses.dataclass
class Latencies:
    dashboard: list[float]  # PUT sent -> state changed, s
    dashboard_put: list[float]  # PUT sent -> 204 received, s
    script: list[float]  # save_note called -> state changed, s
    script_missed: int  # script notes never applied within the timeout


def bench_notes(url: str, tmp: Path, args: argparse.Namespace, rng: random.Random) -> Latencies:
    n = args.notes
    n_script_running = (n + 1) // 2
    study = build_study(url, "latency", STUDY_TRIALS, n + n_script_running)
    dash_trials = study.running[:n]
    script_running = study.running[n:]
    # COMPLETE trials without a note yet (the noted ones are every tenth).
    script_complete = [t for t in study.complete if t not in study.noted][: n - n_script_running]
    script_trials = [t for pair in zip(script_running, script_complete) for t in pair]
    script_trials += script_running[len(script_complete):][: n - len(script_trials)]

    poller = StatePoller(url)
    log = tmp / f"latency-{study.study_id}-{os.getpid()}.log"
    try:
        with servers.running("wsgi:app", server_env(url), log) as server:
            server.wait_swept()
            dashboard, put_times = dashboard_latencies(server, study, dash_trials, poller, args,
                                                       rng)
            script, missed = script_latencies(url, study, script_trials, poller, args, rng)
    finally:
        poller.close()
    return Latencies(dashboard, put_times, script, missed)


def dashboard_latencies(
    server: servers.Server, study: Study, trial_ids: list[int], poller: StatePoller,
    args: argparse.Namespace, rng: random.Random,
) -> tuple[list[float], list[float]]:
    conn = servers.Connection(server.port)
    changed: list[float] = []
    answered: list[float] = []
    for tid in trial_ids:
        time.sleep(rng.uniform(0.05, 0.25))  # not in step with anything of the server's
        raw = servers.build_request(
            "PUT", f"/api/studies/{study.study_id}/{tid}/note", server.port,
            {"version": 2 if tid in study.noted else 1, "body": "PRUNE"},
        )
        reply: dict[str, Any] = {}

        def put(raw: bytes = raw, reply: dict[str, Any] = reply) -> None:
            reply["status"], reply["body"] = conn.request(raw)
            reply["at"] = time.perf_counter()

        thread = threading.Thread(target=put)
        start = time.perf_counter()
        thread.start()
        seen = wait_changed(poller, {tid: "RUNNING"}, start, args.poll, timeout=30.0)
        thread.join()
        if reply.get("status") != 204:
            raise RuntimeError(f"PUT note of trial {tid}: {reply}")
        if tid not in seen:
            raise RuntimeError(f"PUT PRUNE of trial {tid}: the state did not change in 30 s")
        changed.append(seen[tid])
        answered.append(reply["at"] - start)
    conn.close()
    return changed, answered


def wait_changed(
    poller: StatePoller, initial: dict[int, str], start: float, period: float, timeout: float
) -> dict[int, float]:
    """Poll until every trial's state differs from initial; {trial: seconds since start}."""
    seen: dict[int, float] = {}
    while len(seen) < len(initial) and time.perf_counter() - start < timeout:
        at = time.perf_counter()  # the read's snapshot is taken as it starts
        for tid, state in poller.states([t for t in initial if t not in seen]).items():
            if state != initial[tid]:
                seen[tid] = at - start
        time.sleep(period)
    return seen


def script_latencies(
    url: str, study: Study, trial_ids: list[int], poller: StatePoller,
    args: argparse.Namespace, rng: random.Random,
) -> tuple[list[float], int]:
    """Notes written by optuna_dashboard.save_note at random moments; each one's latency."""
    storage = RDBStorage(url)
    loaded = optuna.load_study(study_name=study.name, storage=storage)
    trials = {tid: optuna.Trial(loaded, tid) for tid in trial_ids}
    initial = poller.states(trial_ids)
    # Writes spread over at least one interval, so that they meet the sweep at every phase.
    mean_gap = max(DEFAULT_INTERVAL / len(trial_ids), 0.2)
    pending: dict[int, float] = {}
    latencies: list[float] = []
    queue = list(trial_ids)
    next_at = time.perf_counter() + rng.uniform(0, 2 * mean_gap)
    last_write = time.perf_counter()
    timeout = 3 * DEFAULT_INTERVAL + 10
    while queue or pending:
        now = time.perf_counter()
        if queue and now >= next_at:
            tid = queue.pop(0)
            pending[tid] = time.perf_counter()
            optuna_dashboard.save_note(trials[tid], "PRUNE")
            last_write = time.perf_counter()
            next_at = last_write + rng.uniform(0, 2 * mean_gap)
        if pending:
            at = time.perf_counter()
            for tid, state in poller.states(list(pending)).items():
                if state != initial[tid]:
                    latencies.append(at - pending.pop(tid))
        if not queue and time.perf_counter() - last_write > timeout:
            break
        time.sleep(args.poll)
    storage.engine.dispose()
    return latencies, len(pending)


# --- sweep: its cost in process --------------------------------------------------------------


@dataclasses.dataclass
class SweepCost:
    label: str
    seconds: float
    statements: int
    commits: int
    changes: int
    applied: int


def measured_sweep(app: Any, label: str) -> SweepCost:
    with COUNTER.counting() as counted:
        stats = app.sweeper.run_once()
    return SweepCost(label, stats.seconds, counted.statements, counted.commits, stats.changes,
                     stats.applied)


def bench_sweep(url: str, first_start_url: str, args: argparse.Namespace) -> list[SweepCost]:
    n_running = args.sweep_rounds * SWEEP_CHANGED[0] + SWEEP_CHANGED[1]
    study = build_study(url, "sweep", n_running + STUDY_TRIALS, n_running)
    app = create_app(Settings(storage_url=url), autostart=False)
    engine = app.store.engine
    app.sweeper.run_once()  # drains what install's bootstrap queued (not timed)
    results: list[SweepCost] = []
    idle = [measured_sweep(app, "0 changed") for _ in range(WARMUP + args.repeat)][WARMUP:]
    results.append(median_cost(idle, f"0 changed (median of {args.repeat})"))
    running = iter(study.running)
    for size, rounds in ((SWEEP_CHANGED[0], args.sweep_rounds), (SWEEP_CHANGED[1], 1)):
        costs = []
        for _ in range(rounds):
            batch = [next(running) for _ in range(size)]
            write_notes(engine, study.study_id, {tid: (1, "PRUNE") for tid in batch})
            cost = measured_sweep(app, "")
            if cost.applied != size:
                raise RuntimeError(f"the sweep applied {cost.applied} of {size} notes: {cost}")
            costs.append(cost)
        label = f"{size:,} changed" + (f" (median of {rounds})" if rounds > 1 else "")
        results.append(median_cost(costs, label))
    engine.dispose()

    # A first start over notes written before hitl-pruner was installed.
    build_study(first_start_url, "first-start", FIRST_START_NOTES, 0, note_every=1)
    with COUNTER.counting() as counted:
        started = time.perf_counter()
        app = create_app(Settings(storage_url=first_start_url), autostart=False)
        took = time.perf_counter() - started
    results.append(SweepCost(f"first start: create_app ({FIRST_START_NOTES:,} notes)", took,
                             counted.statements, counted.commits, 0, 0))
    first = measured_sweep(app, "first start: first sweep")
    results.append(first)
    results.append(SweepCost("first start: total", took + first.seconds,
                             results[-2].statements + first.statements,
                             results[-2].commits + first.commits, first.changes, first.applied))
    app.store.engine.dispose()
    return results


def median_cost(costs: list[SweepCost], label: str) -> SweepCost:
    mid = sorted(costs, key=lambda c: c.seconds)[len(costs) // 2]
    return dataclasses.replace(mid, label=label)


# --- idle: CPU of the sweeping process -------------------------------------------------------


@dataclasses.dataclass
class IdleCpu:
    trials: int
    worker: float  # % of one core
    master: float


def bench_idle(url: str, n_trials: int, tmp: Path, args: argparse.Namespace) -> IdleCpu:
    build_study(url, "idle", n_trials, 10)
    log = tmp / f"idle-{n_trials}-{os.getpid()}.log"
    with servers.running("wsgi:app", server_env(url), log) as server:
        server.wait_swept(timeout=120)
        time.sleep(2.0)  # past the start: imports done, connections open
        (worker,) = server.workers()
        before = time.perf_counter(), servers.cpu_seconds(worker), servers.cpu_seconds(server.pid)
        time.sleep(args.idle_seconds)
        after = time.perf_counter(), servers.cpu_seconds(worker), servers.cpu_seconds(server.pid)
    wall = after[0] - before[0]
    return IdleCpu(n_trials, 100 * (after[1] - before[1]) / wall,
                   100 * (after[2] - before[2]) / wall)


# --- passthrough: gunicorn, ours against the bare dashboard ----------------------------------


@dataclasses.dataclass
class Leg:
    requests: int
    wall: float
    cpu: float
    # Requests that took over SLOW x the leg's median: on the study detail, the dashboard
    # reloading every trial into its cache (every 10 s for a study of 500 trials or more).
    slow: int


@dataclasses.dataclass
class PassThrough:
    endpoint: str
    ours: list[Leg]
    bare: list[Leg]

    def throughput_ratio(self, legs: slice = slice(None)) -> float:
        return (sum(x.requests for x in self.ours[legs]) / sum(x.wall for x in self.ours[legs])) / (
            sum(x.requests for x in self.bare[legs]) / sum(x.wall for x in self.bare[legs]))

    def cpu_ratio(self, legs: slice = slice(None)) -> float:
        return (sum(x.cpu for x in self.ours[legs]) / sum(x.requests for x in self.ours[legs])) / (
            sum(x.cpu for x in self.bare[legs]) / sum(x.requests for x in self.bare[legs]))

    def per_round(self, ratio: Callable[[slice], float]) -> list[float]:
        return [ratio(slice(i, i + 1)) for i in range(len(self.ours))]


def pin_cpus(args: argparse.Namespace) -> tuple[set[int] | None, set[int] | None]:
    """The CPUs of the servers and of the client: apart, so that neither side's legs are
    slowed by the client (a Python process with threads of its own) taking the server's CPU
    at random; both servers alike. None, None with --no-pin or fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def bench_passthrough(url: str, tmp: Path, args: argparse.Namespace) -> list[PassThrough]:
    study = build_study(url, "passthrough", STUDY_TRIALS, 10)
    # The dashboard asks for the trials after those it holds that can no longer change.
    after = len(study.complete)
    endpoints = [
        "/api/studies",
        f"/api/studies/{study.study_id}",
        f"/api/studies/{study.study_id}?after={after}",
        "/dashboard",
        "/static/bundle.js",
        "/api/meta",
    ]
    env = server_env(url)
    server_cpus, client_cpus = pin_cpus(args)
    names = ("ours", "bare", "bare2") if args.aa else ("ours", "bare")
    legs: dict[str, dict[str, list[Leg]]] = {p: {n: [] for n in names} for p in endpoints}
    # Each server process is a little faster or slower than another of the same code, for its
    # whole life (memory layout, hash seeds): +/-3% on /api/meta here, as much as the target.
    # So the rounds are spread over --generations sets of freshly started servers.
    for generation in range(args.generations):
        rounds = _share(args.rounds, args.generations, generation)
        cache_rounds = _share(args.cache_rounds, args.generations, generation)
        with contextlib.ExitStack() as stack:
            # --aa: a second bare dashboard beside the first, measured as ours is: its ratio
            # to the first is the bench's own bias and noise, under the same conditions.
            # Ours starts first in one set and last in the next, so no server is always the
            # eldest (the first set's installs the schema before the others open it).
            order = names if generation % 2 == 0 else names[::-1]
            running: dict[str, servers.Server] = {}
            for name in order:
                app, extra = ("wsgi:app", ()) if name == "ours" else (
                    "_bench_bare:app", ("--pythonpath", "scripts"))
                running[name] = stack.enter_context(servers.running(
                    app, env, tmp / f"passthrough-{name}-{generation}.log", extra_args=extra,
                    cpus=server_cpus))
            running = {name: running[name] for name in names}  # the tables' order
            stack.enter_context(servers.pinned(client_cpus))
            running["ours"].wait_swept()  # installed, and the bootstrap queue drained
            for path in endpoints:
                progress(f"sqlite: pass-through {path} (servers {generation + 1} of "
                         f"{args.generations})")
                _passthrough_legs(running, path, args, legs[path], rounds, cache_rounds)
    results = []
    for path in endpoints:
        results.append(PassThrough(path, legs[path]["ours"], legs[path]["bare"]))
        if args.aa:
            results.append(PassThrough(f"{path} (A/A)", legs[path]["bare2"], legs[path]["bare"]))
    return results


def _share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` near-equal whole parts."""
    return total // parts + (index < total % parts)


def _leg(requests: int, wall: float, cpu: float, times: list[float]) -> Leg:
    return Leg(requests, wall, cpu, sum(t > SLOW * statistics.median(times) for t in times))


def _passthrough_legs(running: dict[str, servers.Server], path: str, args: argparse.Namespace,
                      legs: dict[str, list[Leg]], rounds: int, cache_rounds: int) -> None:
    """``rounds`` legs of ``path`` on each running server (``cache_rounds`` on the study
    detail), appended to ``legs``."""
    pids = {name: s.pids() for name, s in running.items()}
    raws = {name: servers.build_request("GET", path, s.port) for name, s in running.items()}
    for name, server in running.items():  # warm: caches filled, code paths hot
        servers.hammer(server.port, raws[name], 2 * args.concurrency, args.concurrency)
    # As many requests as take about --leg seconds on the bare dashboard (a page load costs
    # it ~0.1 s of CPU: it checks the schema's Alembic revision each time).
    took, _ = servers.hammer(running["bare"].port, raws["bare"], 2 * args.concurrency,
                             args.concurrency)
    cached = path.startswith("/api/studies/")
    seconds, rounds = (args.cache_leg, cache_rounds) if cached else (args.leg, rounds)
    n = max(MIN_LEG_REQUESTS, min(100_000, round(seconds / (took / (2 * args.concurrency)))))
    if cached:
        time.sleep(CACHE_TTL)  # every cache expires: each first leg meets a reload
    if not cached and not args.one_at_a_time:
        for _ in range(rounds):
            before = {name: s.cpu(pids[name]) for name, s in running.items()}
            together = servers.hammer_together(
                [(s.port, raws[name]) for name, s in running.items()], seconds,
                args.concurrency)
            for (name, server), (count, wall, times) in zip(running.items(), together):
                legs[name].append(_leg(count, wall, server.cpu(pids[name]) - before[name], times))
        return
    names = list(running)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            server = running[name]
            cpu0 = server.cpu(pids[name])
            wall, times = servers.hammer(server.port, raws[name], n, args.concurrency)
            legs[name].append(_leg(n, wall, server.cpu(pids[name]) - cpu0, times))


# --- saves: note-save ratios in process ------------------------------------------------------


def put_note(app: Any, study_id: int, trial_id: int, version: int, body: str) -> tuple[str, dict]:
    """One in-process PUT of a trial note; (status, headers)."""
    data = json.dumps({"version": version, "body": body}).encode()
    environ = {
        "REQUEST_METHOD": "PUT", "PATH_INFO": f"/api/studies/{study_id}/{trial_id}/note",
        "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)), "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(data), "wsgi.errors": io.StringIO(), "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": False,
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


class NoteSaver:
    """Saves on one study as the dashboard's editor does (stored version + 1): plain notes on
    the COMPLETE trials that have one (round robin), PRUNE on the RUNNING ones (each once; they
    have a note already, so the study's note count, which a save reads in full, stays put)."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.versions = {tid: 1 if tid in study.noted else 0 for tid in study.ids}
        self.noted = [t for t in study.complete if t in study.noted]
        self.turn = 0
        self.running = iter(study.running)

    def save(self, app: Any, tid: int, body: str) -> tuple[float, dict]:
        start = time.perf_counter()
        status, headers = put_note(app, self.study.study_id, tid, self.versions[tid] + 1, body)
        took = time.perf_counter() - start
        if not status.startswith("204"):
            raise RuntimeError(f"note save of trial {tid} answered {status}")
        self.versions[tid] += 1
        return took, headers

    def plain(self, app: Any) -> float:
        self.turn += 1
        return self.save(app, self.noted[self.turn % len(self.noted)], "Looks fine, keep it.")[0]

    def prune(self, app: Any) -> float:
        tid = next(self.running)
        took, headers = self.save(app, tid, "PRUNE")
        outcome = json.loads(headers["X-Hitl-Outcome"])
        if outcome["action"] != "applied":
            raise RuntimeError(f"PRUNE of trial {tid} was not applied: {outcome}")
        return took


SAVE_KINDS = ("bare", "bare_trigger", "hitl_plain", "hitl_prune")


def bench_saves(bare_url: str, hitl_url: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """Per round, the median ms of each kind of save."""
    n_running = args.save_rounds * args.saves + WARMUP
    bare_db = NoteSaver(build_study(bare_url, "saves", STUDY_TRIALS, n_running,
                                    note_running=True))
    hitl_db = NoteSaver(build_study(hitl_url, "saves", STUDY_TRIALS, n_running,
                                    note_running=True))
    hitl = create_app(Settings(storage_url=hitl_url), autostart=False)
    hitl.sweeper.run_once()  # drain the bootstrap queue (not timed)
    bare = optuna_dashboard.wsgi(RDBStorage(bare_url))
    bare_on_ours = optuna_dashboard.wsgi(RDBStorage(hitl_url))
    runs: dict[str, Callable[[], float]] = {
        "bare": lambda: bare_db.plain(bare),
        "bare_trigger": lambda: hitl_db.plain(bare_on_ours),
        "hitl_plain": lambda: hitl_db.plain(hitl),
        "hitl_prune": lambda: hitl_db.prune(hitl),
    }
    for _ in range(WARMUP):
        for run in runs.values():
            run()
    rounds = []
    for _ in range(args.save_rounds):
        samples: dict[str, list[float]] = {kind: [] for kind in runs}
        for _ in range(args.saves):  # interleaved, so drift hits all four alike
            for kind, run in runs.items():
                samples[kind].append(run())
        rounds.append({kind: statistics.median(v) * 1000 for kind, v in samples.items()})
    hitl.store.engine.dispose()
    return rounds


# --- the run ---------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=servers.REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        return rev
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated: sqlite, postgresql, mysql (default all three)")
    parser.add_argument("--require-all", action="store_true",
                        help="a database server that cannot be reached is an error, not a skip")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated (default {','.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true",
                        help="shorter run: the idle CPU at 1k and 10k trials over 10 s, fewer "
                        "pass-through and save rounds (the notes stay 20 each)")
    parser.add_argument("--notes", type=int, default=20,
                        help="notes timed per kind in the latency section (default 20, min 20)")
    parser.add_argument("--poll", type=float, default=0.005,
                        help="seconds between the bench's reads of the trial states (0.005)")
    parser.add_argument("--trials", type=int, default=None,
                        help="the large study of the idle section (default 100000; 10000 quick)")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help="idle CPU window (default 20; 10 quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="pass-through rounds (default 24; 4 quick)")
    parser.add_argument("--leg", type=float, default=None,
                        help="seconds of requests per server per round and endpoint "
                        "(default 1.0; 0.4 quick)")
    parser.add_argument("--cache-leg", type=float, default=None,
                        help="seconds per leg on the study detail endpoints, under the "
                        f"dashboard's {CACHE_TTL:.0f} s cache TTL (default 9.0; 4.5 quick)")
    parser.add_argument("--cache-rounds", type=int, default=None,
                        help="pass-through rounds on the study detail endpoints (default 6; "
                        "3 quick)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="pass-through legs one server at a time (alternating), as before "
                        "side-by-side legs; the study detail endpoints always are")
    parser.add_argument("--generations", type=int, default=None,
                        help="pass-through: sets of freshly started servers the rounds are "
                        "spread over (default 6; 1 quick)")
    parser.add_argument("--aa", action="store_true",
                        help="pass-through: also run a second bare dashboard beside the first "
                        "(an A/A check: its rows, marked (A/A), show the bench's own bias and "
                        "noise under the same conditions)")
    parser.add_argument("--no-pin", action="store_true",
                        help="pass-through: let the servers and the client share every CPU "
                             "(by default the servers run on the first CPU, the client on the "
                             "others)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="keep-alive connections in the pass-through section (default 2)")
    parser.add_argument("--save-rounds", type=int, default=None,
                        help="rounds of the saves section (default 5; 3 quick)")
    parser.add_argument("--saves", type=int, default=20,
                        help="saves per kind per round in the saves section (default 20)")
    parser.add_argument("--repeat", type=int, default=20,
                        help="idle sweeps timed in the sweep section (default 20)")
    parser.add_argument("--sweep-rounds", type=int, default=3,
                        help=f"sweeps of {SWEEP_CHANGED[0]} changed notes (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random gaps")
    args = parser.parse_args(argv)
    if args.notes < 20:
        parser.error("--notes must be at least 20 (the issue's minimum)")
    quick = args.quick
    args.trials = args.trials or (10_000 if quick else 100_000)
    args.idle_seconds = args.idle_seconds or (10.0 if quick else 20.0)
    args.rounds = args.rounds or (4 if quick else 24)
    args.cache_leg = args.cache_leg or (4.5 if quick else 0.9 * CACHE_TTL)
    args.cache_rounds = args.cache_rounds or (3 if quick else 6)
    args.generations = args.generations or (
        1 if quick else min(6, args.rounds, args.cache_rounds))
    if not 1 <= args.generations <= min(args.rounds, args.cache_rounds):
        parser.error("--generations must be from 1 to the number of rounds")
    if args.cache_leg >= CACHE_TTL:
        parser.error(f"--cache-leg must be under the cache's {CACHE_TTL:.0f} s")
    args.leg = args.leg or (0.4 if quick else 1.0)
    args.save_rounds = args.save_rounds or (3 if quick else 5)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in args.backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    for name in args.only:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    rng = random.Random(args.seed)
    load_start = os.getloadavg()

    backends: list[str] = []
    versions: list[str] = []
    skipped: list[str] = []
    for backend in args.backends:
        try:
            versions.append(server_version(backend))
            backends.append(backend)
        except Unavailable as exc:
            message = f"{backend} at {admin_url(backend)}: {exc}"
            if args.require_all:
                print(f"error: {message} (--require-all)", file=sys.stderr)
                return 1
            skipped.append(message)

    print("# hitl-pruner real-time benchmark (scripts/bench_latency.py)\n")
    print(f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}, "
          f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start")
    print(f"- versions: hitl-pruner {hitl_pruner.__version__} ({git_revision()}), Python "
          f"{platform.python_version()}, optuna {optuna.__version__}, optuna-dashboard "
          f"{optuna_dashboard.__version__}, gunicorn {gunicorn.__version__}, SQLAlchemy "
          f"{sa.__version__}, {', '.join(versions)}")
    print(f"- settings: {'--quick, ' if args.quick else ''}sections {','.join(args.only)}; "
          f"servers: gunicorn wsgi:app from the repository root (./gunicorn.conf.py: 1 worker, "
          f"gthread, 4 threads), every HITL_* setting at its default but HITL_STORAGE_URL "
          f"and HITL_PORT (--interval {DEFAULT_INTERVAL:g} s); notes={args.notes}, "
          f"poll={args.poll * 1000:g} ms, idle: 1,000 and {args.trials:,} trials over "
          f"{args.idle_seconds:g} s; pass-through: {args.rounds} rounds x {args.leg:g} s legs "
          f"(study detail: {args.cache_rounds} x {args.cache_leg:g} s), "
          f"{args.concurrency} connections, "
          f"{'unpinned' if args.no_pin else 'servers on CPU 0, client on the others'}; "
          f"saves: {args.save_rounds} rounds x {args.saves}")
    for message in skipped:
        print(f"- SKIPPED {message}")
    sys.stdout.flush()

    failures = 0
    with tempfile.TemporaryDirectory(prefix="hitl-bench-") as tmpdir:
        tmp = Path(tmpdir)

        def each(what: str, run: Callable[[str], Any]) -> dict[str, Any]:
            """run(backend) on every backend; one whose server went away is skipped."""
            results = {}
            for backend in backends:
                progress(f"{backend}: {what}")
                try:
                    results[backend] = run(backend)
                except Unavailable as exc:
                    if args.require_all:
                        raise SystemExit(f"error: {backend} ({what}): {exc} (--require-all)")
                    print(f"- SKIPPED {backend} ({what}): {exc}", flush=True)
            return results

        if "latency" in args.only:
            def latency(backend: str) -> Latencies:
                with database(backend, tmp) as url:
                    return bench_notes(url, tmp, args, rng)

            failures += report_latency(each("note -> state changed", latency), args)
        if "sweep" in args.only:
            def sweep(backend: str) -> list[SweepCost]:
                with database(backend, tmp) as url, database(backend, tmp) as first_url:
                    return bench_sweep(url, first_url, args)

            failures += report_sweep(each("sweep cost", sweep))
        if "idle" in args.only:
            def idle(backend: str) -> list[IdleCpu]:
                runs = []
                for n in (STUDY_TRIALS, args.trials):
                    progress(f"{backend}: idle CPU at {n:,} trials")
                    with database(backend, tmp) as url:
                        runs.append(bench_idle(url, n, tmp, args))
                return runs

            failures += report_idle(each("idle CPU", idle), args)
        if "passthrough" in args.only:
            with database("sqlite", tmp) as url:
                failures += report_passthrough(bench_passthrough(url, tmp, args), args)
        if "saves" in args.only:
            def saves(backend: str) -> list[dict[str, float]]:
                with database(backend, tmp) as bare_url, database(backend, tmp) as url:
                    return bench_saves(bare_url, url, args)

            failures += report_saves(each("note-save ratios", saves), args)

    load_end = os.getloadavg()
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s; load average at the end "
          f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"{failures} target(s) missed")
    return 0


# --- report ----------------------------------------------------------------------------------


def report_latency(results: dict[str, Latencies], args: argparse.Namespace) -> int:
    print(f"\n## Note -> trial state changed, s (real server, study of {STUDY_TRIALS:,} trials, "
          f"default --interval {DEFAULT_INTERVAL:g} s, {args.notes} notes each; detected by "
          f"polling every {args.poll * 1000:g} ms)\n")
    rows = []
    failures = 0
    for backend, r in results.items():
        for label, samples, target in (
            ("dashboard PUT PRUNE", r.dashboard, False),
            ("  (PUT answered)", r.dashboard_put, False),
            ("script save_note PRUNE", r.script, True),
        ):
            if not samples:
                rows.append([backend, label, "-", "-", "-", "-", "-", "no note applied"])
                failures += 1
                continue
            med, high = statistics.median(samples), p95(samples)
            note = ""
            if target:
                ok = med <= 0.5 and high <= 1.0 and not r.script_missed
                failures += not ok
                note = verdict(ok) + (f", {r.script_missed} never applied"
                                      if r.script_missed else "")
            rows.append([backend, label, str(len(samples)), f"{min(samples):.3f}",
                         f"{med:.3f}", f"{high:.3f}", f"{max(samples):.3f}", note])
    print(table(["backend", "note written by", "n", "min", "median", "p95", "max",
                 "median <= 0.5, p95 <= 1"], rows))
    return failures


def report_sweep(sweeps: dict[str, list[SweepCost]]) -> int:
    print("\n## Sweep cost, in process (run_once; statements = cursor executes, commits = "
          "transactions committed)\n")
    targets: dict[str, Callable[[SweepCost], bool]] = {
        "100 changed": lambda c: c.seconds <= 0.1 and c.statements <= 15,
        "1,000 changed": lambda c: c.seconds <= 1.0,
        "first start: total": lambda c: c.seconds <= 1.0,
    }
    target_text = {"100 changed": "<= 100 ms, <= 15 statements", "1,000 changed": "<= 1 s",
                   "first start: total": "<= 1 s"}
    rows = []
    failures = 0
    for backend, costs in sweeps.items():
        for c in costs:
            key = next((k for k in targets if c.label.startswith(k)), None)
            note = ""
            if key is not None:
                ok = targets[key](c)
                failures += not ok
                note = f"{verdict(ok)} ({target_text[key]})"
            rows.append([backend, c.label, f"{c.seconds * 1000:.1f}", str(c.statements),
                         str(c.commits), f"{c.changes:,}", f"{c.applied:,}", note])
    print(table(["backend", "sweep", "ms", "statements", "commits", "queue rows", "applied",
                 "target"], rows))
    return failures


def report_idle(idle: dict[str, list[IdleCpu]], args: argparse.Namespace) -> int:
    print(f"\n## Idle CPU, % of one core over {args.idle_seconds:g} s (single-worker gunicorn "
          "wsgi:app, default settings, after its first sweep; the worker holds the sweep)\n")
    rows = []
    failures = 0
    for backend, runs in idle.items():
        base = runs[0].worker
        for r in runs:
            ok = r.worker <= 1.0
            failures += not ok
            ratio = f"{r.worker / base:.2f}x" if base > 0 else "-"
            rows.append([backend, f"{r.trials:,}", f"{r.worker:.2f}", ratio, f"{r.master:.2f}",
                         verdict(ok)])
    print(table(["backend", "trials", "worker %", f"worker / {STUDY_TRIALS:,}", "master %",
                 "worker <= 1%"], rows))
    return failures


def report_passthrough(results: list[PassThrough], args: argparse.Namespace) -> int:
    print(f"\n## Pass-through, gunicorn, ours / bare dashboard (SQLite, {STUDY_TRIALS:,} trials; "
          f"{args.rounds} rounds over {args.generations} set(s) of fresh servers, "
          f"{'one server at a time' if args.one_at_a_time else 'both servers side by side'} "
          f"(the study detail: {args.cache_rounds} rounds, one at a time): median of the "
          f"per-round ratios, and their min-max; "
          f"slow = requests over {SLOW:g}x their leg's median, ours/bare)\n")
    rows = []
    failures = 0
    for r in results:
        thr_rounds = r.per_round(r.throughput_ratio)
        cpu_rounds = r.per_round(r.cpu_ratio)
        thr, cpu = statistics.median(thr_rounds), statistics.median(cpu_rounds)
        ok_thr, ok_cpu = thr >= 0.97, cpu <= 1.03
        if not r.endpoint.endswith("(A/A)"):  # the bench against itself: no target of ours
            failures += (not ok_thr) + (not ok_cpu)
        bare_rps = sum(x.requests for x in r.bare) / sum(x.wall for x in r.bare)
        bare_cpu = sum(x.cpu for x in r.bare) / sum(x.requests for x in r.bare)
        rows.append([
            r.endpoint, f"{sum(x.requests for x in r.ours):,}", f"{bare_rps:.0f}",
            f"{thr:.3f}x", spread(thr_rounds), verdict(ok_thr),
            f"{bare_cpu * 1e6:.0f}", f"{cpu:.3f}x", spread(cpu_rounds), verdict(ok_cpu),
            f"{sum(x.slow for x in r.ours)}/{sum(x.slow for x in r.bare)}",
        ])
    print(table(["endpoint", "requests each", "bare req/s", "throughput", "spread", ">= 0.97x",
                 "bare CPU us/req", "CPU/req", "spread", "<= 1.03x", "slow"], rows))
    return failures


def report_saves(saves: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> int:
    print(f"\n## Note save, in process (WSGI calls), ms: median over {args.save_rounds} "
          f"interleaved rounds of the median of {args.saves} saves per kind; ratios to the bare "
          "dashboard's plain save on a database without hitl-pruner, with the per-round "
          "min-max\n")
    rows = []
    failures = 0
    for backend, rounds in saves.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in SAVE_KINDS}
        prune = [r["hitl_prune"] / r["bare"] for r in rounds]
        plain = [r["hitl_plain"] / r["bare"] for r in rounds]
        ok_prune = med["hitl_prune"] / med["bare"] <= 1.2
        ok_plain = med["hitl_plain"] / med["bare"] <= 1.05
        failures += (not ok_prune) + (not ok_plain)
        rows.append([
            backend, f"{med['bare']:.2f}", f"{med['bare_trigger']:.2f}",
            f"{med['hitl_plain']:.2f}", f"{med['hitl_prune']:.2f}",
            f"{med['hitl_prune'] / med['bare']:.3f}x", spread(prune), verdict(ok_prune),
            f"{med['hitl_plain'] / med['bare']:.3f}x", spread(plain), verdict(ok_plain),
        ])
    print(table(["backend", "bare plain", "bare (trigger on)", "ours plain", "ours PRUNE",
                 "PRUNE / bare", "spread", "<= 1.2x", "plain / bare", "spread", "<= 1.05x"],
                rows))
    return failures


if __name__ == "__main__":
    sys.exit(main())
