"""What the applier and the sweep need from a storage, whatever its kind."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable
from typing import Protocol
from typing import Sequence
from typing import runtime_checkable

from optuna.trial import TrialState

from .audit import AuditEntry
from .requests import Request
from .transitions import LastChange
from .transitions import Worker

# optuna-dashboard keeps a trial's note in study system attrs named
# "dashboard:<trial_id>:note_ver" and "dashboard:<trial_id>:note_str:<i>" (see _note.py).
NOTE_KEY = re.compile(r"^dashboard:(\d+):note_(?:ver|str:\d+)$")

@dataclasses.dataclass(frozen=True)
class TrialRef:
    trial_id: int
    study_id: int
    study_name: str
    number: int
    state: TrialState


@dataclasses.dataclass(frozen=True)
class Note:
    version: int
    body: str


@dataclasses.dataclass(frozen=True)
class Change:
    """A note that was written since the sweep last looked."""

    id: int
    study_id: int
    trial_id: int


# The kinds of change the Human actions view filters by (GET /hitl/api/actions?action=...).
# Undo always puts a trial back to COMPLETE, and nothing else does (transitions.py).
AUDIT_ACTIONS = {
    "prune": "ended or relabelled PRUNED",
    "fail": "ended or relabelled FAIL",
    "relabel": "a finished trial relabelled (COMPLETE to PRUNED or FAIL, or between them)",
    "undo": "a relabel undone: back to COMPLETE",
    # A study-level row (audit.STUDY_ROW) is the only one whose to_state is RUNNING.
    "stop": "a study stopped or resumed (STOP in its note, or the Stop study button)",
}


@dataclasses.dataclass(frozen=True)
class AuditFilter:
    """Which audit records the Human actions view lists; None matches anything."""

    study_id: int | None = None
    trial_number: int | None = None
    user: str | None = None
    action: str | None = None  # a key of AUDIT_ACTIONS

    def matches(self, entry: AuditEntry) -> bool:
        """The same test as the SQL of rdb.SqlStore.audit_page, for stores without SQL."""
        action = self.action
        return (
            (self.study_id is None or entry.study_id == self.study_id)
            and (self.trial_number is None or entry.trial_number == self.trial_number)
            and (self.user is None or entry.user == self.user)
            and (
                action is None
                or (action == "prune" and entry.to_state == TrialState.PRUNED)
                or (action == "fail" and entry.to_state == TrialState.FAIL)
                or (action == "relabel" and entry.retroactive and not entry.undo)
                or (action == "undo" and entry.retroactive and entry.undo)
                or (action == "stop" and entry.study_level)
            )
        )


class LostRace(Exception):
    """The trial's state changed between our read and our write: nothing was written."""


class Store(Protocol):
    retroactive_supported: bool

    def trials(self, trial_ids: Iterable[int]) -> dict[int, TrialRef]: ...

    def last_changes(self, trial_ids: Iterable[int]) -> dict[int, LastChange]: ...

    def transition(self, entry: AuditEntry, request: Request | None = None) -> None:
        """Move the trial from entry.from_state to entry.to_state and record it, atomically.

        Also closes the trial's open request, if any. Raises LostRace when the trial is no
        longer in entry.from_state, or, when forcing ``request``, that request is no longer
        open as it was read (a note-save may have claimed it meanwhile: see ``claim``).
        """
        ...

    def transition_many(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """``transition`` for many trials (one entry each, no request), in one go; returns the
        entries not written because their trial was no longer in ``from_state``.

        An RDB store writes all or none (one transaction): when one trial changed, it returns
        every entry, and the caller carries them out one at a time.
        """
        ...

    def workers(self, refs: Iterable[TrialRef], *, alive_for: float = ...) -> dict[int, Worker]:
        """``worker`` for many RUNNING trials at once, by trial id."""
        ...

    def worker(self, ref: TrialRef, *, alive_for: float = ...) -> Worker:
        """Whether a RUNNING trial's worker reads requests, why, and what it was asked already.

        A wrapped worker's heartbeat counts as evidence for ``alive_for`` seconds
        (requests.worker_alive_for).
        """
        ...

    def ask(self, request: Request, replaces: TrialState | None) -> None:
        """Record the trial's open request, where its worker reads it, replacing the open
        request for ``replaces`` (None: there is none).

        A compare-and-set like ``transition``: raises LostRace, recording nothing, when the
        open request is not the one the caller decided on (another server asked meanwhile).
        """
        ...

    def claim(self, ref: TrialRef, note_version: int, target: TrialState, source: str,
              user: str | None) -> AuditEntry | Request | None:
        """Record as ``source``/``user``'s what the sweep did for this very note version.

        The sweep can reach a note saved through our note-save before the save's own apply
        does (the dashboard commits before we apply). The open request or the audit row the
        sweep made for ``note_version`` and ``target`` is then relabelled with the save's
        source and user, and returned; None when the sweep made none.
        """
        ...

    def requests(self, study_ids: set[int] | None) -> list[tuple[Request, TrialState | None]]:
        """Open requests, each with its trial's current state (None: the trial is gone)."""
        ...

    def settle(self, request: Request, entry: AuditEntry | None) -> bool:
        """Close the request and record entry (if any), atomically.

        Returns False, recording nothing, when another server closed it first.
        """
        ...

    def notes(self, study_id: int, trial_ids: Iterable[int]) -> dict[int, Note]: ...

    def study_ids(self, names: Iterable[str]) -> set[int]: ...

    def pending(self, study_ids: set[int] | None, limit: int, *, after: int = 0) -> list[Change]:
        """Up to ``limit`` queued note changes with ids above ``after``, oldest first."""
        ...

    def ack(self, changes: Iterable[Change]) -> None: ...

    def handled(self, ref: TrialRef, note_version: int) -> None:
        """The note-save applied this note version: take it off the sweep's queue, so the sweep
        does not apply it again later, over a human's later decision (a tell Complete that
        dropped the request). Nothing is taken off once the note has another version."""
        ...

    def audit(self, limit: int = 100) -> list[AuditEntry]: ...

    def audit_page(
        self, where: AuditFilter, *, before: int | None = None, limit: int = 100
    ) -> tuple[list[AuditEntry], int | None]:
        """Up to ``limit`` audit records that match ``where``, newest first, all older than the
        cursor ``before``; and the cursor to pass as ``before`` for the next page (None: none).

        Keyset pagination: a page costs the same however deep it is, and records written
        meanwhile (newer than every cursor) never shift a page. The cursor is the audit id on
        an RDB, a record's time in microseconds on a journal (as in live.py's feed).
        """
        ...

    def audit_entry(self, audit_id: int) -> AuditEntry | None:
        """The audit record with this id (None: no such record, or a store without ids)."""
        ...

    def newest_audit_ids(self, trial_ids: Iterable[int]) -> dict[int, int]:
        """The id of each trial's newest audit record, by trial id (empty without ids)."""
        ...


@runtime_checkable
class NoteSaver(Protocol):
    """A store that saves a note itself, with its trial's change in the same transaction
    (rdb.SqlStore). On any other store the dashboard saves notes, and we apply them after."""

    def save_note(self, ref: TrialRef, note: Note, entry: AuditEntry | None = None) -> Note | None:
        """None when saved; the stored note when ``note.version`` is not its version + 1.
        Raises LostRace, saving nothing, when ``entry``'s trial has left its from_state."""
        ...
