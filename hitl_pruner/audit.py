"""The record of every state change a human caused through us."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from optuna.trial import TrialState

# How a change was carried out (column hitl_audit.how):
# the server wrote the state at once (a worker without HumanInTheLoopPruner, a WAITING trial,
# or a finished trial relabelled);
FORCED = "forced"
# the trial's worker read our request and ended the trial itself;
BY_WORKER = "worker"
# the server wrote the state because the worker had not acted within the grace period.
AFTER_GRACE = "grace"
_HOW_TEXT = {
    FORCED: "forced at once",
    BY_WORKER: "ended by its worker on request",
    AFTER_GRACE: "forced after the grace period",
}

# Which path applied a change (column hitl_audit.source, and hitl_requests.source):
# a note saved through the dashboard we serve (PUT .../note; Undo saves a note this way too);
NOTE_SAVE = "note-save"
# a note nobody saved through us (a script, another server's dashboard), found by the sweep;
SWEEP = "sweep"
# the dashboard's Fail Trial button (POST /api/trials/<id>/tell with state Fail).
FAIL_BUTTON = "fail-button"
# a note saved by `python -m hitl_pruner prune|fail|undo` or hitl_pruner.prune() (script.py).
CLI = "cli"
# a note saved by the dashboard's bulk action (POST /hitl/api/studies/<id>/bulk, bulk.py).
BULK = "bulk"

# A study-level row (a study stopped or resumed by STOP in its note; study_stop.py) has this
# trial_id and trial_number, and ``how`` says which and how many live workers were told
# (their heartbeats): "stop:3", "resume:0". hitl_audit has no column for a study's action, so
# existing databases keep their schema.
STUDY_ROW = -1
STUDY_STOP = "stop"
STUDY_RESUME = "resume"


def actor(source: str, user: str | None, note_version: int | None = None) -> str:
    """Who asked for a change, in words: the user (if known) and the path it came by.

    Every refusal, toast and log line that says who changed a trial is built from this, so
    none of them guesses ("its worker") where our audit knows better.
    """
    note = f" v{note_version}" if note_version is not None else ""
    if source == SWEEP:
        # The sweep never knows who wrote the note: a script or another server's dashboard.
        return f"a note{note} written outside this dashboard (applied by the sweep)"
    who = repr(user) if user else "a human"
    if source == FAIL_BUTTON:
        return f"{who} with the dashboard's Fail Trial button"
    if source == NOTE_SAVE:
        return f"{who} with a note{note} saved in the dashboard"
    if source == CLI:
        return f"{who} with a note{note} saved from the command line or a script"
    if source == BULK:
        return f"{who} with a bulk action (note{note}) in the dashboard"
    return f"{who} via {source}"


# Characters of a reason that a log line carries (the audit keeps it whole).
REASON_LOGGED = 120


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    study_id: int
    study_name: str
    trial_id: int
    trial_number: int
    from_state: TrialState
    to_state: TrialState
    note_version: int | None
    user: str | None
    # Which path applied it: "note-save" (the dashboard's PUT), "sweep", or "fail-button" (the
    # dashboard's Fail Trial button, POST /api/trials/<id>/tell).
    source: str
    retroactive: bool
    undo: bool
    how: str = FORCED
    # The reason the note gave with its command (the line before the command word), if any.
    reason: str | None = None
    at: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
    )
    id: int | None = None

    @property
    def study_level(self) -> bool:
        """A study stopped or resumed, not a trial's change (see STUDY_ROW)."""
        return self.trial_id == STUDY_ROW and self.how.split(":")[0] in (STUDY_STOP, STUDY_RESUME)

    @property
    def workers(self) -> int | None:
        """On a study-level row, how many live workers were told."""
        kind, _, count = self.how.partition(":")
        return int(count) if self.study_level and count.isdigit() else None

    def to_json(self) -> dict[str, Any]:
        record = self.to_record()
        if self.study_level:
            # The same shape: no trial, the study's state from and to, and what was told.
            stop = self.how.startswith(STUDY_STOP)
            record.update({
                "trial_id": None, "trial_number": None,
                "from": "RUNNING" if stop else "STOPPED", "to": "STOPPED" if stop else "RUNNING",
                "how": STUDY_STOP if stop else STUDY_RESUME,
                "action": "stop study" if stop else "resume study", "workers": self.workers,
            })
        return record

    def to_record(self) -> dict[str, Any]:
        """The stored form (journal.py keeps it as it is; to_json is for readers)."""
        return {
            "id": self.id,
            "time": self.at.isoformat(),
            "study_id": self.study_id,
            "study_name": self.study_name,
            "trial_id": self.trial_id,
            "trial_number": self.trial_number,
            "from": self.from_state.name,
            "to": self.to_state.name,
            "note_version": self.note_version,
            "user": self.user,
            "source": self.source,
            "retroactive": self.retroactive,
            "undo": self.undo,
            "how": self.how,
            "reason": self.reason,
        }

    def describe(self) -> str:
        who = f" by {self.user}" if self.user else ""
        if self.study_level:
            verb = "stopped" if self.how.startswith(STUDY_STOP) else "resumed"
            note = f"note v{self.note_version}, " if self.note_version is not None else ""
            return (
                f"study {self.study_name!r} {verb}{who}, {self.workers} live worker(s) "
                f"told, {note}via {self.source}"
            )
        kind = " (undo)" if self.undo else " (retroactive)" if self.retroactive else ""
        # A relabel is always written by the server: only a running trial's end has a "how".
        how = "" if self.retroactive else f", {_HOW_TEXT.get(self.how, self.how)}"
        note = f"note v{self.note_version}, " if self.note_version is not None else ""
        # Quoted and cut: a note's line can be long, and a log line ends with its "via".
        reason = self.reason or ""
        if len(reason) > REASON_LOGGED:
            reason = reason[:REASON_LOGGED] + "..."
        why = f"reason {reason!r}, " if reason else ""
        return (
            f"study {self.study_name!r} trial #{self.trial_number} (id {self.trial_id}): "
            f"{self.from_state.name} -> {self.to_state.name}{kind}{who}{how}, "
            f"{note}{why}via {self.source}"
        )
