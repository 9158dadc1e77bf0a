"""Cooperation through Optuna's storage API alone (issue 9, item 3): workers behind Optuna's gRPC
storage proxy over PostgreSQL, and workers on a journal (file, Redis), none with SQL of its own.

A human's PRUNE and FAIL, saved over HTTP, end exactly those trials as PRUNED and FAIL; every
worker (``study.optimize`` without ``catch=``) runs all its trials; each action has one audit
row, made when the worker ended the trial (how "worker"), not forced.

This file is also the worker program: ``python tests/test_grpc_proxy.py SPEC STUDY N_TRIALS
STEPS`` runs test_worker_processes.worker_main("wrapped", ...) on the storage SPEC names:
``grpc:HOST:PORT``, ``journal-file:PATH`` or ``journal-redis:PREFIX:URL``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
import uuid
import warnings

import optuna
from optuna.storages import BaseStorage

if TYPE_CHECKING:
    from optuna.storages import GrpcStorageProxy


def open_spec(spec: str) -> BaseStorage:
    kind, _, rest = spec.partition(":")
    if kind == "grpc":
        from optuna.storages import GrpcStorageProxy

        host, _, port = rest.rpartition(":")
        return GrpcStorageProxy(host=host, port=int(port))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "journal-file":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(rest))
        if kind == "journal-redis":
            from optuna.storages.journal import JournalRedisBackend

            prefix, _, url = rest.partition(":")
            return optuna.storages.JournalStorage(JournalRedisBackend(url, prefix=prefix))
    raise ValueError(spec)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker_processes import worker_main

    worker_main("wrapped", open_spec(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                int(sys.argv[4]))
    sys.exit(0)


# --- the tests -------------------------------------------------------------------------------

from backends import unavailable  # noqa: E402
from helpers import save  # noqa: E402
from optuna.storages import RDBStorage  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from processes import HOST  # noqa: E402
from processes import Server  # noqa: E402
from processes import child_env  # noqa: E402
from processes import close_proxy  # noqa: E402
from processes import free_port  # noqa: E402
from processes import gunicorn_server  # noqa: E402
from processes import wait_for  # noqa: E402
from processes import wait_proxy_ready  # noqa: E402
import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from test_worker_processes import STEPS  # noqa: E402
from test_worker_processes import Worker  # noqa: E402
from test_worker_processes import running_trial  # noqa: E402

import hitl_pruner  # noqa: E402
from hitl_pruner.audit import AuditEntry  # noqa: E402
from hitl_pruner.journal import ApiStore  # noqa: E402
from hitl_pruner.requests import COOPERATIVE_ATTR  # noqa: E402

pytestmark = pytest.mark.e2e

PROXY_PROGRAM = (
    "import sys, optuna\n"
    "optuna.storages.run_grpc_proxy_server(optuna.storages.get_storage(sys.argv[1]),"
    " host=sys.argv[2], port=int(sys.argv[3]))\n"
)
N_WORKERS = 2
N_TRIALS = 3
# A process's start-up (imports) is waited for while it lives; this bounds a hang.
START_UP = 300
Audit = Callable[[], list[tuple[int, str, str, str]]]


@contextlib.contextmanager
def grpc_proxy(url: str, tmp_path: Path) -> Iterator[str]:
    """A real ``run_grpc_proxy_server`` process over ``url``; yields the workers' SPEC."""
    from optuna.storages import GrpcStorageProxy

    port = free_port()
    log = tmp_path / "grpc-proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROXY_PROGRAM, url, HOST, str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
        )
    try:
        client = GrpcStorageProxy(host=HOST, port=port)
        try:
            # Start-up is importing Optuna and gRPC, which next to the suite's other processes
            # took over 30 s: wait as long as the process lives, and fail at once if it dies.
            deadline = time.monotonic() + START_UP
            while True:
                try:
                    wait_proxy_ready(client, timeout=5)
                    break
                except ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        state = "exited" if proc.poll() is not None else "did not start"
                        pytest.fail(f"the gRPC proxy {state}\n{log.read_text()}")
        finally:
            close_proxy(client)
        yield f"grpc:{HOST}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def workers(spec: str, study: str, tmp_path: Path, count: int = N_WORKERS,
            n_trials: int = N_TRIALS) -> Iterator[list[Worker]]:
    started = []
    try:
        for i in range(count):
            out, err = tmp_path / f"worker-{i}.out", tmp_path / f"worker-{i}.err"
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(
                    [sys.executable, __file__, spec, study, str(n_trials), str(STEPS)],
                    stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=child_env(),
                )
            started.append(Worker(proc, out, err))
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def started(procs: list[Worker], observer: BaseStorage, study_id: int) -> bool:
    """Whether the workers are past their imports: the study has a trial per worker (by count);
    fails at once if a worker exited before that."""
    if len(observer.get_all_trials(study_id, deepcopy=False)) >= len(procs):
        return True
    for w in procs:
        if w.proc.poll() is not None:
            pytest.fail(f"a worker exited with {w.proc.returncode}\n{w.err.read_text()}",
                        pytrace=False)
    return False


def human_prunes_and_fails(
    spec: str, observer: BaseStorage, study_id: int, put_note: Callable[..., Any],
    audit: Audit, tmp_path: Path, servers: list[Server],
) -> None:
    """The scenario every storage goes through; ``observer`` is the test's own view."""
    study_name = observer.get_study_name_from_id(study_id)
    with workers(spec, study_name, tmp_path) as procs:
        # The workers' interpreters first import Optuna: on 2 CPUs next to the 32-worker test's
        # interpreters that took 45 s (matrix, Optuna 4.2), more than running_trial's 30 s for
        # finding a trial mid-run. Interpreter start is not under test: wait for it apart.
        wait_for(lambda: started(procs, observer, study_id), timeout=300,
                 what="a trial per worker", servers=servers, interval=0.2)
        taken: set[int] = set()
        pruned = running_trial(observer, study_id, taken, 2, servers)  # type: ignore[arg-type]
        outcome = put_note(study_id, pruned._trial_id, 1, "loss diverges: PRUNE").outcome
        assert (outcome["action"], outcome["to"]) == ("requested", "PRUNED"), outcome
        failed = running_trial(observer, study_id, taken, 2, servers)  # type: ignore[arg-type]
        outcome = put_note(study_id, failed._trial_id, 1, "bogus split: FAIL").outcome
        assert (outcome["action"], outcome["to"]) == ("requested", "FAIL"), outcome

        for w in procs:
            code, ran, err = w.finish(timeout=120)
            assert code == 0 and "Traceback" not in err, err
            assert len(ran) == N_TRIALS, err

    trials = {t._trial_id: t for t in observer.get_all_trials(study_id)}
    assert len(trials) == N_WORKERS * N_TRIALS
    assert trials[pruned._trial_id].state is TrialState.PRUNED
    steps = trials[pruned._trial_id].intermediate_values
    assert 2 <= len(steps) < STEPS, "the worker ended it on request, well before its last step"
    assert trials[failed._trial_id].state is TrialState.FAIL
    assert 2 <= len(trials[failed._trial_id].intermediate_values) < STEPS
    assert trials[failed._trial_id].values is None
    for tid in taken:
        assert trials[tid].system_attrs[COOPERATIVE_ATTR] is True
    others = [t for tid, t in trials.items() if tid not in taken]
    assert all(t.state is TrialState.COMPLETE for t in others)

    rows = wait_for(lambda: len(audit()) >= 2 and audit(), what="two audit rows",
                    servers=servers)
    time.sleep(1.0)  # a second sweep or a duplicate would add a row by now
    assert sorted(audit()) == sorted(rows) == sorted([
        (pruned._trial_id, "PRUNED", "note-save", "worker"),
        (failed._trial_id, "FAIL", "note-save", "worker"),
    ])


def test_workers_behind_the_grpc_proxy_end_a_pruned_and_a_failed_trial_and_carry_on(
    postgres_url: str, tmp_path: Path
) -> None:
    """Workers reach PostgreSQL only through Optuna's gRPC proxy: the request reaches them as a
    trial system attr; FAIL ends FAIL through the database's trigger."""
    study = optuna.create_study(study_name="proxied", storage=postgres_url)
    observer = RDBStorage(postgres_url)

    def audit() -> list[tuple[int, str, str, str]]:
        with observer.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(  # type: ignore[misc]
                "SELECT trial_id, to_state, source, how FROM hitl_audit"
            ))]

    with gunicorn_server(postgres_url, tmp_path, env={"HITL_GRACE": "60"},
                         interval=0.2) as server, grpc_proxy(postgres_url, tmp_path) as spec:
        human_prunes_and_fails(spec, observer, study._study_id, server.put_note, audit,
                               tmp_path, [server])
        with observer.engine.connect() as conn:
            beats = conn.execute(sa.text(
                "SELECT value_json FROM study_system_attributes WHERE key LIKE 'hitl:worker:%'"
            )).scalars().all()
            sql_beats = conn.execute(sa.text("SELECT count(*) FROM hitl_workers")).scalar()
        assert len(beats) == N_WORKERS, "each worker beat through the proxy"
        assert beats == ["null"] * N_WORKERS, "and said so when it exited"
        assert sql_beats == 0, "no worker wrote SQL of its own"


def journal_audit(storage: BaseStorage) -> Audit:
    def audit() -> list[tuple[int, str, str, str]]:
        entries: list[AuditEntry] = ApiStore(storage).audit()
        return [(e.trial_id, e.to_state.name, e.source, e.how) for e in entries]

    return audit


def test_workers_on_a_journal_file_end_a_pruned_and_a_failed_trial_and_carry_on(
    tmp_path: Path,
) -> None:
    """A journal has no trigger and never changes a finished trial: the worker writes FAIL
    itself where Optuna asks for PRUNED (fail_tell.py)."""
    path = tmp_path / "journal.log"
    spec = f"journal-file:{path}"
    observer = open_spec(spec)
    study = optuna.create_study(study_name="journalled", storage=observer)
    with gunicorn_server(str(path), tmp_path, env={"HITL_GRACE": "60"}, interval=0.2) as server:
        human_prunes_and_fails(spec, observer, study._study_id, server.put_note,
                               journal_audit(observer), tmp_path, [server])


@pytest.fixture
def redis_spec() -> Iterator[str]:
    import redis

    url = os.environ.get("HITL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"hitl-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        client.close()
        unavailable(f"Redis at {url} ({exc})")
    try:
        yield f"journal-redis:{prefix}:{url}"
    finally:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_workers_on_a_redis_journal_end_a_pruned_and_a_failed_trial_and_carry_on(
    redis_spec: str, tmp_path: Path
) -> None:
    """The server is ``hitl_pruner.wsgi(JournalStorage(JournalRedisBackend(...)))`` in this
    process, sweeping in its background thread."""
    observer = open_spec(redis_spec)
    study = optuna.create_study(study_name="redis", storage=observer)
    app = hitl_pruner.wsgi(open_spec(redis_spec), grace=60, interval=0.2)
    try:
        human_prunes_and_fails(
            redis_spec, observer, study._study_id,
            lambda sid, tid, version, body: save(app, sid, tid, version, body),
            journal_audit(observer), tmp_path, [],
        )
    finally:
        app.stop_background()


# --- scale (issue 9, item 4) -----------------------------------------------------------------

SCALE_WORKERS = 32
SCALE_TRIALS = 2


def named(url: str, application_name: str) -> str:
    """``url`` whose PostgreSQL connections carry ``application_name`` (pg_stat_activity)."""
    return sa.make_url(url).update_query_dict(
        {"application_name": application_name}
    ).render_as_string(hide_password=False)


class ConnectionWatch:
    """Samples pg_stat_activity for the test's database: who is connected, and how many."""

    def __init__(self, url: str) -> None:
        self._engine = sa.create_engine(named(url, "hitl-test-watch"))
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = sa.text(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' GROUP BY 1"
        )
        while not self._stop.wait(0.2):
            with self._engine.connect() as conn:
                for name, count in conn.execute(query):
                    self.peak[name] = max(self.peak.get(name, 0), count)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()


# In the Chromium lane of test_browser_live (tests/conftest.py), one after the other: 32
# interpreters starting at once take both CPUs for a while, and a page's "within a second"
# next to them would measure that instead of hitl-pruner.
@pytest.mark.xdist_group("chromium-1")
def test_32_workers_behind_the_grpc_proxy_survive_humans_pruning_and_failing(
    postgres_url: str, tmp_path: Path
) -> None:
    """32 worker processes reach PostgreSQL only through one gRPC proxy; humans PRUNE and FAIL
    trials over HTTP meanwhile. Every worker runs all its trials; each action is applied once,
    by its worker, with its audit row; the database sees the proxy and the server only."""
    observer = RDBStorage(named(postgres_url, "hitl-test-observer"))
    study = optuna.create_study(study_name="scale", storage=observer)
    started = time.monotonic()
    with ConnectionWatch(postgres_url) as watch, \
            gunicorn_server(named(postgres_url, "hitl-test-server"), tmp_path,
                            env={"HITL_GRACE": "120"}, interval=0.5) as server, \
            grpc_proxy(named(postgres_url, "hitl-test-proxy"), tmp_path) as spec, \
            workers(spec, "scale", tmp_path, SCALE_WORKERS, SCALE_TRIALS) as procs:
        # 32 interpreters importing Optuna take a while on a small machine.
        wait_for(lambda: len(observer.get_all_trials(
            study._study_id, deepcopy=False, states=(TrialState.RUNNING,))) >= 4,
            timeout=300, what="workers running trials", servers=[server], interval=0.5)
        taken: set[int] = set()
        asked = []
        for body, target in (("PRUNE", "PRUNED"), ("FAIL", "FAIL")) * 2:
            trial = running_trial(observer, study._study_id, taken, 2, [server])
            outcome = server.put_note(study._study_id, trial._trial_id, 1, body).outcome
            assert (outcome["action"], outcome["to"]) == ("requested", target), outcome
            asked.append((trial._trial_id, target))
        for w in procs:
            code, ran, err = w.finish(timeout=600)
            assert code == 0 and "Traceback" not in err, err
            assert len(ran) == SCALE_TRIALS, err
        ran_for = time.monotonic() - started

        def audit() -> list[tuple[int, str, str]]:
            with observer.engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(  # type: ignore[misc]
                    "SELECT trial_id, to_state, how FROM hitl_audit"
                ))]

        rows = wait_for(lambda: len(audit()) >= len(asked) and audit(),
                        what="an audit row per action", servers=[server])
        time.sleep(1.5)  # a duplicate would be written by the next sweeps
        assert sorted(audit()) == sorted(rows) == sorted(
            (tid, target, "worker") for tid, target in asked
        )

    trials = {t._trial_id: t for t in observer.get_all_trials(study._study_id)}
    assert len(trials) == SCALE_WORKERS * SCALE_TRIALS
    assert {tid: trials[tid].state.name for tid, _ in asked} == dict(asked)
    assert all(t.state is TrialState.COMPLETE for tid, t in trials.items() if tid not in taken)
    names = set(watch.peak)
    assert names <= {"hitl-test-proxy", "hitl-test-server", "hitl-test-observer"}, watch.peak
    assert "hitl-test-proxy" in names, watch.peak
    print(f"\n32 workers x {SCALE_TRIALS} trials through the gRPC proxy: {ran_for:.1f} s; "
          f"peak PostgreSQL connections by application: {watch.peak}")


# --- wait_proxy_ready and close_proxy (tests/processes.py) on every Optuna with a proxy ---------


def established_to(port: int) -> int:
    """This machine's ESTABLISHED TCP connections whose far end is ``port`` (Linux /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                remote, state = line.split()[2:4]
                count += state == "01" and int(remote.rpartition(":")[2], 16) == port
    return count


def new_proxy(port: int) -> GrpcStorageProxy:
    from optuna.storages import GrpcStorageProxy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return GrpcStorageProxy(host=HOST, port=port)


@contextlib.contextmanager
def proxy_server() -> Iterator[int]:
    """Optuna's gRPC proxy server over InMemoryStorage in this process; yields its port."""
    from optuna.storages import InMemoryStorage
    from optuna.storages._grpc.server import make_server

    port = free_port()
    server = make_server(InMemoryStorage(), HOST, port)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def test_close_proxy_ends_the_proxys_connection() -> None:
    """close_proxy() ends the connection on Optuna 4.2 too, whose proxy has no close(): a worker
    or test that closes its proxy leaves no connection to the proxy server behind."""
    with proxy_server() as port:
        proxy = new_proxy(port)
        wait_proxy_ready(proxy, timeout=30)
        assert proxy.get_all_studies() == []
        # wait_proxy_ready's own channel (4.3's included) is closed by now, maybe not yet gone.
        wait_for(lambda: established_to(port) == 1, timeout=5, what="the proxy's connection")
        close_proxy(proxy)
        wait_for(lambda: established_to(port) == 0, timeout=5, what="no connection")


def test_wait_proxy_ready_raises_connection_error_when_no_proxy_answers() -> None:
    """On Optuna 4.2 as on 4.3+: ConnectionError, which grpc_proxy() turns into a failure that
    shows the proxy's log."""
    proxy = new_proxy(free_port())
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        wait_proxy_ready(proxy, timeout=0.5)
    assert time.monotonic() - started < 10
    close_proxy(proxy)
