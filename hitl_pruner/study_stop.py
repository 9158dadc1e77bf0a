"""Stop a whole study: ``STOP`` in the study's note (or the study page's Stop study button).

The server side: when a study's note gains the word ``STOP`` (standing alone, upper case, as
PRUNE and FAIL in a trial's note), the study system attr ``hitl:stop`` is set to who stopped
it and when; when the word leaves the note, the attr is set to None (Optuna's storage API
cannot delete one). Each change is an audit row (``hitl_audit``, or ``hitl:audit:*`` on a
journal) of its own, with the number of live workers of the study told (their heartbeats).
A note saved through the dashboard is applied in the save's request (``save_study_note``);
one written any other way is found by the sweep (on an RDB the note-change trigger queues the
study note's keys too; on a journal every full round looks).

The worker side: :class:`~hitl_pruner.HumanInTheLoopPruner` reads the attr in ``should_prune()``
(at most once per ``check_interval``) and, once it holds, calls Optuna's ``study.stop()``: the
current trial runs to its end and is told as usual, and ``study.optimize`` starts no other.
From that first check on, it also looks at the end of every trial of that study object (in its
sampler's ``after_trial``), so a stop made after a trial's last ``should_prune()`` still keeps
the next trial from starting. An objective that never calls ``should_prune()`` is never seen by
a pruner: pass :func:`stop_if_asked` as a callback. Ask-and-tell loops ask
:func:`study_stopped`; ``hitl_pruner.ask()`` refuses with :class:`StudyStopped`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import threading
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from typing import Sequence
import weakref

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
import sqlalchemy as sa

from .audit import STUDY_RESUME
from .audit import STUDY_ROW
from .audit import STUDY_STOP
from .audit import SWEEP
from .audit import AuditEntry
from .commands import standalone
from .journal import AUDIT_PREFIX
from .notes import note_str_key_prefix
from .notes import note_ver_key
from .rdb import _audit_row
from .rdb import attrs_t
from .rdb import audit_t
from .rdb import db_clock
from .rdb import studies_t
from .rdb import workers_t
from .requests import WORKER_ATTR_PREFIX
from .requests import worker_alive_for
from .store import Change
from .store import Note

if TYPE_CHECKING:

    from .applier import Applier

logger = logging.getLogger(__name__)

# Study system attr: {"user", "at" (ISO, UTC), "source", "note_version"} while the study is
# stopped; None once resumed.
STOP_ATTR = "hitl:stop"
# Study system attr: [note version, says STOP] of the last study note a server decided on,
# applied or refused, so that the sweep does not apply a note the save refused.
DECIDED_ATTR = "hitl:stop:decided"
# routes.py's name of PUT /api/studies/<study_id>/note, the dashboard's study note editor.
STUDY_NOTE = "study note"
STOP_WORD = "STOP"
STOP_PATTERN = re.compile(standalone(STOP_WORD))
# The least number of seconds between two looks for a stop in should_prune(), whatever the
# pruner's check_interval: through the gRPC proxy or on a journal a look reads every system
# attr of the study. The look at each trial's end (after_trial) is not throttled.
STOP_CHECK_EVERY = 1.0


def says_stop(body: str) -> bool:
    """Whether a study note carries the STOP command (a whole upper-case word standing alone)."""
    return STOP_PATTERN.search(body) is not None


def without_stop(body: str) -> str:
    """The note with every STOP command taken out (what Resume study saves)."""
    lines = [
        " ".join(STOP_PATTERN.sub("", line).split()) if says_stop(line) else line
        for line in body.split("\n")
    ]
    return "\n".join(lines).strip("\n")


def with_stop(body: str) -> str:
    """The note with STOP appended on a line of its own (what Stop study saves)."""
    return f"{body.rstrip()}\n\n{STOP_WORD}" if body.strip() else STOP_WORD


class StudyStopped(RuntimeError):
    """``hitl_pruner.ask()`` refused: a human stopped the study (STOP in its note)."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """Who stopped a study, when, and by which note version (the ``hitl:stop`` attr)."""

    user: str | None
    at: str
    source: str
    note_version: int | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stop(value: object) -> Stop | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    version = value.get("note_version")
    return Stop(
        user=value.get("user") if isinstance(value.get("user"), str) else None,
        at=str(value.get("at", "")),
        source=str(value.get("source", "")),
        note_version=version if isinstance(version, int) else None,
    )


# --- the worker side ---------------------------------------------------------------------------


def _rdb(storage: BaseStorage) -> RDBStorage | None:
    if isinstance(storage, _CachedStorage):
        return storage._backend
    return storage if isinstance(storage, RDBStorage) else None


_STOP_QUERY = sa.select(attrs_t.c.value_json).where(
    attrs_t.c.study_id == sa.bindparam("sid"), attrs_t.c.key == STOP_ATTR
)


def read_stop(storage: BaseStorage, study_id: int) -> Stop | None:
    """The study's ``hitl:stop``, or None: on an RDB one primary-key lookup (the storage API
    would read every system attr of the study, notes included); elsewhere the storage API."""
    backend = _rdb(storage)
    if backend is not None:
        with backend.engine.connect() as conn:
            raw = conn.execute(_STOP_QUERY, {"sid": study_id}).scalar()
        return _stop(json.loads(raw)) if raw is not None else None
    return _stop(storage.get_study_system_attrs(study_id).get(STOP_ATTR))


def study_stopped(study: optuna.Study) -> bool:
    """Whether a human stopped this study (``STOP`` in its note, or the Stop study button).

    For ask-and-tell loops: ask it before each ``ask()`` and end the loop when True; the trials
    already asked are told as usual. One query, unthrottled. An error reading it is raised.
    """
    return read_stop(study._storage, study._study_id) is not None


def _original(study: optuna.Study) -> optuna.Study:
    # HyperbandPruner hands the sampler a _BracketStudy, whose stop() would set its own flag.
    inner = getattr(study, "_study", None)
    return inner if isinstance(inner, optuna.Study) else study


def _stop_optimize(study: optuna.Study, stop: Stop) -> bool:
    """``study.stop()`` when called inside ``study.optimize`` (it raises elsewhere)."""
    study = _original(study)
    if not study._thread_local.in_optimize_loop:
        return False
    if not study._stop_flag:
        who = f" by {stop.user}" if stop.user else ""
        logger.warning(
            "a human stopped study %r%s at %s (STOP in its note): this worker finishes its "
            "current trial and starts no other", study.study_name, who, stop.at,
        )
    study.stop()
    return True


def stop_if_asked(study: optuna.Study, trial: FrozenTrial | None = None) -> None:
    """A ``study.optimize`` callback: ``study.stop()`` once a human stopped the study.

    For objectives that never call ``trial.should_prune()`` (so HumanInTheLoopPruner never
    runs): ``study.optimize(objective, callbacks=[hitl_pruner.stop_if_asked])`` checks after
    every trial (one query) and starts no new trial once the study is stopped. A database
    error is logged and the loop goes on.
    """
    try:
        stop = read_stop(study._storage, study._study_id)
    except Exception as exc:
        logger.warning("cannot read whether the study was stopped (%s)", exc)
        return
    if stop is not None:
        _stop_optimize(study, stop)


class StopWatch:
    """What HumanInTheLoopPruner does about stops: a throttled look in ``should_prune()``, and
    from the first one on, a look at the end of every trial of that study object."""

    def __init__(self, check_every: float) -> None:
        self.check_every = check_every
        self._lock = threading.Lock()
        self._checked: dict[int, float] = {}
        self._retry_at = 0.0

    def check(self, study: optuna.Study) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._checked.get(study._study_id)
            if (last is not None and now - last < self.check_every) or now < self._retry_at:
                return
            self._checked[study._study_id] = now
        _arm(study)
        try:
            stop = read_stop(study._storage, study._study_id)
        except Exception as exc:  # the server's tables may not be there yet: keep training
            self._retry_at = now + 60.0
            logger.warning("cannot read whether the study was stopped (%s)", exc)
            return
        if stop is not None:
            _stop_optimize(study, stop)


def _arm(study: optuna.Study) -> None:
    """Have the study's sampler look for a stop at the end of each trial, before the next one
    starts (Optuna itself wraps ``study.sampler`` the same way for ``partial_fixed``)."""
    if isinstance(study.sampler, _StopCheckingSampler):
        return
    study.sampler = _StopCheckingSampler(study.sampler, study)


class _StopCheckingSampler(BaseSampler):
    """The study's sampler, plus a look for a stop in ``after_trial`` (one query per trial)."""

    def __init__(self, sampler: BaseSampler, study: optuna.Study) -> None:
        self.sampler = sampler
        self._study: weakref.ref[optuna.Study] | None = weakref.ref(study)

    def __getstate__(self) -> dict[str, Any]:
        return {"sampler": self.sampler}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sampler, self._study = state["sampler"], None

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)
        original = self._study() if self._study is not None else None
        if original is not None:
            stop_if_asked(original)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


# --- the server side ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Read:
    study_name: str
    note: Note
    stop: Stop | None
    decided: tuple[int, bool] | None


class _Lost(Exception):
    """The stop attr changed between our read and our write."""


class _SqlBackend:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def read(self, study_id: int) -> _Read | None:
        prefix = note_str_key_prefix(None)
        keys = (note_ver_key(None), STOP_ATTR, DECIDED_ATTR)
        with self.engine.connect() as conn:
            name = conn.execute(
                sa.select(studies_t.c.study_name).where(studies_t.c.study_id == study_id)
            ).scalar()
            if name is None:
                return None
            rows = conn.execute(
                sa.select(attrs_t.c.key, attrs_t.c.value_json).where(
                    attrs_t.c.study_id == study_id,
                    sa.or_(attrs_t.c.key.in_(keys),
                           attrs_t.c.key.startswith(prefix, autoescape=True)),
                )
            ).all()
        return _parse_attrs(name, {key: json.loads(value) for key, value in rows})

    def workers(self, study_id: int, alive_for: float) -> int:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(sa.func.count()).select_from(workers_t).where(
                    workers_t.c.study_id == study_id,
                    workers_t.c.seen_at > db_clock() - alive_for,
                )
            ).scalar() or 0
            beats = conn.execute(
                sa.select(attrs_t.c.value_json).where(
                    attrs_t.c.study_id == study_id,
                    attrs_t.c.key.like(f"{WORKER_ATTR_PREFIX}%"),
                    attrs_t.c.value_json != "null",
                )
            ).scalars().all()
        return int(rows) + _recent({str(i): json.loads(b) for i, b in enumerate(beats)},
                                   alive_for)

    def write(self, study_id: int, read: _Read, stop: Stop | None, decided: tuple[int, bool],
              entry: AuditEntry | None) -> None:
        """The stop attr (compare-and-set on the value read), the decided marker and the
        audit row, in one transaction."""
        new = json.dumps(stop.to_json() if stop is not None else None)
        here = attrs_t.c.study_id == study_id
        with self.engine.begin() as conn:
            stored = conn.execute(
                sa.select(attrs_t.c.value_json).where(here, attrs_t.c.key == STOP_ATTR)
            ).scalar()
            if (_stop(json.loads(stored)) if stored is not None else None) != read.stop:
                raise _Lost()
            if entry is not None:
                if stored is None:
                    conn.execute(sa.insert(attrs_t).values(
                        study_id=study_id, key=STOP_ATTR, value_json=new))
                elif conn.execute(
                    sa.update(attrs_t).where(here, attrs_t.c.key == STOP_ATTR,
                                             attrs_t.c.value_json == stored)
                    .values(value_json=new)
                ).rowcount != 1:
                    raise _Lost()
                conn.execute(sa.insert(audit_t).values(**_audit_row(entry)))
            marker = json.dumps(list(decided))
            if conn.execute(
                sa.update(attrs_t).where(here, attrs_t.c.key == DECIDED_ATTR)
                .values(value_json=marker)
            ).rowcount == 0:
                conn.execute(sa.insert(attrs_t).values(
                    study_id=study_id, key=DECIDED_ATTR, value_json=marker))

    def study_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(studies_t.c.study_id)).scalars())


class _ApiBackend:
    """Through Optuna's storage API (journals, InMemoryStorage): read-then-write, made safe by
    the sweep lock as the rest of journal.py."""

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage

    def read(self, study_id: int) -> _Read | None:
        try:
            name = self.storage.get_study_name_from_id(study_id)
        except KeyError:
            return None
        return _parse_attrs(name, self.storage.get_study_system_attrs(study_id))

    def workers(self, study_id: int, alive_for: float) -> int:
        return _recent(self.storage.get_study_system_attrs(study_id), alive_for)

    def write(self, study_id: int, read: _Read, stop: Stop | None, decided: tuple[int, bool],
              entry: AuditEntry | None) -> None:
        if _stop(self.storage.get_study_system_attrs(study_id).get(STOP_ATTR)) != read.stop:
            raise _Lost()
        if entry is not None:
            self.storage.set_study_system_attr(
                study_id, STOP_ATTR, stop.to_json() if stop is not None else None
            )
            stamp = entry.at.strftime("%Y%m%dT%H%M%S%f")
            self.storage.set_study_system_attr(
                study_id, f"{AUDIT_PREFIX}{stamp}:{entry.trial_id}", entry.to_record()
            )
        self.storage.set_study_system_attr(study_id, DECIDED_ATTR, list(decided))

    def study_ids(self) -> list[int]:
        return [s._study_id for s in self.storage.get_all_studies()]


def _parse_attrs(name: str, attrs: dict[str, Any]) -> _Read:
    prefix = note_str_key_prefix(None)
    version = attrs.get(note_ver_key(None))
    count = sum(1 for key in attrs if key.startswith(prefix))
    body = "".join(str(attrs.get(f"{prefix}{i}", "")) for i in range(count))
    decided = attrs.get(DECIDED_ATTR)
    return _Read(
        study_name=name,
        note=Note(int(version) if version is not None else 0, body),
        stop=_stop(attrs.get(STOP_ATTR)),
        decided=(int(decided[0]), bool(decided[1]))
        if isinstance(decided, list) and len(decided) == 2 else None,
    )


def _recent(attrs: dict[str, Any], alive_for: float) -> int:
    """How many API-channel heartbeats (``hitl:worker:*`` attrs, or plain values) are recent."""
    now = time.time()
    return sum(
        1 for key, value in attrs.items()
        if (key.startswith(WORKER_ATTR_PREFIX) or key.isdigit())
        and isinstance(value, (int, float)) and not isinstance(value, bool)
        and now - float(value) <= alive_for
    )


class StudyStops:
    """Applies a study note's STOP: the same allow-list, study filter and dry run as the
    applier of trial notes, a compare-and-set on the stop attr, and an audit row."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        store = applier.store
        engine = getattr(store, "engine", None)
        self._backend: _SqlBackend | _ApiBackend = (
            _SqlBackend(engine) if isinstance(engine, sa.Engine)
            else _ApiBackend(store._storage)  # type: ignore[attr-defined]
        )
        self._dry_said: set[tuple[int, int, bool]] = set()

    @property
    def sql(self) -> bool:
        return isinstance(self._backend, _SqlBackend)

    def state(self, study_id: int) -> dict[str, Any] | None:
        """The study's stop as the page shows it; None when there is no such study."""
        read = self._backend.read(study_id)
        if read is None:
            return None
        stop = read.stop
        return {
            "study_id": study_id,
            "study_name": read.study_name,
            "stopped": stop is not None,
            "stop": stop.to_json() if stop is not None else None,
            "note": {"version": read.note.version, "body": read.note.body},
            "note_says_stop": says_stop(read.note.body),
        }

    def refused(self, study_name: str, user: str | None) -> str | None:
        if not self.applier.monitors(study_name):
            return f"study {study_name!r} is outside --study"
        if not self.applier.may_act(user):
            return f"user {user!r} may not issue commands (--allowed-users)"
        return None

    def before_save(self, study_id: int, note: Note, user: str | None) -> None:
        """A save by a user who may not stop studies: mark its version decided first, so the
        sweep never applies it (the save itself goes on, as for a trial's note)."""
        if self.applier.allowed_users is None or self.applier.dry_run:
            return
        read = self._backend.read(study_id)
        if read is None or self.refused(read.study_name, user) is None:
            return
        if says_stop(note.body) != (read.stop is not None):
            try:
                self._backend.write(study_id, read, read.stop,
                                    (note.version, says_stop(note.body)), None)
            except _Lost:
                pass

    def apply(self, study_id: int, note: Note | None = None, *, source: str,
              user: str | None) -> dict[str, Any]:
        """Make the stop attr follow the study note (the stored one when ``note`` is None)."""
        read = self._backend.read(study_id)
        if read is None:
            return {"action": "refused", "reason": f"there is no study with study_id={study_id}"}
        note = note if note is not None else read.note
        wanted = says_stop(note.body)
        out: dict[str, Any] = {"study_id": study_id, "stopped": read.stop is not None}
        if wanted == (read.stop is not None):
            return {**out, "action": "nothing to do",
                    "reason": "the study is stopped" if wanted else "the study runs"}
        if source == SWEEP and read.decided == (note.version, wanted):
            return {**out, "action": "nothing to do", "reason": "decided when it was saved"}
        verb = "stop" if wanted else "resume"
        refused = self.refused(read.study_name, user)
        if refused is not None:
            if not self.applier.monitors(read.study_name):
                return {**out, "action": "not monitored", "reason": refused}
            self._decide(study_id, read, note.version, wanted)
            logger.warning("refused to %s study %r: %s", verb, read.study_name, refused)
            return {**out, "action": "refused", "reason": refused}
        alive_for = worker_alive_for(self.applier.grace)
        workers = self._backend.workers(study_id, alive_for)
        if self.applier.dry_run:
            if (study_id, note.version, wanted) not in self._dry_said:
                self._dry_said.add((study_id, note.version, wanted))
                logger.info("dry run, would %s study %r (%d live workers)", verb,
                            read.study_name, workers)
            return {**out, "action": "dry run", "reason": f"would {verb} the study",
                    "workers": workers}
        now = datetime.datetime.now(datetime.timezone.utc)
        stop = Stop(user, now.isoformat(), source, note.version) if wanted else None
        entry = AuditEntry(
            study_id=study_id, study_name=read.study_name, trial_id=STUDY_ROW,
            trial_number=STUDY_ROW, from_state=TrialState.RUNNING, to_state=TrialState.RUNNING,
            note_version=note.version, user=user, source=source, retroactive=False,
            undo=not wanted, how=f"{STUDY_STOP if wanted else STUDY_RESUME}:{workers}", at=now,
        )
        try:
            self._backend.write(study_id, read, stop, (note.version, wanted), entry)
        except _Lost:
            return {**out, "action": "lost race",
                    "reason": "the study was stopped or resumed meanwhile"}
        logger.info("%s", entry.describe())
        try:
            # As every audit row the applier writes: --notify-url hears of it (notify.py).
            # (Its other listener, the dashboard's trial cache, finds no trial -1 and reads
            # the study afresh, once.)
            self.applier._on_change(study_id, [entry])
        except Exception:
            logger.exception("telling of the stop of study %r failed", read.study_name)
        return {"study_id": study_id, "stopped": wanted, "action": "applied",
                "reason": f"STOP {'in' if wanted else 'removed from'} the study note",
                "workers": workers}

    def _decide(self, study_id: int, read: _Read, version: int, wanted: bool) -> None:
        try:
            self._backend.write(study_id, read, read.stop, (version, wanted), None)
        except _Lost:
            pass

    def sweep(self, changes: Iterable[Change], *, full: bool) -> int:
        """Apply the study notes that changed: on an RDB those the queue names (rows of no
        trial); elsewhere, on a full round, every study's. Returns how many were applied."""
        if self.sql:
            study_ids = {c.study_id for c in changes if c.trial_id < 0}
        elif full:
            study_ids = set(self._backend.study_ids())
        else:
            return 0
        applied = 0
        for study_id in sorted(study_ids):
            try:
                if self.apply(study_id, source=SWEEP, user=None)["action"] == "applied":
                    applied += 1
            except Exception:
                logger.exception("applying the note of study id %d failed", study_id)
        return applied
