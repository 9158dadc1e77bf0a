"""A human's FAIL that Optuna tells as PRUNED: stored as FAIL, and ``study.optimize`` goes on.

``study.optimize`` survives only ``TrialPruned`` without ``catch=``, so HumanInTheLoopPruner
answers True to a FAIL request too, the objective raises ``TrialPruned``, and Optuna tells the
trial PRUNED. On the storage object the study tells through, while such a FAIL is pending:

- **Rewrite** (a worker without SQL of its own, api_channel.py: journals, InMemoryStorage, the
  gRPC proxy): the told PRUNED is written as FAIL, as the RDB trigger does in the database
  (rdb.py; behind the proxy both agree). A human may have changed the request to PRUNE since the
  check; ``still_fail`` asks again on this rare path.
- **Read-back** (Optuna 4.0 to 4.4): after telling, ``_tell_with_warning`` reads the trial back,
  and ``_run_trial`` raises the objective's TrialPruned out of optimize when that read says FAIL.
  The one read after a told PRUNED that finds FAIL answers as told (PRUNED), so optimize logs
  "pruned" and goes on; the stored trial is FAIL. Optuna 4.5 judges by the state it told
  (optuna PR #6133), which is what this restores. Callbacks of those releases receive that read.

Both are instance attributes of the storage object, there only while something is pending:
JournalStorage and GrpcStorageProxy pickle their ``__dict__``.
"""

from __future__ import annotations

import copy
import threading
from typing import Any
from typing import Callable
from typing import Sequence

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from .optuna_compat import OPTIMIZE_RAISES_AFTER_A_FAIL_REQUEST

_SETTER = "set_trial_state_values"
_GETTER = "get_trial"


def expect_fail(storage: BaseStorage, trial_id: int, *,
                still_fail: Callable[[int], bool] | None) -> None:
    """A FAIL request for ``trial_id`` was seen: arrange its tell through ``storage``.

    ``still_fail`` (None where a trigger in the database turns PRUNED into FAIL) makes the tell
    write FAIL itself.
    """
    if still_fail is None and not OPTIMIZE_RAISES_AFTER_A_FAIL_REQUEST:
        return
    pending = _installed(storage)
    with pending.lock:
        if still_fail is not None:
            pending.rewrite[trial_id] = still_fail
        if OPTIMIZE_RAISES_AFTER_A_FAIL_REQUEST:
            pending.watch.add(trial_id)


def pending(storage: BaseStorage) -> bool:
    """Whether anything is pending on ``storage`` (for tests)."""
    return isinstance(vars(storage).get(_SETTER), _Setter)


class _Pending:
    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage
        self.lock = threading.Lock()
        self.rewrite: dict[int, Callable[[int], bool]] = {}
        self.watch: set[int] = set()  # told PRUNED -> the next read answers as told
        self.read_back: set[int] = set()  # told PRUNED and written: that next read is due

    def tidy(self) -> None:
        """Call with the lock held: with nothing pending, the storage's own methods are back."""
        if self.rewrite or self.watch or self.read_back:
            return
        for name in (_SETTER, _GETTER):
            if isinstance(vars(self.storage).get(name), (_Setter, _Getter)):
                delattr(self.storage, name)


def _installed(storage: BaseStorage) -> _Pending:
    setter = vars(storage).get(_SETTER)
    if isinstance(setter, _Setter):
        return setter.pending
    pending = _Pending(storage)
    setattr(storage, _SETTER, _Setter(pending))
    setattr(storage, _GETTER, _Getter(pending))
    return pending


class _Setter:
    def __init__(self, pending: _Pending) -> None:
        self.pending = pending

    def __call__(self, trial_id: int, state: TrialState,
                 values: Sequence[float] | None = None) -> bool:
        pending = self.pending
        with pending.lock:
            still_fail = pending.rewrite.pop(trial_id, None)
            watched = trial_id in pending.watch
            pending.watch.discard(trial_id)
        told = state
        if still_fail is not None and state == TrialState.PRUNED and still_fail(trial_id):
            state, values = TrialState.FAIL, None
        storage = pending.storage
        try:
            method: Any = getattr(type(storage), _SETTER)
            written = bool(method(storage, trial_id, state, values))
        except BaseException:
            with pending.lock:
                pending.tidy()
            raise
        with pending.lock:
            if watched and told == TrialState.PRUNED:
                pending.read_back.add(trial_id)
            pending.tidy()
        return written


class _Getter:
    def __init__(self, pending: _Pending) -> None:
        self.pending = pending

    def __call__(self, trial_id: int) -> FrozenTrial:
        pending = self.pending
        storage = pending.storage
        method: Any = getattr(type(storage), _GETTER)
        trial: FrozenTrial = method(storage, trial_id)
        with pending.lock:
            if trial_id not in pending.read_back:
                return trial
            pending.read_back.discard(trial_id)
            pending.tidy()
        if trial.state != TrialState.FAIL:
            return trial
        told = copy.copy(trial)  # the storage's cache may hold the object itself
        told.state = TrialState.PRUNED
        return told
