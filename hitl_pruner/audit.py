"""The record of every state change a human caused through us."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from optuna.trial import TrialState


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
    # Which path applied it: "note-save" (the dashboard's PUT) or "sweep".
    source: str
    retroactive: bool
    undo: bool
    at: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
    )
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
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
        }

    def describe(self) -> str:
        who = f" by {self.user}" if self.user else ""
        kind = " (undo)" if self.undo else " (retroactive)" if self.retroactive else ""
        return (
            f"study {self.study_name!r} trial #{self.trial_number} (id {self.trial_id}): "
            f"{self.from_state.name} -> {self.to_state.name}{kind}{who}, "
            f"note v{self.note_version}, via {self.source}"
        )
