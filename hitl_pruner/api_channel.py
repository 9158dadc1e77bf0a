"""A worker's line to the server through Optuna's storage API alone: no SQL of its own.

Used when the worker reaches its storage through anything but an RDBStorage in its own process:
Optuna's gRPC storage proxy (``GrpcStorageProxy``), a journal (file or Redis), InMemoryStorage.
The server writes each request as the trial system attr ``hitl:request`` on the RUNNING trial
(requests.REQUEST_ATTR); a check reads the trial's system attrs (through the proxy one
``GetTrial`` call, which the proxy never answers from its cache for a running trial). The
heartbeat is a study system attr per worker process (requests.WORKER_ATTR_PREFIX).

FAIL: ``study.optimize`` survives only ``TrialPruned`` without ``catch=``, so the pruner answers
True to a FAIL request too, and the objective raises TrialPruned. On an RDB a trigger turns that
PRUNED into FAIL (rdb.py); a journal has none, and Optuna refuses to change a finished trial, so
the worker's own write is rewritten: until the trial's state is written, this storage object's
``set_trial_state_values`` writes FAIL where Optuna asks for PRUNED (fail_tell.py).
Optuna reads the trial (RUNNING) before it writes, and logs "pruned"; the stored trial is FAIL.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import socket
import threading
import time

from optuna.storages import BaseStorage
from optuna.trial import TrialState

from . import fail_tell
from .optuna_compat import is_finished_trial_error
from .requests import COOPERATIVE_ATTR
from .requests import HEARTBEAT_EVERY
from .requests import REQUEST_ATTR
from .requests import WORKER_ATTR_PREFIX
from .requests import requested_target

logger = logging.getLogger(__name__)

RETRY_AFTER = 60.0
MAX_TRIALS_KEPT = 1024


class ApiChannel:
    """Marks, checks and heartbeats through ``storage``'s public methods (worker.py's
    ``_Channel`` does the same in SQL for an RDB storage)."""

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._marked: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._retry_at = 0.0
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
            attrs = self._storage.get_trial_system_attrs(trial_id)
        except KeyError:
            return None  # deleted meanwhile
        except Exception as exc:  # a proxy or Redis away: the wrapped pruner's verdict stands
            self._retry_at = time.monotonic() + RETRY_AFTER
            logger.warning("cannot read human requests (%s); trying again in %.0f s",
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                           RETRY_AFTER)
            return None
        self.beat(study_id)
        target = requested_target(attrs.get(REQUEST_ATTR))
        if target == TrialState.FAIL:
            fail_tell.expect_fail(self._storage, trial_id, still_fail=self._still_fail)
        return target

    def _still_fail(self, trial_id: int) -> bool:
        """Whether the request is FAIL now, as the RDB trigger decides at the update: a human
        may have changed it to PRUNE since the check (one read, only on this rare path)."""
        try:
            attrs = self._storage.get_trial_system_attrs(trial_id)
        except Exception:
            return True  # what the check saw stands
        return requested_target(attrs.get(REQUEST_ATTR)) == TrialState.FAIL

    def beat(self, study_id: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():
                # A forked child beats under a name of its own.
                self._pid = os.getpid()
                host = socket.gethostname()[:40]
                self._worker = f"{host}:{self._pid}:{secrets.token_hex(4)}"
                self._beats = {}
                self._beat_retry_at = 0.0
            last = self._beats.get(study_id)
            if (last is not None and now - last < HEARTBEAT_EVERY) or now < self._beat_retry_at:
                return
            self._beats[study_id] = now
            key = WORKER_ATTR_PREFIX + self._worker
        try:
            self._storage.set_study_system_attr(study_id, key, time.time())
        except Exception as exc:
            with self._lock:
                if last is None:
                    self._beats.pop(study_id, None)
                self._beat_retry_at = now + RETRY_AFTER
            logger.warning(
                "cannot record this worker's heartbeat (%s); trials that have not reported yet "
                "are ended at once instead of asked. Trying again in %.0f s", exc, RETRY_AFTER,
            )
            return
        if last is None:
            from .worker import _beating  # the one exit handler retires every channel

            _beating.add(self)

    def retire(self) -> None:
        """Say this process checks no more (value None), so the server stops asking at once."""
        with self._lock:
            away = time.monotonic() < max(self._retry_at, self._beat_retry_at)
            if self._pid != os.getpid() or not self._beats or away:
                return
            studies, key = sorted(self._beats), WORKER_ATTR_PREFIX + self._worker
            self._beats = {}
        for study_id in studies:
            try:
                self._storage.set_study_system_attr(study_id, key, None)
            except Exception as exc:  # exiting: the heartbeat simply grows old
                logger.debug("could not retire this worker's heartbeat: %s", exc)
                return
