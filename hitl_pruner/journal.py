"""The store for Optuna's journal storages, through Optuna's own API.

A journal is append-only and Optuna refuses to change a finished trial there, so retroactive
relabels are refused; RUNNING and WAITING trials can still be ended. With no table to hang a
trigger on, the sweep compares every note with what it saw last: a cost that grows with the
number of notes, which a journal's in-memory replay already pays.

A cooperative worker (HumanInTheLoopPruner, hitl_pruner.ask) is asked as on an RDB, through the
storage API alone: the request is the trial system attr ``hitl:request`` on the RUNNING trial,
which the worker reads (api_channel.py), and the server's record of it, which the sweep settles,
a study system attr ``hitl:request:<trial_id>`` (None once closed: the API cannot delete one).
Evidence of a worker is the trial's mark and the workers' heartbeats (study system attrs
``hitl:worker:*``). Without transactions, the compare-and-sets here are read-then-write; one
sweep at a time (the file lock) keeps the sweep from racing itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import time
from typing import Any
from typing import Iterable
from typing import Sequence

from optuna.storages import BaseStorage
from optuna.trial import TrialState

from .audit import FORCED
from .audit import SWEEP
from .audit import AuditEntry
from .notes import note_str_key_prefix
from .notes import note_ver_key
from .optuna_compat import is_finished_trial_error
from .requests import COOPERATIVE_ATTR
from .requests import DEFAULT_ALIVE_FOR
from .requests import REQUEST_ATTR
from .requests import Request
from .requests import evidence
from .requests import newest_beat
from .requests import request_value
from .store import NOTE_KEY
from .store import AuditFilter
from .store import Change
from .store import LostRace
from .store import Note
from .store import TrialRef
from .transitions import LastChange
from .transitions import Worker

AUDIT_PREFIX = "hitl:audit:"
REQUEST_PREFIX = "hitl:request:"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class ApiStore:
    retroactive_supported = False

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage
        self._seen: dict[tuple[int, int], Note] = {}
        self._offered: dict[int, tuple[tuple[int, int], Note]] = {}
        self._ids = itertools.count(1)

    def install(self) -> None:
        pass

    def trials(self, trial_ids: Iterable[int]) -> dict[int, TrialRef]:
        found = {}
        studies = self._storage.get_all_studies()
        for trial_id in set(trial_ids):
            try:
                trial = self._storage.get_trial(trial_id)
            except KeyError:
                continue
            for study in studies:
                try:
                    same = self._storage.get_trial_id_from_study_id_trial_number(
                        study._study_id, trial.number
                    )
                except KeyError:
                    continue
                if same == trial_id:
                    found[trial_id] = TrialRef(
                        trial_id, study._study_id, study.study_name, trial.number, trial.state
                    )
                    break
        return found

    def last_changes(self, trial_ids: Iterable[int]) -> dict[int, LastChange]:
        # A journal is never relabelled, so there is nothing to undo; but a refusal names who
        # ended a trial, so the newest change of each is read (the decider asks only for
        # PRUNED and FAIL trials).
        wanted = set(trial_ids)
        newest: dict[int, AuditEntry] = {}
        for _, entry in self._audit_items(None) if wanted else ():
            if entry.trial_id in wanted and (
                entry.trial_id not in newest or entry.at >= newest[entry.trial_id].at
            ):
                newest[entry.trial_id] = entry
        return {
            tid: LastChange(e.to_state, e.retroactive, source=e.source, user=e.user, how=e.how,
                            from_state=e.from_state, note_version=e.note_version)
            for tid, e in newest.items()
        }

    def _audit_items(self, study_id: int | None) -> list[tuple[str, AuditEntry]]:
        """(attr key, entry) of every audit record, of one study or all."""
        ids = [study_id] if study_id is not None else [
            s._study_id for s in self._storage.get_all_studies()
        ]
        return [
            (key, _entry(value))
            for sid in ids
            for key, value in self._storage.get_study_system_attrs(sid).items()
            if key.startswith(AUDIT_PREFIX)
        ]

    def claim(self, ref: TrialRef, note_version: int, target: TrialState, source: str,
              user: str | None) -> AuditEntry | Request | None:
        # A journal has no requests: only the sweep's audit record can be claimed.
        claimed: AuditEntry | Request | None = None
        for key, entry in self._audit_items(ref.study_id):
            if (entry.trial_id, entry.note_version, entry.to_state, entry.source) == (
                ref.trial_id, note_version, target, SWEEP
            ):
                claimed = dataclasses.replace(entry, source=source, user=user)
                self._storage.set_study_system_attr(ref.study_id, key, claimed.to_json())
        request = self._open_request(ref.study_id, ref.trial_id)
        if request is not None and (request.note_version, request.target, request.source) == (
            note_version, target, SWEEP
        ):
            claimed = dataclasses.replace(request, source=source, user=user)
            self._storage.set_study_system_attr(
                ref.study_id, f"{REQUEST_PREFIX}{ref.trial_id}", _request_json(claimed)
            )
        return claimed

    def transition(self, entry: AuditEntry, request: Request | None = None) -> None:
        open_request = self._open_request(entry.study_id, entry.trial_id)
        if request is not None and open_request != request:
            raise LostRace()  # the request changed since we read it: leave it be
        try:
            self._storage.set_trial_state_values(entry.trial_id, entry.to_state)
        except RuntimeError as error:  # UpdateFinishedTrialError from Optuna 4.x on
            if not is_finished_trial_error(error):
                raise
            raise LostRace() from None
        if open_request is not None:
            # The trial's state is final now: a request still open for it is answered.
            self._close(open_request)
        self._record(entry)

    def _record(self, entry: AuditEntry) -> None:
        stamp = entry.at.strftime("%Y%m%dT%H%M%S%f")
        self._storage.set_study_system_attr(
            entry.study_id, f"{AUDIT_PREFIX}{stamp}:{entry.trial_id}", entry.to_json()
        )

    def transition_many(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        # No transactions here: one at a time, and those that lost go back to the caller.
        lost = []
        for entry in entries:
            try:
                self.transition(entry)
            except LostRace:
                lost.append(entry)
        return lost

    def worker(self, ref: TrialRef, *, alive_for: float = DEFAULT_ALIVE_FOR) -> Worker:
        return self.workers([ref], alive_for=alive_for).get(ref.trial_id, Worker(False))

    def workers(self, refs: Iterable[TrialRef], *,
                alive_for: float = DEFAULT_ALIVE_FOR) -> dict[int, Worker]:
        """What we know of RUNNING trials' workers: only evidence, see requests.evidence."""
        found: dict[int, Worker] = {}
        study_attrs: dict[int, dict[str, Any]] = {}
        now = time.time()
        for ref in refs:
            try:
                trial = self._storage.get_trial(ref.trial_id)
            except KeyError:
                continue
            if ref.study_id not in study_attrs:
                study_attrs[ref.study_id] = self._storage.get_study_system_attrs(ref.study_id)
            attrs = study_attrs[ref.study_id]
            beat = newest_beat(attrs)
            request = _open(attrs.get(f"{REQUEST_PREFIX}{ref.trial_id}"))
            why = evidence(
                marked=trial.system_attrs.get(COOPERATIVE_ATTR) is True,
                reported=bool(trial.intermediate_values),
                seen_ago=max(0.0, now - beat) if beat is not None else None,
                alive_for=alive_for,
            )
            found[ref.trial_id] = Worker(
                why is not None, request.target if request is not None else None, why or ""
            )
        return found

    def handled(self, ref: TrialRef, note_version: int) -> None:
        pass  # no queue: the sweep compares notes, and applies a handled one to no effect

    def ask(self, request: Request, replaces: TrialState | None) -> None:
        current = self._open_request(request.study_id, request.trial_id)
        if (current.target if current is not None else None) != replaces:
            raise LostRace()  # another server, or our sweep, asked meanwhile
        try:
            # Optuna refuses this once the trial is finished: then there is nobody to ask.
            self._storage.set_trial_system_attr(
                request.trial_id, REQUEST_ATTR, request_value(request.target)
            )
        except RuntimeError as error:  # UpdateFinishedTrialError from Optuna 4.x on
            if not is_finished_trial_error(error):
                raise
            raise LostRace() from None
        self._storage.set_study_system_attr(
            request.study_id, f"{REQUEST_PREFIX}{request.trial_id}", _request_json(request)
        )

    def _open_request(self, study_id: int, trial_id: int) -> Request | None:
        attrs = self._storage.get_study_system_attrs(study_id)
        return _open(attrs.get(f"{REQUEST_PREFIX}{trial_id}"))

    def _close(self, request: Request) -> None:
        self._storage.set_study_system_attr(
            request.study_id, f"{REQUEST_PREFIX}{request.trial_id}", None
        )
        try:
            self._storage.set_trial_system_attr(request.trial_id, REQUEST_ATTR, None)
        except KeyError:
            pass  # deleted
        except RuntimeError as error:
            if not is_finished_trial_error(error):
                raise
            # finished: its worker reads nothing any more

    def requests(self, study_ids: set[int] | None) -> list[tuple[Request, TrialState | None]]:
        found = []
        for study in self._storage.get_all_studies():
            if study_ids is not None and study._study_id not in study_ids:
                continue
            attrs = self._storage.get_study_system_attrs(study._study_id)
            for key, value in attrs.items():
                request = _open(value) if key.startswith(REQUEST_PREFIX) else None
                if request is None:
                    continue
                try:
                    state: TrialState | None = self._storage.get_trial(request.trial_id).state
                except KeyError:
                    state = None
                found.append((request, state))
        found.sort(key=lambda pair: pair[0].deadline)
        return found

    def settle(self, request: Request, entry: AuditEntry | None) -> bool:
        if self._open_request(request.study_id, request.trial_id) != request:
            return False  # closed or replaced by another server
        self._close(request)
        if entry is not None:
            self._record(entry)
        return True

    def notes(self, study_id: int, trial_ids: Iterable[int]) -> dict[int, Note]:
        attrs = self._storage.get_study_system_attrs(study_id)
        return {tid: note for tid in trial_ids if (note := _note(attrs, tid)) is not None}

    def study_ids(self, names: Iterable[str]) -> set[int]:
        wanted = set(names)
        return {s._study_id for s in self._storage.get_all_studies() if s.study_name in wanted}

    def pending(self, study_ids: set[int] | None, limit: int, *, after: int = 0) -> list[Change]:
        # ``after`` is of no use here: every call scans the notes anew, past those acked.
        changes: list[Change] = []
        self._offered.clear()
        for study in self._storage.get_all_studies():
            if study_ids is not None and study._study_id not in study_ids:
                continue
            attrs = self._storage.get_study_system_attrs(study._study_id)
            for key in attrs:
                match = NOTE_KEY.match(key)
                if match is None or not key.endswith(":note_ver"):
                    continue
                trial_id = int(match.group(1))
                note = _note(attrs, trial_id)
                seen_key = (study._study_id, trial_id)
                if note is None or self._seen.get(seen_key) == note:
                    continue
                change = Change(next(self._ids), study._study_id, trial_id)
                self._offered[change.id] = (seen_key, note)
                changes.append(change)
                if len(changes) >= limit:
                    return changes
        return changes

    def ack(self, changes: Iterable[Change]) -> None:
        for change in changes:
            offered = self._offered.pop(change.id, None)
            if offered is not None:
                self._seen[offered[0]] = offered[1]

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        entries = []
        for study in self._storage.get_all_studies():
            attrs = self._storage.get_study_system_attrs(study._study_id)
            entries += [_entry(v) for k, v in attrs.items() if k.startswith(AUDIT_PREFIX)]
        entries.sort(key=lambda e: e.at, reverse=True)
        return entries[:limit]

    def audit_page(
        self, where: AuditFilter, *, before: int | None = None, limit: int = 100
    ) -> tuple[list[AuditEntry], int | None]:
        # The cursor is a record's time in microseconds, as in live.py's feed. Records of one
        # microsecond stay on one page (it may run over ``limit``), so a cursor never falls
        # between two of them.
        found = sorted(
            (e for e in self.audit(limit=2**62)
             if where.matches(e) and (before is None or _micros(e.at) < before)),
            key=lambda e: (_micros(e.at), e.trial_id), reverse=True,
        )
        end = min(limit, len(found))
        while 0 < end < len(found) and _micros(found[end].at) == _micros(found[end - 1].at):
            end += 1
        page = found[:end]
        return page, (_micros(page[-1].at) if end < len(found) else None)

    def audit_entry(self, audit_id: int) -> AuditEntry | None:
        return None  # a journal's records have no ids

    def newest_audit_ids(self, trial_ids: Iterable[int]) -> dict[int, int]:
        return {}


def _micros(at: datetime.datetime) -> int:
    """A record's time in microseconds since the epoch: its cursor."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return (at - _EPOCH) // datetime.timedelta(microseconds=1)


def _note(attrs: dict[str, Any], trial_id: int) -> Note | None:
    version = attrs.get(note_ver_key(trial_id))
    if version is None:
        return None
    prefix = note_str_key_prefix(trial_id)
    count = sum(1 for k in attrs if k.startswith(prefix))
    return Note(int(version), "".join(str(attrs[f"{prefix}{i}"]) for i in range(count)))


def _entry(data: object) -> AuditEntry:
    d = data if isinstance(data, dict) else json.loads(str(data))
    return AuditEntry(
        id=None,
        at=datetime.datetime.fromisoformat(d["time"]),
        study_id=d["study_id"],
        study_name=d["study_name"],
        trial_id=d["trial_id"],
        trial_number=d["trial_number"],
        from_state=TrialState[d["from"]],
        to_state=TrialState[d["to"]],
        note_version=d["note_version"],
        user=d["user"],
        source=d["source"],
        retroactive=d["retroactive"],
        undo=d["undo"],
        how=d.get("how", FORCED),
        reason=d.get("reason"),
    )


def _request_json(request: Request) -> str:
    d = dataclasses.asdict(request)
    d["target"] = request.target.name
    d["requested_at"] = request.requested_at.isoformat()
    d["deadline"] = request.deadline.isoformat()
    return json.dumps(d)


def _open(value: object) -> Request | None:
    """The open request a REQUEST_PREFIX study attr holds; None once closed."""
    if not value:
        return None
    d = dict(json.loads(value) if isinstance(value, str) else value)  # type: ignore[arg-type]
    d["target"] = TrialState[d["target"]]
    d["requested_at"] = datetime.datetime.fromisoformat(d["requested_at"])
    d["deadline"] = datetime.datetime.fromisoformat(d["deadline"])
    return Request(**d)
