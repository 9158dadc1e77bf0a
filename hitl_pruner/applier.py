"""Applies what a note asks for to its trial: the one path both the note-save and the sweep take."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable

from optuna.trial import TrialState

from .audit import AuditEntry
from .commands import CommandParser
from .store import LostRace
from .store import Note
from .store import Store
from .store import TrialRef
from .transitions import Action
from .transitions import LastChange
from .transitions import decide

logger = logging.getLogger("hitl_pruner")

FINISHED_BY_US_POSSIBLE = (TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class Outcome:
    # "applied", "nothing to do", "refused", "dry run", "not monitored", "lost race"
    action: str
    reason: str
    trial_id: int
    from_state: TrialState | None = None
    to_state: TrialState | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action,
            "reason": self.reason,
            "trial_id": self.trial_id,
            "from": self.from_state.name if self.from_state is not None else None,
            "to": self.to_state.name if self.to_state is not None else None,
        }

    def header(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=True)


class Applier:
    def __init__(
        self,
        store: Store,
        parser: CommandParser,
        *,
        retroactive: bool = True,
        dry_run: bool = False,
        studies: frozenset[str] = frozenset(),
        on_change: Callable[[int], None] = lambda study_id: None,
    ) -> None:
        self.store = store
        self.parser = parser
        self.retroactive = retroactive
        self.dry_run = dry_run
        self.studies = studies
        self._on_change = on_change

    def monitors(self, study_name: str) -> bool:
        return not self.studies or study_name in self.studies

    def needs_history(self, ref: TrialRef) -> bool:
        """Whether decide() must know our last change to this trial (one extra query)."""
        return ref.state in FINISHED_BY_US_POSSIBLE

    def apply(
        self,
        ref: TrialRef,
        note: Note,
        *,
        source: str,
        user: str | None = None,
        last_change: LastChange | None = None,
    ) -> Outcome:
        if not self.monitors(ref.study_name):
            return Outcome(
                "not monitored", f"study {ref.study_name!r} is outside --study", ref.trial_id
            )
        command = self.parser.parse(note.body)
        if last_change is None and self.needs_history(ref):
            last_change = self.store.last_changes([ref.trial_id]).get(ref.trial_id)
        decision = decide(
            ref.state,
            command,
            last_change,
            retroactive_allowed=self.retroactive,
            retroactive_supported=self.store.retroactive_supported,
        )
        if decision.action is Action.NOOP:
            return Outcome(decision.action.value, decision.reason, ref.trial_id)
        if decision.action is Action.REFUSE:
            if command is not None:
                logger.warning(
                    "not applying %s to study %r trial #%d: %s",
                    command.value, ref.study_name, ref.number, decision.reason,
                )
            return Outcome(decision.action.value, decision.reason, ref.trial_id)

        assert decision.source is not None and decision.target is not None
        entry = AuditEntry(
            study_id=ref.study_id,
            study_name=ref.study_name,
            trial_id=ref.trial_id,
            trial_number=ref.number,
            from_state=decision.source,
            to_state=decision.target,
            note_version=note.version,
            user=user,
            source=source,
            retroactive=decision.retroactive,
            undo=decision.undo,
        )
        if self.dry_run:
            logger.info("dry run, would change %s", entry.describe())
            return Outcome(
                "dry run", f"would change: {decision.reason}", ref.trial_id,
                decision.source, decision.target,
            )
        try:
            self.store.transition(entry)
        except LostRace:
            logger.info(
                "study %r trial #%d changed while we acted; the sweep looks again",
                ref.study_name, ref.number,
            )
            return Outcome("lost race", "the trial changed meanwhile", ref.trial_id)
        logger.info("changed %s", entry.describe())
        self._on_change(ref.study_id)
        return Outcome(
            decision.action.value, decision.reason, ref.trial_id, decision.source, decision.target
        )
