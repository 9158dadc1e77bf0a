"""The worker side: a pruner that lets a human's PRUNE or FAIL end a trial the way Optuna can.

When the server ends a RUNNING trial itself, the worker's next ``trial.report()`` raises and
``study.optimize`` aborts with ``ValueError: Cannot tell a PRUNED trial``. With
:class:`HumanInTheLoopPruner` the server asks instead: it records the request, the worker reads
it in ``should_prune()``, which answers True, and the objective raises ``TrialPruned`` as usual.
Optuna records the trial PRUNED with its intermediate values and goes on to the next trial. A
FAIL request ends the same way, and a trigger installed by the server turns the worker's PRUNED
into FAIL in the same update (see rdb.py), because ``TrialPruned`` is the only exception
``study.optimize`` survives without a ``catch`` argument.

Each check is one query of two primary-key/index lookups: the trial's open request, and the
newest relabel in the study. When that relabel is new to this process, the relabelled trials
are read again into Optuna's trial cache, so the sampler stops seeing their old state from the
next trial on.

The server asks a worker only on evidence: the trial's own mark (trial system attr
``hitl:cooperative``, written on its first check), or, for a trial that has reported nothing
yet and so cannot have marked itself, a heartbeat showing a wrapped worker of the study alive
now. The heartbeat is this process's row in ``hitl_workers``, refreshed on a check at most once
per ``HEARTBEAT_EVERY`` seconds (so at most one small write per that many seconds, whatever the
number of checks), stamped with the database's clock, and deleted when the process exits; a
killed worker's row simply grows old, and the server stops believing it.

That is the SQL path, for a worker whose storage is an RDBStorage in its own process. A worker
on any other storage (Optuna's gRPC storage proxy, a journal file or Redis, InMemoryStorage)
does the same through Optuna's storage API alone (api_channel.py): the server writes each request
as a trial system attr on the RUNNING trial too, and the heartbeat is a study system attr.
Relabels reach the sampler on the SQL path only.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any
from typing import Sequence
import weakref

import optuna
from optuna.pruners import BasePruner
from optuna.pruners import HyperbandPruner
from optuna.pruners import MedianPruner
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
import sqlalchemy as sa

from . import fail_tell
from .api_channel import ApiChannel
from .optuna_compat import is_finished_trial_error
from .rdb import audit_t
from .rdb import db_clock
from .rdb import requests_t
from .rdb import workers_t
from .requests import COOPERATIVE_ATTR
from .requests import HEARTBEAT_EVERY
from .study_stop import STOP_CHECK_EVERY
from .study_stop import StopWatch
from .study_stop import StudyStopped
from .study_stop import read_stop

logger = logging.getLogger(__name__)

# After a database error (say, the server has not created its tables yet), check again after:
RETRY_AFTER = 60.0
# Per-trial state kept by a pruner: a worker runs a few trials at a time, so this bounds memory.
MAX_TRIALS_KEPT = 1024

# The check: the trial's open request, and the newest relabel in its study (the marker that
# tells a worker its cache is stale). A primary-key lookup and an index lookup, one round trip;
# built once, so a call only binds and runs it.
_RELABELLED = (audit_t.c.study_id == sa.bindparam("study_id"),
               audit_t.c.retroactive == sa.true())
CHECK = sa.select(
    sa.select(requests_t.c.target)
    .where(requests_t.c.trial_id == sa.bindparam("trial_id"))
    .scalar_subquery(),
    sa.select(sa.func.max(audit_t.c.id)).where(*_RELABELLED).scalar_subquery(),
)
RELABELLED_SINCE = (
    sa.select(audit_t.c.trial_id)
    .where(*_RELABELLED)
    .where(audit_t.c.id > sa.bindparam("after"), audit_t.c.id <= sa.bindparam("newest"))
    .distinct()
)

# The heartbeat: this process's row for a study, on the database's clock.
_MY_ROW = (workers_t.c.study_id == sa.bindparam("w_study"),
           workers_t.c.worker == sa.bindparam("w_worker"))
BEAT = sa.update(workers_t).where(*_MY_ROW).values(seen_at=db_clock())
JOIN = sa.insert(workers_t).values(
    study_id=sa.bindparam("w_study"), worker=sa.bindparam("w_worker"), seen_at=db_clock()
)
RETIRE = sa.delete(workers_t).where(
    workers_t.c.worker == sa.bindparam("w_worker"),
    workers_t.c.study_id.in_(sa.bindparam("w_studies", expanding=True)),
)
# Rows of workers killed long ago, which no exit handler deleted; removed by a process's first
# heartbeat on the study, so the table stays the size of the live workers.
VANISHED_AFTER = 86400.0
FORGET_VANISHED = sa.delete(workers_t).where(
    workers_t.c.study_id == sa.bindparam("w_study"),
    workers_t.c.seen_at < db_clock() - VANISHED_AFTER,
)


class HumanInTheLoopPruner(BasePruner):
    """The wrapped pruner, plus: ``should_prune()`` is True once a human asked to end the trial.

    Args:
        wrapped: the pruner whose verdicts are kept; Optuna's default ``MedianPruner()`` if
            None.
        check_interval: the least number of seconds between two checks of the same trial (a
            check is one small indexed query). The first ``should_prune()`` of each trial always
            checks; 0 checks on every call. A request is seen at most this long after it was
            made, plus the time to the next ``should_prune()``. (Without SQL of its own, as
            behind Optuna's gRPC proxy or on a journal, a check reads the trial's system attrs:
            through the proxy one ``GetTrial`` call.)

    On its first ``should_prune()`` a trial is marked (trial system attr ``hitl:cooperative``):
    that is how the server knows to ask this worker rather than end the trial itself. While it
    checks, the process also keeps a heartbeat on the study (at most one write per
    ``HEARTBEAT_EVERY`` seconds), so that a trial of this worker that has not reported yet is
    asked too.
    """

    def __new__(cls, wrapped: BasePruner | None = None, **kwargs: Any) -> HumanInTheLoopPruner:
        if cls is HumanInTheLoopPruner and isinstance(wrapped, HyperbandPruner):
            cls = _HyperbandHumanInTheLoopPruner
        return super().__new__(cls)

    def __init__(self, wrapped: BasePruner | None = None, *, check_interval: float = 1.0) -> None:
        if check_interval < 0:
            raise ValueError(f"check_interval must be 0 or more seconds, not {check_interval}")
        self.wrapped: BasePruner = wrapped if wrapped is not None else MedianPruner()
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._trials: collections.OrderedDict[int, _Seen] = collections.OrderedDict()
        # A human's STOP in the study's note: study.stop(), the current trial runs on.
        self._stops = StopWatch(max(check_interval, STOP_CHECK_EVERY))

    def __getstate__(self) -> dict[str, Any]:
        # Picklable like Optuna's own pruners; what was seen is not worth carrying.
        return {"wrapped": self.wrapped, "check_interval": self.check_interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["wrapped"], check_interval=state["check_interval"])  # type: ignore[misc]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        self._stops.check(study)
        if self.wrapped.prune(study, trial):
            return True
        channel = _channel(study)
        now = time.monotonic()
        with self._lock:
            seen = self._trials.get(trial._trial_id)
            if seen is not None and (
                seen.request is not None or now - seen.at < self.check_interval
            ):
                return seen.request is not None
        request = channel.check(study._study_id, trial._trial_id, mark=seen is None)
        with self._lock:
            self._trials[trial._trial_id] = _Seen(now, request)
            self._trials.move_to_end(trial._trial_id)
            while len(self._trials) > MAX_TRIALS_KEPT:
                self._trials.popitem(last=False)
        if request is not None:
            _log_request(trial.number, request)
        return request is not None


class _HyperbandHumanInTheLoopPruner(HumanInTheLoopPruner, HyperbandPruner):
    """The wrapper around a HyperbandPruner, which Optuna must still recognise as one.

    When ``study.pruner`` is a HyperbandPruner, Optuna hands the sampler only the trials of the
    current trial's bracket (``optuna.pruners._filter_study``); these two methods keep that.
    """

    wrapped: HyperbandPruner

    def _get_bracket_id(self, study: optuna.Study, trial: FrozenTrial) -> int:
        return self.wrapped._get_bracket_id(study, trial)

    def _create_bracket_study(self, study: optuna.Study, bracket_id: int) -> optuna.Study:
        return self.wrapped._create_bracket_study(study, bracket_id)


@dataclasses.dataclass(frozen=True)
class _Seen:
    at: float
    request: TrialState | None


def requested_state(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int) -> (
    TrialState | None
):
    """The state a human asked for this trial (PRUNED or FAIL), or None; one query, unthrottled.

    For loops that drive trials themselves (ask-and-tell). Like ``should_prune()`` with
    :class:`HumanInTheLoopPruner`, it marks the trial as one whose worker reads requests, and
    keeps this process's heartbeat on the study (a write at most every ``HEARTBEAT_EVERY`` s).
    """
    return _channel(study).check(study._study_id, _trial_id(study, trial), mark=True)


def ask(study: optuna.Study, fixed_distributions: dict[str, Any] | None = None) -> optuna.Trial:
    """``study.ask()``, and mark the new trial at once, so a human is heeded from its first step.

    (Inside ``study.optimize`` Optuna calls a pruner only from ``should_prune()``, so there a
    trial is marked on its first ``should_prune()``.)

    Raises :class:`hitl_pruner.StudyStopped`, creating no trial, once a human stopped the
    study (STOP in its note); the trials asked before are told as usual. Loops that would
    rather not catch it ask ``hitl_pruner.study_stopped(study)`` first.
    """
    stop = read_stop(study._storage, study._study_id)
    if stop is not None:
        who = f" by {stop.user}" if stop.user else ""
        raise StudyStopped(
            f"study {study.study_name!r} was stopped{who} at {stop.at} (STOP in its note): "
            "no new trial; remove STOP from the note to go on"
        )
    channel = _channel(study)
    # The heartbeat first: until the mark below is written, it is the evidence that a human's
    # request for the new trial is to be asked of this worker, not forced on it.
    channel.beat(study._study_id)
    trial = study.ask(fixed_distributions)
    channel.mark(trial._trial_id)
    return trial


def tell(
    study: optuna.Study,
    trial: optuna.Trial | int,
    values: float | Sequence[float] | None = None,
    *,
    state: TrialState | None = None,
) -> FrozenTrial:
    """``study.tell()`` that honours a human's request and never fails on a trial already ended.

    If a human asked to end the trial, it is told PRUNED or FAIL as asked, whatever the
    arguments. A trial someone else already finished (for example forced after the grace
    period) is left as it is: ``skip_if_finished=True``. Returns the trial as stored.
    """
    requested = requested_state(study, trial)
    if requested is not None:
        values, state = None, requested
    return study.tell(trial, values, state=state, skip_if_finished=True)


def _log_request(number: int, request: TrialState) -> None:
    if request == TrialState.FAIL:
        logger.warning(
            "a human asked to FAIL trial %d: should_prune() returns True, and the trial is "
            "recorded as FAIL (Optuna's own log line says pruned)", number,
        )
    else:
        logger.info("a human asked to prune trial %d: should_prune() returns True", number)


def _trial_id(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int) -> int:
    if isinstance(trial, int):
        return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial)
    return trial._trial_id


class _Channel:
    """One storage's line to the server's tables: marks, checks, heartbeats, the cache refresh."""

    def __init__(self, storage: BaseStorage, backend: RDBStorage) -> None:
        self._storage = storage
        self._engine: sa.Engine = backend.engine
        self._lock = threading.Lock()
        # Trials this process marked, so that a loop calling requested_state() writes no mark
        # again.
        self._marked: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Per study, the newest relabel (hitl_audit id) this process has read again.
        self._relabel_seen: dict[int, int] = {}
        self._retry_at = 0.0
        # This process's heartbeats: its name in hitl_workers, and per study the monotonic time
        # of its last heartbeat there. A forked child takes a name of its own (_beats_for_pid).
        self._pid = -1
        self._worker = ""
        self._beats: dict[int, float] = {}
        self._beat_retry_at = 0.0

    def mark(self, trial_id: int) -> None:
        with self._lock:
            if trial_id in self._marked:
                return
        try:
            self._storage.set_trial_system_attr(trial_id, COOPERATIVE_ATTR, True)
        except RuntimeError as error:  # UpdateFinishedTrialError from Optuna 4.x on
            if not is_finished_trial_error(error):
                raise
            return  # someone ended the trial already: there is nothing left to ask
        with self._lock:
            self._marked[trial_id] = None
            while len(self._marked) > MAX_TRIALS_KEPT:
                self._marked.popitem(last=False)

    def check(self, study_id: int, trial_id: int, *, mark: bool) -> TrialState | None:
        if mark:
            self.mark(trial_id)
        if time.monotonic() < self._retry_at:
            return None
        try:
            with self._engine.connect() as conn:
                target, newest = conn.execute(
                    CHECK, {"trial_id": trial_id, "study_id": study_id}
                ).one()
                with self._lock:
                    seen = self._relabel_seen.get(study_id)
                if newest is not None and (seen is None or newest > seen):
                    self._refresh(conn, study_id, seen or 0, newest)
        except sa.exc.SQLAlchemyError as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER
            logger.warning(
                "cannot read human requests (%s); is the hitl-pruner server installed on this "
                "database? Trying again in %.0f s", str(exc).splitlines()[0], RETRY_AFTER,
            )
            return None
        self.beat(study_id)
        if target == TrialState.FAIL.name:
            fail_tell.expect_fail(self._storage, trial_id, still_fail=None)  # the trigger's job
        return TrialState[target] if target else None

    def beat(self, study_id: int) -> None:
        """Refresh this process's heartbeat on the study, if the last is HEARTBEAT_EVERY old."""
        now = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():
                self._beats_for_pid()
            last = self._beats.get(study_id)
            if (last is not None and now - last < HEARTBEAT_EVERY) or now < self._beat_retry_at:
                return
            # Taken before the write, so that other threads checking meanwhile do not write too.
            self._beats[study_id] = now
            params = {"w_study": study_id, "w_worker": self._worker}
        try:
            with self._engine.begin() as conn:
                if last is None:
                    conn.execute(FORGET_VANISHED, {"w_study": study_id})
                if conn.execute(BEAT, params).rowcount != 1:
                    conn.execute(JOIN, params)
        except sa.exc.SQLAlchemyError as exc:
            with self._lock:
                if last is None:
                    self._beats.pop(study_id, None)
                self._beat_retry_at = now + RETRY_AFTER
            logger.warning(
                "cannot record this worker's heartbeat (%s); is the hitl-pruner server on this "
                "database older than this worker? Trials that have not reported yet are ended at "
                "once instead of asked. Trying again in %.0f s", str(exc).splitlines()[0],
                RETRY_AFTER,
            )
            return
        if last is None:
            _beating.add(self)

    def _beats_for_pid(self) -> None:
        """Start this process's heartbeats afresh: in a forked child, the parent's rows stay
        the parent's."""
        self._pid = os.getpid()
        host = socket.gethostname()[:40]
        self._worker = f"{host}:{self._pid}:{secrets.token_hex(4)}"
        self._beats = {}
        self._beat_retry_at = 0.0

    def retire(self) -> None:
        """Delete this process's heartbeats: it checks no more (called when it exits)."""
        with self._lock:
            away = time.monotonic() < max(self._retry_at, self._beat_retry_at)
            if self._pid != os.getpid() or not self._beats or away:
                # Nothing written by this process, or the database was away at the last try:
                # an exiting process does not wait for it.
                return
            params = {"w_worker": self._worker, "w_studies": sorted(self._beats)}
            self._beats = {}
        try:
            with self._engine.begin() as conn:
                conn.execute(RETIRE, params)
        except sa.exc.SQLAlchemyError as exc:
            logger.debug("could not delete this worker's heartbeats: %s", exc)

    def _refresh(self, conn: sa.Connection, study_id: int, after: int, newest: int) -> None:
        """Read the trials relabelled since ``after`` again into Optuna's cache."""
        rows = conn.execute(
            RELABELLED_SINCE, {"study_id": study_id, "after": after, "newest": newest}
        )
        refreshed = _refresh_cached_trials(self._storage, study_id, [r.trial_id for r in rows])
        with self._lock:
            self._relabel_seen[study_id] = max(newest, self._relabel_seen.get(study_id, 0))
        if refreshed:
            logger.info(
                "read %d relabelled trial(s) of study id %d again: the sampler sees their new "
                "state from the next trial on", refreshed, study_id,
            )


# One channel per storage object, shared by every pruner and helper using it, because the
# cache it refreshes belongs to the storage.
_channels: weakref.WeakKeyDictionary[BaseStorage, _Channel | ApiChannel] = (
    weakref.WeakKeyDictionary()
)
_channels_lock = threading.Lock()
# Channels that wrote a heartbeat: when the process exits they delete their rows, so the server
# stops asking at once instead of when the heartbeat grows old.
_beating: weakref.WeakSet[_Channel | ApiChannel] = weakref.WeakSet()


@atexit.register
def _retire_all() -> None:
    for channel in list(_beating):
        channel.retire()


def _channel(study: optuna.Study) -> _Channel | ApiChannel:
    storage = study._storage
    with _channels_lock:
        try:
            return _channels[storage]
        except KeyError:
            backend = _rdb_backend(storage)
            channel = _Channel(storage, backend) if backend is not None else ApiChannel(storage)
            _channels[storage] = channel
            return channel


# --- Optuna internals (optuna 5.0; tests/test_worker.py has one test for each) ---------------


def _rdb_backend(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage under a study's storage: Optuna wraps every RDBStorage in a cache."""
    if isinstance(storage, _CachedStorage):
        return storage._backend
    if isinstance(storage, RDBStorage):
        return storage
    return None


def _refresh_cached_trials(storage: BaseStorage, study_id: int, trial_ids: list[int]) -> int:
    """Replace finished trials in ``_CachedStorage`` with their stored version; return how many.

    The cache reads a trial again only while it is unfinished, so a relabelled finished trial
    would keep its old state in this process until it restarts.
    """
    if not isinstance(storage, _CachedStorage) or not trial_ids:
        return 0
    fresh = []
    for trial_id in trial_ids:
        try:
            fresh.append(storage._backend.get_trial(trial_id))
        except KeyError:
            continue  # deleted meanwhile
    count = 0
    with storage._lock:
        info = storage._studies.get(study_id)
        if info is None:
            return 0
        for trial in fresh:
            cached = info.trials.get(trial.number)
            if cached is not None and cached._trial_id == trial._trial_id and (
                cached.state.is_finished()
            ):
                info.trials[trial.number] = trial
                count += 1
    return count
