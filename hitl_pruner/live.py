"""Live updates: what changed since a page last looked, and fresh dashboard caches in every process.

Every state change a human causes through us is an audit row (a note saved here or by a
script, the sweep, a worker asked to end its trial, Undo). So the audit is the one feed of
"something changed":

- :class:`SqlFeed` and :class:`JournalFeed` read it after a cursor: ``hitl_audit``'s id on an
  RDB storage (a primary-key range, so a poll reads only what is new), and the record's time in
  microseconds on a journal storage (which keeps the audit in study system attrs).
- ``GET /hitl/api/studies/<id>/changes?since=<cursor>`` (ui.py) serves it to the page, which
  polls it (hitl.js) and shows each new state at once.
- :class:`AuditWatcher` keeps this process's dashboard from answering with trials it cached
  before the change: each gunicorn worker has a cache of its own, and only the process that
  made a change forgets it (the applier's ``on_change``).

A cursor is global (all studies), so the range a poll reads stays the rows written since the
previous poll, whatever the study. Ids are handed out before commit: two servers writing at
once can commit id 11 a moment before id 10. The page therefore asks again from an older
cursor for a short while and skips the ids it has seen (hitl.js); the watcher, which only
compares ``max(id)``, can miss such a late row, and the dashboard's own cache expiry (2 to
10 s) then catches up.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Protocol

from optuna.storages import BaseStorage
import sqlalchemy as sa

from . import dashboard
from . import outage
from .journal import ApiStore
from .rdb import SqlStore
from .rdb import audit_t

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

# How often a process looks for changes made elsewhere: a page polls every 0.5 s, and the
# dashboard's own study poll comes every few seconds.
CHECK_EVERY = 0.25
# The dashboard's routes that read its trial cache (study detail, param importances ...); not
# the study list (/api/studies), which reads the storage each time.
CACHED_ROUTES = "/api/studies/"
# A study with more changed trials than this is read whole again, not trial by trial.
REFRESH_AT_MOST = 20
# Audit records read per look; more than this, and the changed studies are read whole again.
REFRESH_READ = 200
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class LiveChange:
    """One audit record, as much as a page needs to show the trial's new state."""

    id: int
    study_id: int
    trial_id: int
    number: int
    to_state: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "trial_id": self.trial_id,
            "number": self.number,
            "to_state": self.to_state,
        }


class Feed(Protocol):
    def latest(self) -> int:
        """The newest cursor: 0 when nothing was ever recorded."""
        ...

    def after(self, since: int, limit: int) -> list[LiveChange]:
        """Records of every study after ``since``, oldest first, at most ``limit``."""
        ...

    def studies_after(self, since: int, upto: int) -> set[int]:
        """The studies with records in ``(since, upto]``."""
        ...


class SqlFeed:
    """``hitl_audit`` read by primary key: each query touches only the rows it returns."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        c = audit_t.c
        # Built once: SQLAlchemy then skips building and keying them on every poll, which
        # costs more than the query itself.
        self._latest = sa.select(sa.func.max(c.id))
        self._after = (
            sa.select(c.id, c.study_id, c.trial_id, c.trial_number, c.to_state)
            .where(c.id > sa.bindparam("since"))
            .order_by(c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        self._studies = (
            sa.select(c.study_id)
            .where(c.id > sa.bindparam("since"), c.id <= sa.bindparam("upto"))
            .distinct()
        )

    def latest(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(self._latest).scalar() or 0)

    def after(self, since: int, limit: int) -> list[LiveChange]:
        with self._engine.connect() as conn:
            rows = conn.execute(self._after, {"since": since, "limit": limit})
            return [LiveChange(*row) for row in rows]

    def studies_after(self, since: int, upto: int) -> set[int]:
        with self._engine.connect() as conn:
            return set(conn.execute(self._studies, {"since": since, "upto": upto}).scalars())


class JournalFeed:
    """A journal's audit records (``ApiStore.audit``), each one's cursor its time in us.

    A journal replays its whole log in memory anyway; reading every record costs what the
    Human actions view costs.
    """

    def __init__(self, store: ApiStore) -> None:
        self._store = store

    def _all(self) -> list[LiveChange]:
        changes = [
            LiveChange(_micros(e.at), e.study_id, e.trial_id, e.trial_number, e.to_state.name)
            for e in self._store.audit(limit=2**62)
        ]
        changes.sort(key=lambda change: (change.id, change.trial_id))
        return changes

    def latest(self) -> int:
        changes = self._all()
        return changes[-1].id if changes else 0

    def after(self, since: int, limit: int) -> list[LiveChange]:
        return [change for change in self._all() if change.id > since][:limit]

    def studies_after(self, since: int, upto: int) -> set[int]:
        return {change.study_id for change in self._all() if since < change.id <= upto}


def _micros(at: datetime.datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return (at - _EPOCH) // datetime.timedelta(microseconds=1)


def feed_for(store: SqlStore | ApiStore) -> Feed:
    return SqlFeed(store.engine) if isinstance(store, SqlStore) else JournalFeed(store)


class AuditWatcher:
    """Around the dashboard: refresh the trials changed elsewhere before it reads its cache.

    On a GET of a route that reads the dashboard's trial cache (and on every changes poll,
    through :meth:`check`), at most every ``check_every`` seconds per process, one query reads
    the newest audit cursor; when it moved, the trials with new records are read again into
    the dashboard's cache (``dashboard.refresh_trials``) before the dashboard answers. This
    process's own changes come through :meth:`changed` and are refreshed the same way, on the
    next such request rather than on the request that made them. A study with many changed
    trials is forgotten instead: reading it whole once costs less than many single reads. The
    first check only notes the cursor. A request that comes while another thread checks does
    not wait for it. A failed check is logged and leaves the request to the dashboard, which
    meets the same database.

    Attributes it does not have are the wrapped app's (``app._inmemory_cache`` ...).
    """

    def __init__(
        self,
        application: WSGIApplication,
        *,
        feed: Feed,
        storage: BaseStorage,
        check_every: float = CHECK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.application = application
        self.feed = feed
        self._storage = storage
        self._check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._due = 0.0
        self._seen: int | None = None
        self._failing = False
        # study id -> (trial ids to read again, None: the whole study; whether its search
        # space may have changed)
        self._stale: dict[int, tuple[set[int] | None, bool]] = {}
        self._stale_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Cheapest test first: most requests are for other routes.
        if (
            environ.get("PATH_INFO", "").startswith(CACHED_ROUTES)
            and (self._stale or self._clock() >= self._due)
            and environ.get("REQUEST_METHOD") == "GET"
        ):
            self.check()
        return self.application(environ, start_response)

    def changed(self, study_id: int, trial_ids: Iterable[int] | None, *,
                search_space: bool) -> None:
        """These trials changed (None: any of the study's): read them again before the
        dashboard next reads its cache. ``search_space``: a trial entered or left FAIL."""
        with self._stale_lock:
            trials, space = self._stale.get(study_id, (set(), False))
            if trials is not None and trial_ids is not None:
                trials = trials | set(trial_ids)
                if len(trials) > REFRESH_AT_MOST:
                    trials = None
            else:
                trials = None
            self._stale[study_id] = (trials, space or search_space)

    def check(self) -> None:
        """Note the changes made since the last look (nothing when that was just now), and
        refresh every trial known to have changed."""
        self._look()
        if self._stale:
            self._refresh()

    def _look(self) -> None:
        now = self._clock()
        if now < self._due or not self._lock.acquire(blocking=False):
            return
        try:
            if now < self._due:  # another thread checked meanwhile
                return
            self._due = now + self._check_every
            latest = self.feed.latest()
            if self._seen is not None and latest > self._seen:
                news = [c for c in self.feed.after(self._seen, REFRESH_READ) if c.id <= latest]
                if len(news) < REFRESH_READ:
                    for change in news:
                        self.changed(change.study_id, [change.trial_id],
                                     search_space=change.to_state != "PRUNED")
                else:  # a flood: forget whole studies
                    for study_id in self.feed.studies_after(self._seen, latest):
                        self.changed(study_id, None, search_space=True)
            self._seen = latest
            self._failing = False
        except Exception as exc:
            # An outage is the dashboard's request's to report (OutageMiddleware, once); a bug
            # is logged once until a check succeeds again, not every quarter second.
            if not self._failing and not outage.unavailable(exc):
                logger.warning("cannot read the newest human actions", exc_info=True)
            self._failing = True
        finally:
            self._lock.release()

    def _refresh(self) -> None:
        with self._stale_lock:
            stale, self._stale = self._stale, {}
        app = self.application
        for study_id, (trials, search_space) in stale.items():
            try:
                if trials is None:
                    dashboard.forget_study(app, study_id)
                else:
                    dashboard.refresh_trials(app, self._storage, study_id, trials,
                                             search_space=search_space)
            except Exception:
                # A trial deleted meanwhile, or the database away: the dashboard reads the
                # study whole on its next request, and meets the same database.
                dashboard.forget_study(app, study_id)
