"""Builds the served stack from a storage object and Settings: dashboard, applier, sweep,
middleware (``build_stack``); ``create_app`` opens the storage from the Settings' URL first."""

from __future__ import annotations

import logging
import time
from typing import Any
from typing import Callable

from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import sqlalchemy as sa

from . import dashboard
from . import lock
from . import wake
from .applier import Applier
from .audit import AuditEntry
from .auth import AuthMiddleware
from .auth import Refusals
from .commands import CommandParser
from .config import ConfigError
from .config import Settings
from .first_start import ExistingNotes
from .health import Health
from .journal import ApiStore
from .live import AuditWatcher
from .live import feed_for
from .middleware import HitlMiddleware
from .notify import notifier_for
from .origin import CrossOriginGuard
from .outage import DatabaseState
from .outage import OutageMiddleware
from .rdb import InstallError
from .rdb import SqlStore
from .sweep import Sweeper
from .ui import UiMiddleware

logger = logging.getLogger("hitl_pruner")

# Workers that start together on a new database race to create Optuna's tables.
OPEN_ATTEMPTS = 5


def open_storage(settings: Settings) -> BaseStorage:
    url = settings.url
    if url is None:
        return JournalStorage(JournalFileBackend(settings.storage_url))
    engine_kwargs = {"connect_args": settings.connect_args()} if settings.cert_path else {}
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            return RDBStorage(
                url.render_as_string(hide_password=False),
                # No pool_pre_ping: it costs a round trip per checkout, as much as our whole
                # check on PostgreSQL. A dropped connection fails one request and leaves the
                # pool; the sweep retries. (Optuna turns it on for MySQL itself.)
                engine_kwargs=engine_kwargs,
            )
        except sa.exc.DBAPIError as exc:
            if attempt < OPEN_ATTEMPTS and _created_meanwhile(exc):
                # Workers starting together on a new database all create Optuna's tables.
                time.sleep(0.1 * attempt)
                continue
            first_line = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise ConfigError(
                f"cannot open the storage {settings.display_url}: "
                f"{first_line}{_tls_hint(first_line)}"
            ) from None
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"cannot use the storage URL {settings.display_url}: {cause}; the drivers "
                "installed are postgresql+psycopg2:// and mysql+pymysql://"
            ) from None
    raise AssertionError("unreachable")


def _created_meanwhile(exc: sa.exc.DBAPIError) -> bool:
    """Whether another process was creating Optuna's tables at the same moment."""
    text = str(exc.orig).lower()
    return isinstance(exc, sa.exc.IntegrityError) or "already exists" in text


def _pinger(engine: sa.Engine) -> Callable[[], object]:
    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    return ping


def _tls_hint(error: str) -> str:
    """How to fix a certificate the driver could not verify (the driver's words, lower-cased)."""
    error = error.lower()
    if "certificate verify failed" in error or "unable to get local issuer" in error:
        return "; is --cert-path the CA that signed the database server's certificate?"
    if "does not match host name" in error or "hostname mismatch" in error:
        return "; connect with a host name the certificate names (--db-host or the URL's host)"
    return ""


def _browsers(settings: Settings) -> dict[str, tuple[str, ...]]:
    return {
        "allowed_hosts": settings.allowed_hosts,
        "trusted_origins": settings.trusted_origins,
    }


def open_store(storage: BaseStorage) -> SqlStore | ApiStore:
    """Our view of the storage, our tables and triggers installed on an RDB one."""
    if not isinstance(storage, RDBStorage):
        logger.warning(
            "%s: RUNNING and WAITING trials can be ended, but finished trials cannot be "
            "relabelled (Optuna changes a finished trial on an RDB storage only)",
            type(storage).__name__,
        )
        return ApiStore(storage)
    store = SqlStore(storage)
    try:
        store.install()
    except InstallError as exc:
        raise ConfigError(str(exc)) from None
    return store


def sweep_lock_for(storage: BaseStorage) -> lock.SweepLock:
    """One sweep at a time across processes and servers on this storage (lock.py)."""
    if isinstance(storage, RDBStorage):
        return lock.for_engine(storage.engine)
    backend = getattr(storage, "_backend", None) if isinstance(storage, JournalStorage) else None
    if isinstance(backend, JournalFileBackend):
        # The same file as `HITL_STORAGE_URL=path` locks: processes given the storage object
        # and processes given its path take turns. (Optuna keeps the path in a private field.)
        return lock.for_journal(backend._file_path)
    # InMemoryStorage lives in this process alone: its own lock is the whole story. A Redis
    # journal (or any other storage) offers no lock we could share with other servers, so
    # each serving process sweeps; a second sweep applying the same note loses the race, as
    # Optuna refuses to change a trial that is finished already (journal.py ApiStore).
    return lock.LocalLock()


def describe(storage: BaseStorage) -> str:
    """The storage as a log line names it: an RDB's URL without its password, else its class."""
    if isinstance(storage, RDBStorage):
        return storage.engine.url.render_as_string(hide_password=True)
    backend = getattr(storage, "_backend", None)
    return type(storage).__name__ + (f"({type(backend).__name__})" if backend else "")


def build_applier(
    settings: Settings,
    storage: BaseStorage,
    store: SqlStore | ApiStore,
    *,
    on_change: Callable[[int, list[AuditEntry]], None] = lambda study_id, entries: None,
) -> Applier:
    """The one applier of the server and of scripts (script.py): the same allow-list,
    refusals, retroactive and dry-run rules, grace and study filter, from the same Settings."""
    return Applier(
        store,
        CommandParser(settings.prune_pattern, settings.fail_pattern),
        retroactive=settings.retroactive,
        dry_run=settings.dry_run,
        studies=frozenset(settings.studies),
        grace=settings.grace_seconds,
        on_change=on_change,
        allowed_users=(
            frozenset(settings.allowed_users) if settings.allowed_users is not None else None
        ),
        refusals=Refusals(storage),
        # One POST per audit row, queued for a thread of this process (notify.py).
        on_audit=notifier_for(settings.notify_url).send if settings.notify_url else None,
    )


def create_app(settings: Settings, *, autostart: bool = True) -> CrossOriginGuard:
    """The served stack for ``settings``: opens the storage from its URL (``open_storage``)
    and the FileSystemArtifactStore of ``artifact_dir``, then builds it with ``build_stack``.

    With ``autostart=False`` the sweep starts only through ``start_background()`` (the gunicorn
    hooks call it), or runs by hand with ``app.sweeper.run_once()``.
    """
    artifact_dir = settings.artifact_dir
    artifact_store = FileSystemArtifactStore(artifact_dir) if artifact_dir else None
    return build_stack(
        open_storage(settings), settings, artifact_store=artifact_store, autostart=autostart,
        name=settings.display_url,
    )


def build_stack(
    storage: BaseStorage,
    settings: Settings,
    *,
    artifact_store: Any = None,
    llm_provider: Any = None,
    autostart: bool = True,
    name: str | None = None,
) -> CrossOriginGuard:
    """The dashboard of ``storage`` wrapped in our middleware; its sweep starts in the serving
    process. Takes objects and reads no environment: ``create_app`` (settings from the
    environment, files and the command line) and ``hitl_pruner.wsgi`` (keyword arguments)
    both end here. Of ``settings`` it reads the rules, not ``storage_url`` or ``artifact_dir``.

    The outer layer adds the browser side (buttons, toasts, the actions view) and passes
    HitlMiddleware's attributes through: ``start_background``, ``sweeper``, ``store`` ...
    and, further in, the dashboard's own (a bottle.Bottle: ``route``, ``_inmemory_cache`` ...).

    With basic auth or a user header configured, ``AuthMiddleware`` wraps it all (and passes
    the same attributes through). Outermost, ``CrossOriginGuard`` (origin.py) refuses
    state-changing requests from other origins and framing by other sites.
    """
    store = open_store(storage)
    dashboard_app = dashboard.create(storage, artifact_store, llm_provider=llm_provider)
    applier = build_applier(
        settings, storage, store,
        # The dashboard's cache is brought up to date by the watcher below, on its next read.
        on_change=lambda study_id, entries: watcher.changed(
            study_id, [e.trial_id for e in entries],
            search_space=any(TrialState.FAIL in (e.from_state, e.to_state) for e in entries),
        ),
    )
    # One sweep at a time across processes and servers on this database (lock.py).
    sweep_lock = sweep_lock_for(storage)
    if isinstance(storage, RDBStorage):
        ping = _pinger(storage.engine)
        # The lock holder learns of a note written any other way within a fraction of a second.
        watch = wake.for_engine(storage.engine, sweep_lock)
    else:
        ping = storage.get_all_studies
        watch = None  # no queue to watch here: the sweep keeps the interval
    # This process's view of the database: an outage is logged once when it starts and ends.
    state = DatabaseState()
    sweeper = Sweeper(
        applier, store, interval=settings.interval, lock=sweep_lock, state=state, ping=ping,
        watch=watch,
        # Notes written before the first start that would relabel finished trials are listed
        # and held back unless --apply-existing-notes (first_start.py).
        existing=ExistingNotes(store.engine, apply=settings.apply_existing_notes)
        if isinstance(store, SqlStore) else None,
    )
    after_fork = (lambda: storage.engine.dispose(close=False)) if isinstance(
        storage, RDBStorage
    ) else None
    # Changes made by other processes reach this one's dashboard cache too (live.py).
    watcher = AuditWatcher(
        dashboard_app, feed=feed_for(store),
        storage=storage,
    )
    hitl = HitlMiddleware(
        watcher,
        applier=applier,
        store=store,
        sweeper=sweeper,
        after_fork=after_fork,
        autostart=autostart,
        health=Health(ping, sweeper, state=state),
    )
    logger.info(
        "serving %s%s%s", name or describe(storage),
        f", studies {', '.join(settings.studies)}" if settings.studies else "",
        " (dry run)" if settings.dry_run else "",
    )
    # A request that meets a database outage, ours or the dashboard's, gets a JSON 503.
    ui = OutageMiddleware(
        UiMiddleware(hitl, applier=applier, live=watcher, storage=storage),
        state=state, ping=ping, retry_after=settings.interval,
    )
    if not (settings.basic_auth or settings.user_header):
        return CrossOriginGuard(ui, **_browsers(settings))
    # Every route, the dashboard's and ours, sees the checked REMOTE_USER.
    authed = AuthMiddleware(
        ui,
        users=dict(settings.basic_auth),
        user_header=settings.user_header,
        trusted=settings.forwarded_allow_ips,
    )
    # Outermost (inside behind_proxy's ProxyMiddleware): another site's request is refused
    # before anything reads it, credentials included.
    return CrossOriginGuard(authed, **_browsers(settings))
