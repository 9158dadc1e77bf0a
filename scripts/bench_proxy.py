"""Workers behind Optuna's gRPC storage proxy: trials/s with HumanInTheLoopPruner against the
bare pruner, and the database statements per second the wrapper adds.

One ``run_grpc_proxy_server`` process over a throwaway PostgreSQL database (where hitl-pruner is
installed, trigger included) serves every leg; it counts the SQL statements its engine sends.
A leg starts --workers N worker processes on a fresh study; each imports Optuna, connects, and
waits for a common start, then runs --trials trials of --steps steps (sleeping --step-seconds
per step, then ``trial.report`` and ``trial.should_prune``) with RandomSampler and the pruner
under test: bare ``NopPruner()`` (or ``MedianPruner()`` with --pruner median), or the same
wrapped in ``HumanInTheLoopPruner``. NopPruner is the default because it hides nothing: every
extra call the wrapper makes shows. Bare and wrapped legs alternate for --rounds rounds per
worker count; the medians are printed:

- trials/s: all the leg's trials over the time from the start to the last worker's end;
- statements/s: the proxy's SQL statements over the same time, and per trial;
- added/s per worker: (wrapped - bare) statements per trial x a worker's trials/s, wrapped;
- a projection to 1,000 workers at the largest count's per-worker pace (the database and the
  proxy then see 1,000 x that; see the README for what a proxy per group of workers does).

No hitl-pruner server runs: a server's own statements do not grow with the workers (its sweep
reads one queue; it writes only when a human acts).

    python scripts/bench_proxy.py [--workers 1,8,32] [--trials 10] [--steps 10]
        [--step-seconds 0.02] [--rounds 2] [--pruner nop|median]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

HOST = "127.0.0.1"

# The proxy, counting statements: one line with the running count, rewritten every 0.1 s.
PROXY_PROGRAM = """
import sys, threading, time, optuna, sqlalchemy as sa
storage = optuna.storages.RDBStorage(sys.argv[1])
count = [0]
def counted(*args): count[0] += 1
sa.event.listen(storage.engine, "before_cursor_execute", counted)
def report():
    while True:
        with open(sys.argv[4] + ".tmp", "w") as f:
            f.write(str(count[0]))
        __import__("os").replace(sys.argv[4] + ".tmp", sys.argv[4])
        time.sleep(0.1)
threading.Thread(target=report, daemon=True).start()
optuna.storages.run_grpc_proxy_server(storage, host=sys.argv[2], port=int(sys.argv[3]))
"""


def worker_main(argv: list[str]) -> None:
    mode, port, study_name, go, n_trials, steps, step_s, pruner_name = argv
    import optuna
    from optuna.storages import GrpcStorageProxy

    import hitl_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bare = optuna.pruners.NopPruner() if pruner_name == "nop" else optuna.pruners.MedianPruner()
    pruner = hitl_pruner.HumanInTheLoopPruner(bare) if mode == "wrapped" else bare
    storage = GrpcStorageProxy(host=HOST, port=int(port))
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                              sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        for step in range(int(steps)):
            time.sleep(float(step_s))
            trial.report(x + step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    study.optimize(objective, n_trials=int(n_trials))
    print(f"end {time.time()}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until the proxy on ``port`` accepts a gRPC connection; exits with its log if it dies or
    is not ready within ``timeout`` s.

    What GrpcStorageProxy.wait_server_ready does (a channel of its own, ready or not), done here
    on any Optuna: 4.2 has the proxy but not that method (4.3 added it, with close()).
    tests/processes.py has wait_proxy_ready() for the tests, which scripts do not import."""
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        ready = grpc.channel_ready_future(channel)
        try:
            while True:
                try:
                    ready.result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the gRPC proxy did not start:\n{log.read_text()}")
        finally:
            ready.cancel()


@contextlib.contextmanager
def proxy(url: str, tmp: Path) -> Iterator[tuple[int, Path]]:
    port, counter = free_port(), tmp / "statements"
    log = open(tmp / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", PROXY_PROGRAM, url, HOST, str(port),
                             str(counter)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc, tmp / "proxy.log", timeout=60)
        yield port, counter
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def statements(counter: Path) -> int:
    time.sleep(0.25)  # two rewrites of the count: the last statements are in it
    return int(counter.read_text())


def leg(url: str, port: int, counter: Path, tmp: Path, mode: str, n: int,
        args: argparse.Namespace, name: str) -> tuple[float, int, int]:
    """One leg; returns (seconds from start to last end, statements, trials)."""
    import optuna

    optuna.create_study(study_name=name, storage=url)
    go = tmp / f"go-{name}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, str(port), name, str(go),
             str(args.trials), str(args.steps), str(args.step_seconds), args.pruner],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"a worker did not start: {line}{p.communicate()[1]}")
    before = statements(counter)
    start = time.time()
    go.touch()
    ends = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"a worker failed:\n{err}")
        ends.append(float(out.split()[-1]))
    after = statements(counter)
    return max(ends) - start, after - before, n * args.trials


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,8,32")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pruner", choices=("nop", "median"), default="nop")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchdb import Unavailable
    from benchdb import database
    from benchdb import server_version
    import optuna
    from optuna.storages import RDBStorage

    from hitl_pruner.rdb import SqlStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        db = server_version("postgresql")
    except Unavailable as exc:
        print(f"PostgreSQL unavailable: {exc}")
        return 1
    print(f"# Workers through Optuna's gRPC proxy ({db}, Optuna {optuna.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()})")
    print(f"# {args.trials} trials x {args.steps} steps of {args.step_seconds} s per worker, "
          f"pruner {args.pruner}, {args.rounds} rounds, medians\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir, database("postgresql", Path(tmpdir)) as url:
        tmp = Path(tmpdir)
        storage = RDBStorage(url)
        SqlStore(storage).install()
        storage.engine.dispose()
        with proxy(url, tmp) as (port, counter):
            for n in counts:
                got: dict[str, list[tuple[float, int, int]]] = {"bare": [], "wrapped": []}
                for r in range(args.rounds):
                    for mode in ("bare", "wrapped") if r % 2 == 0 else ("wrapped", "bare"):
                        got[mode].append(leg(url, port, counter, tmp, mode, n, args,
                                             f"{mode}-{n}-{r}"))
                rows.append((n, got))
    print("| Workers | bare trials/s | wrapped trials/s | ratio | bare stmts/s | wrapped "
          "stmts/s | stmts/trial bare / wrapped | added stmts/s per worker |")
    print("|---|---|---|---|---|---|---|---|")
    per_worker_added = 0.0
    for n, got in rows:
        tps = {m: statistics.median(t / s for s, _, t in v) for m, v in got.items()}
        sps = {m: statistics.median(c / s for s, c, _ in v) for m, v in got.items()}
        spt = {m: statistics.median(c / t for _, c, t in v) for m, v in got.items()}
        per_worker_added = (spt["wrapped"] - spt["bare"]) * tps["wrapped"] / n
        print(f"| {n} | {tps['bare']:.1f} | {tps['wrapped']:.1f} | "
              f"{tps['wrapped'] / tps['bare']:.3f}x | {sps['bare']:.0f} | {sps['wrapped']:.0f} | "
              f"{spt['bare']:.1f} / {spt['wrapped']:.1f} | {per_worker_added:.2f} |")
    n_last, got = rows[-1]
    pace = statistics.median(t / s for s, _, t in got["wrapped"]) / n_last
    spt_w = statistics.median(c / t for _, c, t in got["wrapped"])
    print(f"\nProjection to 1,000 workers at {n_last} workers' pace ({pace:.2f} trials/s each): "
          f"{1000 * pace:.0f} trials/s, {1000 * pace * spt_w:.0f} statements/s in all, of which "
          f"the wrapper adds {1000 * per_worker_added:.0f}/s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
