"""``hitl_pruner.wsgi(storage, artifact_store=None, *, llm_provider=None, **options)``: the
library API shaped like ``optuna_dashboard.wsgi``, on storage objects and URLs, with the
artifact stores people use (a directory, S3 through a real S3-compatible server), and with
its options checked."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import subprocess
import sys
import threading
from typing import Any
from typing import Iterator
import urllib.request
import uuid
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.simple_server import make_server

from backends import database
from backends import unavailable
from helpers import audit_rows
from helpers import call
from helpers import make_study
from helpers import save
import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts import upload_artifact
from optuna.storages import BaseStorage
from optuna.storages import InMemoryStorage
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import optuna_dashboard
import pytest

import hitl_pruner
from hitl_pruner import ConfigError
from hitl_pruner import dashboard
from hitl_pruner import lock

ROOT = Path(__file__).resolve().parent.parent


def running_and_done(storage: BaseStorage) -> tuple[optuna.Study, int, int]:
    """A study with one COMPLETE trial and one RUNNING trial: (study, running id, done id)."""
    study = optuna.create_study(storage=storage, study_name=f"s-{uuid.uuid4().hex[:6]}")
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    return study, running._trial_id, done._trial_id


# --- the options -----------------------------------------------------------------------------


def test_every_public_name_imports_from_the_package() -> None:
    """hitl_pruner loads its names on first use (its __getattr__): each name of __all__ must
    resolve, to the object its own module defines, and an unknown name is an AttributeError."""
    for name in hitl_pruner.__all__:
        value = getattr(hitl_pruner, name)
        assert getattr(sys.modules[value.__module__], name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        hitl_pruner.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    ("option", "said"),
    [
        pytest.param("intervall", "did you mean 'interval'", id="typo"),
        pytest.param("prune_patern", "did you mean 'prune_pattern'", id="typo-pattern"),
        pytest.param("study", "studies=[...]", id="the-cli-name"),
        pytest.param("artifact_dir", "artifact_store=optuna.artifacts.FileSystemArtifactStore",
                     id="a-server-setting"),
        pytest.param("port", "your WSGI server listens", id="a-listening-setting"),
        pytest.param("colour", "its options: ", id="nothing-close"),
    ],
)
def test_an_unknown_option_is_a_type_error_naming_it_and_what_to_give(
    option: str, said: str
) -> None:
    with pytest.raises(TypeError) as raised:
        hitl_pruner.wsgi(InMemoryStorage(), **{option: 1})
    assert repr(option) in str(raised.value)
    assert said in str(raised.value)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        pytest.param({"interval": 0}, "more than 0", id="interval-zero"),
        pytest.param({"interval": "10"}, "give a number of seconds", id="interval-string"),
        pytest.param({"interval": True}, "give a number of seconds", id="interval-bool"),
        pytest.param({"grace": -1}, "at least 0", id="grace-negative"),
        pytest.param({"studies": "a,b"}, "give a list of strings", id="studies-string"),
        pytest.param({"allowed_users": [""]}, "is not a name", id="allowed-users-empty-name"),
        pytest.param({"prune_pattern": "("}, "prune_pattern=", id="pattern-bad-regex"),
        pytest.param({"dry_run": "yes"}, "give True or False", id="dry-run-string"),
        pytest.param({"retroactive": 0}, "give True or False", id="retroactive-int"),
        pytest.param({"basic_auth": ["alice:not-a-hash"]}, "hash_password", id="basic-auth-hash"),
        pytest.param({"basic_auth": "alice:x"}, "give {'alice': hash}", id="basic-auth-string"),
        pytest.param({"user_header": "X Remote User"}, "give e.g. X-Remote-User",
                     id="user-header"),
        pytest.param({"forwarded_allow_ips": "10.0.0.300"}, "give addresses or networks",
                     id="forwarded-ips"),
        pytest.param({"allowed_hosts": ["https://x.example"]}, "optuna.example.org",
                     id="allowed-hosts-url"),
        pytest.param({"trusted_origins": ["tools.example"]}, "https://tools.example.org",
                     id="trusted-origins-host"),
        pytest.param({"root_path": "/a/../b"}, "give a path like '/optuna'", id="root-path"),
        pytest.param({"autostart": "no"}, "give True or False", id="autostart"),
        pytest.param({"basic_auth": {"alice": hitl_pruner.auth.hash_password("pw")},
                      "user_header": "X-Remote-User"}, "exclude each other", id="both-auths"),
    ],
)
def test_a_bad_value_is_a_config_error_saying_how_to_fix_it(
    options: dict[str, Any], said: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        hitl_pruner.wsgi(InMemoryStorage(), **options)
    assert said in str(raised.value)
    name = next(iter(options))
    assert name in str(raised.value) or "basic_auth and user_header" in str(raised.value)


def test_options_are_the_settings_the_stack_applies() -> None:
    storage = InMemoryStorage()
    study, running, _ = running_and_done(storage)
    app = hitl_pruner.wsgi(storage, autostart=False, dry_run=True, interval=2.5, grace=0,
                           studies=[study.study_name], allowed_users=None)
    assert app.sweeper.interval == 2.5 and app.applier.dry_run
    r = save(app, study._study_id, running, 1, "PRUNE")
    assert r.outcome["action"] == "dry run"
    assert storage.get_trial(running).state is TrialState.RUNNING


def test_it_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core takes arguments; only the adapters read HITL_* (a wrong one would raise)."""
    monkeypatch.setenv("HITL_DRY_RUN", "1")
    monkeypatch.setenv("HITL_INTERVAL", "not a number")
    monkeypatch.setenv("HITL_STUDY", "some-other-study")
    storage = InMemoryStorage()
    study, running, _ = running_and_done(storage)
    app = hitl_pruner.wsgi(storage, autostart=False)
    assert save(app, study._study_id, running, 1, "PRUNE").outcome["action"] == "applied"
    assert storage.get_trial(running).state is TrialState.PRUNED


def test_wsgi_is_the_function_and_the_environment_adapter_serves_gunicorn_wsgi_app(
    tmp_path: Path,
) -> None:
    """Regression: hitl_pruner/wsgi.py (the env adapter) would shadow the function once
    imported; it is hitl_pruner/from_env.py now, which the root wsgi.py imports."""
    env = {**os.environ, "HITL_STORAGE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", "import wsgi, hitl_pruner; "
         "print(callable(hitl_pruner.wsgi) and hitl_pruner.wsgi.__module__, "
         "type(wsgi.app).__name__, 'wsgi' in hitl_pruner.__all__)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hitl_pruner.embed", "ProxyMiddleware", "True"]


# --- what optuna_dashboard.wsgi's callers rely on --------------------------------------------


def test_every_attribute_of_the_dashboards_app_is_reachable_through_the_stack() -> None:
    storage = InMemoryStorage()
    bare = optuna_dashboard.wsgi(storage)
    app = hitl_pruner.wsgi(storage, autostart=False,
                           basic_auth={"alice": hitl_pruner.auth.hash_password("pw")},
                           root_path="/optuna")
    public = [name for name in dir(bare) if not name.startswith("__")]
    assert {"route", "get_url", "mount", "_inmemory_cache", "routes", "config"} <= set(public)
    assert [name for name in public if not hasattr(app, name)] == []
    # No layer of ours has a name of the dashboard's for something else of its own.
    layer: Any = app
    while type(layer).__name__ != "Bottle":
        own = set(vars(layer)) | {n for n in dir(type(layer)) if not n.startswith("__")}
        assert own & set(public) == set(), type(layer).__name__
        layer = vars(layer).get("application") or vars(layer)["app"]
    assert app._inmemory_cache is layer._inmemory_cache


def test_a_route_added_through_the_stack_is_served_by_it() -> None:
    app = hitl_pruner.wsgi(InMemoryStorage(), autostart=False)
    app.route("/extra")(lambda: "added by the embedding app")
    r = call(app, "GET", "/extra")
    assert (r.status, r.body) == (200, b"added by the embedding app")


def test_an_llm_provider_reaches_the_dashboard() -> None:
    """The dashboard lets inline scripts run (its CSP) only when it has an LLM provider."""

    class Provider:
        def call(self, prompt: str) -> str:
            return ""

    plain = call(hitl_pruner.wsgi(InMemoryStorage(), autostart=False), "GET", "/dashboard")
    assert "'unsafe-inline'" not in script_src(plain.headers["Content-Security-Policy"])
    if dashboard.RELEASE is dashboard.RELEASES["0.19"]:
        # optuna-dashboard 0.19 has no LLM features: refused at once, saying so.
        with pytest.raises(TypeError, match="installed here has no LLM support"):
            hitl_pruner.wsgi(InMemoryStorage(), autostart=False, llm_provider=Provider())
        return
    with_llm = call(
        hitl_pruner.wsgi(InMemoryStorage(), autostart=False, llm_provider=Provider()),
        "GET", "/dashboard",
    )
    assert "'unsafe-inline'" in script_src(with_llm.headers["Content-Security-Policy"])


def script_src(policy: str) -> str:
    [directive] = [d for d in policy.split(";") if d.strip().startswith("script-src")]
    return directive


# --- storages --------------------------------------------------------------------------------


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` on wsgiref (as in a notebook) on a free loopback port: its base URL."""

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def put_note(base: str, study_id: int, trial_id: int, version: int, body: str) -> Any:
    request = urllib.request.Request(
        f"{base}/api/studies/{study_id}/{trial_id}/note", method="PUT",
        data=f'{{"version": {version}, "body": "{body}"}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers["X-Hitl-Outcome"]


def test_in_memory_storage_a_prune_note_over_http_ends_the_running_trial() -> None:
    storage = InMemoryStorage()
    study, running, _ = running_and_done(storage)
    app = hitl_pruner.wsgi(storage)
    try:
        with served(app) as base:
            status, outcome = put_note(base, study._study_id, running, 1, "PRUNE")
        assert status == 204 and '"applied"' in outcome
        assert storage.get_trial(running).state is TrialState.PRUNED
        [entry] = app.store.audit()
        assert (entry.trial_id, entry.to_state) == (running, TrialState.PRUNED)
        # The sweep of a storage only this process sees takes a lock only this process has.
        assert isinstance(app.sweeper.lock, lock.LocalLock)
    finally:
        app.stop_background()


def test_in_memory_storage_refuses_to_relabel_a_finished_trial_saying_why() -> None:
    storage = InMemoryStorage()
    study, _, done = running_and_done(storage)
    app = hitl_pruner.wsgi(storage, autostart=False)
    r = save(app, study._study_id, done, 1, "FAIL")
    assert r.outcome["action"] == "refused"
    assert "cannot change a finished (COMPLETE) trial" in r.outcome["reason"]
    assert "InMemoryStorage refuses it too" in r.outcome["reason"]
    assert "use an RDB storage" in r.outcome["reason"]
    assert storage.get_trial(done).state is TrialState.COMPLETE


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_rdb_storage_object_ends_running_trials_and_relabels_finished_ones(
    backend: str, tmp_path: Path
) -> None:
    with database(backend, tmp_path) as url:
        study, ids = make_study(url)
        storage = RDBStorage(url)
        app = hitl_pruner.wsgi(storage, autostart=False)
        try:
            assert save(app, study._study_id, ids["running"], 1, "PRUNE").outcome["action"] == (
                "applied"
            )
            assert save(app, study._study_id, ids["complete"], 1, "FAIL").outcome["action"] == (
                "applied"
            )
            assert storage.get_trial(ids["running"]).state is TrialState.PRUNED
            assert storage.get_trial(ids["complete"]).state is TrialState.FAIL
            assert [(r.trial_id, r.to_state) for r in audit_rows(url)] == [
                (ids["running"], "PRUNED"), (ids["complete"], "FAIL"),
            ]
            assert isinstance(app.sweeper.lock, (lock.FileLock, lock.PostgresLock))
        finally:
            storage.engine.dispose()


def test_a_studys_own_cached_storage_is_served_uncached_and_relabels(tmp_path: Path) -> None:
    """``study._storage`` (Optuna's cache of finished trials over the RDB) works as the RDB."""
    with database("sqlite", tmp_path) as url:
        study, ids = make_study(url)
        cached = optuna.load_study(study_name=study.study_name, storage=url)._storage
        assert not isinstance(cached, RDBStorage)  # Optuna's _CachedStorage around it
        app = hitl_pruner.wsgi(cached, autostart=False)
        assert save(app, study._study_id, ids["complete"], 1, "FAIL").outcome["action"] == (
            "applied"
        )
        assert RDBStorage(url).get_trial(ids["complete"]).state is TrialState.FAIL


def test_a_storage_url_is_opened_as_optuna_dashboard_opens_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    study, ids = make_study(url)
    app = hitl_pruner.wsgi(url, autostart=False)
    assert save(app, study._study_id, ids["running"], 1, "PRUNE").outcome["action"] == "applied"
    app.store.engine.dispose()
    # A journal file's path is a journal storage; an SQLite file's path is refused, in
    # optuna-dashboard's words.
    journal = tmp_path / "journal.log"
    jstudy, running, _ = running_and_done(JournalStorage(JournalFileBackend(str(journal))))
    japp = hitl_pruner.wsgi(str(journal), autostart=False)
    assert save(japp, jstudy._study_id, running, 1, "FAIL").outcome["action"] == "applied"
    with pytest.raises(ConfigError, match="Please specify 'sqlite:///"):
        hitl_pruner.wsgi(str(tmp_path / "u.db"))


def test_a_journal_file_storage_object_sweeps_under_the_same_file_lock_as_its_path(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "journal.log")
    storage = JournalStorage(JournalFileBackend(path))
    running_and_done(storage)
    by_object = hitl_pruner.wsgi(storage, autostart=False)
    by_path = hitl_pruner.create_app(hitl_pruner.Settings(storage_url=path), autostart=False)
    lock_file = Path(path + ".hitl-sweep.lock")
    assert by_object.sweeper.lock.path == by_path.sweeper.lock.path == lock_file
    assert by_object.sweeper.lock.try_acquire()
    try:
        assert not by_path.sweeper.lock.try_acquire()
    finally:
        by_object.sweeper.lock.release()


def test_a_redis_journal_storage_object_ends_running_trials_and_refuses_relabels() -> None:
    from optuna.storages.journal import JournalRedisBackend
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
        with pytest.warns(optuna.exceptions.ExperimentalWarning):
            storage = JournalStorage(JournalRedisBackend(url, prefix=prefix))
        study, running, done = running_and_done(storage)
        app = hitl_pruner.wsgi(storage, autostart=False)
        assert save(app, study._study_id, running, 1, "PRUNE").outcome["action"] == "applied"
        refused = save(app, study._study_id, done, 1, "FAIL").outcome
        assert refused["action"] == "refused" and "append-only" in refused["reason"]
        with pytest.warns(optuna.exceptions.ExperimentalWarning):
            fresh = JournalStorage(JournalRedisBackend(url, prefix=prefix))
        assert fresh.get_trial(running).state is TrialState.PRUNED
        assert fresh.get_trial(done).state is TrialState.COMPLETE
    finally:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


# --- artifact stores -------------------------------------------------------------------------


def artifact_of(storage: BaseStorage, store: Any, tmp_path: Path) -> tuple[str, bytes]:
    """A trial's artifact uploaded to ``store``: the dashboard's download path, its bytes."""
    study, running, _ = running_and_done(storage)
    payload = b"weights of trial 1\n" + uuid.uuid4().bytes
    file = tmp_path / "model.bin"
    file.write_bytes(payload)
    trial = optuna.Trial(study, running)
    artifact_id = upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=trial)
    return f"/artifacts/{study._study_id}/{running}/{artifact_id}", payload


def test_a_file_system_artifact_is_downloaded_through_the_stack(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    storage = InMemoryStorage()
    path, payload = artifact_of(storage, store, tmp_path)
    app = hitl_pruner.wsgi(storage, store, autostart=False)
    r = call(app, "GET", path)
    assert (r.status, r.body) == (200, payload)


@pytest.fixture
def s3_client() -> Iterator[Any]:
    """A boto3 S3 client of moto's S3-compatible server, on a free loopback port, with a
    bucket; the server runs in a thread of its own and speaks HTTP like S3."""
    # In the test extra (pyproject.toml): a missing one is an error, never a skip.
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    try:
        client.create_bucket(Bucket="artifacts")
        yield client
    finally:
        client.close()
        server.stop()
        server._server.server_close()


def test_an_s3_artifact_is_downloaded_through_the_stack(s3_client: Any, tmp_path: Path) -> None:
    from optuna.artifacts import Boto3ArtifactStore

    store = Boto3ArtifactStore("artifacts", client=s3_client)
    url = f"sqlite:///{tmp_path / 's3.db'}"
    storage = RDBStorage(url)
    try:
        path, payload = artifact_of(storage, store, tmp_path)
        assert s3_client.list_objects_v2(Bucket="artifacts")["KeyCount"] == 1
        app = hitl_pruner.wsgi(storage, store, autostart=False)
        r = call(app, "GET", path)
        assert (r.status, r.body) == (200, payload)
        # The trial page lists it: the dashboard's API names the artifact.
        study_id = path.split("/")[2]
        detail = call(app, "GET", f"/api/studies/{study_id}", environ={"QUERY_STRING": "after=0"})
        names = [a["filename"] for t in detail.json()["trials"] for a in t["artifacts"]]
        assert names == ["model.bin"]
    finally:
        storage.engine.dispose()


# --- sub-paths -------------------------------------------------------------------------------


def test_root_path_serves_the_dashboard_under_it() -> None:
    app = hitl_pruner.wsgi(InMemoryStorage(), autostart=False, root_path="/optuna/")
    page = call(app, "GET", "/optuna/dashboard")
    assert page.status == 200 and b'src="/optuna/static/bundle.js"' in page.body
    assert app.root_path == "/optuna"


def test_mounted_inside_another_wsgi_app_it_serves_under_the_mount_point() -> None:
    storage = InMemoryStorage()
    study, running, _ = running_and_done(storage)
    dashboard = hitl_pruner.wsgi(storage, autostart=False)

    def outer(environ: dict[str, Any], start_response: Any) -> Any:
        # What a dispatcher (werkzeug's DispatcherMiddleware ...) does for a mount point.
        path = environ["PATH_INFO"]
        if path.startswith("/optuna/"):
            environ = {**environ, "SCRIPT_NAME": "/optuna", "PATH_INFO": path[len("/optuna"):]}
            return dashboard(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the host app"]

    assert call(outer, "GET", "/").body == b"the host app"
    page = call(outer, "GET", "/optuna/dashboard")
    assert page.status == 200 and b'src="/optuna/static/bundle.js"' in page.body
    r = save(outer, study._study_id, running, 1, "PRUNE")
    assert r.outcome is None  # the path is the mount point's: not the dashboard's
    r = call(outer, "PUT", f"/optuna/api/studies/{study._study_id}/{running}/note",
             {"version": 1, "body": "PRUNE"})
    assert r.outcome["action"] == "applied"
    assert storage.get_trial(running).state is TrialState.PRUNED

