"""Applies what a note asks for to its trial: the one path both the note-save and the sweep take."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from typing import Callable
from typing import Mapping
from typing import Protocol
from typing import Sequence

from optuna.trial import TrialState

from .audit import AFTER_GRACE
from .audit import BY_WORKER
from .audit import FAIL_BUTTON
from .audit import FORCED
from .audit import NOTE_SAVE
from .audit import SWEEP  # the source of notes nobody saved through us (no user)
from .audit import AuditEntry
from .audit import actor
from .commands import Command
from .commands import CommandParser
from .requests import Request
from .requests import Settle
from .requests import settle
from .requests import worker_alive_for
from .store import LostRace
from .store import Note
from .store import NoteSaver
from .store import Store
from .store import TrialRef
from .transitions import Action
from .transitions import Decision
from .transitions import LastChange
from .transitions import Worker
from .transitions import decide

logger = logging.getLogger("hitl_pruner")

FINISHED_BY_US_POSSIBLE = (TrialState.PRUNED, TrialState.FAIL)
# Outcomes after which a note saved through us needs no sweep: the sweep would decide the same
# now, and later it would override a human's later decision (a tell Complete after a request).
# Not "lost race" (the sweep looks again), nor anything in a dry run (a real run still applies
# the note), nor errors.
HANDLED = frozenset(("applied", "requested", "nothing to do", "refused"))
# Characters of a reason kept in the audit (the note keeps it whole).
MAX_REASON = 500


class Refusals(Protocol):
    """Where refused note versions are remembered (auth.Refusals keeps them in the storage)."""

    def mark(self, ref: TrialRef, note: Note, user: str | None) -> None: ...

    def refused_by(self, ref: TrialRef, note: Note) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    # "applied", "requested", "nothing to do", "refused", "dry run", "not monitored",
    # "lost race"; from the sweep's settling also "waiting" and "dropped"
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
        grace: float = 30.0,
        on_change: Callable[[int, list[AuditEntry]], None] = lambda study_id, entries: None,
        allowed_users: frozenset[str] | None = None,
        refusals: Refusals | None = None,
        on_audit: Callable[[list[AuditEntry]], None] | None = None,
    ) -> None:
        self.store = store
        self.parser = parser
        self.retroactive = retroactive
        self.dry_run = dry_run
        self.studies = studies
        # Seconds a cooperative worker has to end its trial before the sweep forces it.
        self.grace = grace
        # Every audit row written is a human's action: told to on_audit (notify.py) after it is
        # written, wherever it came from. A row claimed (_claim) was told when it was written.
        self._refresh = on_change
        self._on_change = on_change if on_audit is None else _and(on_change, on_audit)
        # None: anyone may issue commands. Otherwise only these users, through our note-save,
        # the Fail Trial button and Undo; the sweep skips the note versions they refused.
        self.allowed_users = allowed_users
        self.refusals = refusals

    def monitors(self, study_name: str) -> bool:
        return not self.studies or study_name in self.studies

    def may_act(self, user: str | None) -> bool:
        """Whether ``user`` may change trial states (--allowed-users)."""
        return self.allowed_users is None or (user is not None and user in self.allowed_users)

    def before_save(self, ref: TrialRef, note: Note, *, user: str | None) -> None:
        """Called before a note from ``user`` is saved: if the allow-list will refuse it,
        remember that first, so that no sweep applies the saved note meanwhile or later."""
        if self.may_act(user) or self.refusals is None or not self.monitors(ref.study_name):
            return
        # Only a note that could change the trial needs remembering: one with a command, or
        # one on a trial we may have relabelled (taking the command out undoes it).
        if self.parser.parse(note.body) is None and ref.state not in FINISHED_BY_US_POSSIBLE:
            return
        self.refusals.mark(ref, note, user)

    def _refusal(self, ref: TrialRef, note: Note | None, source: str,
                 user: str | None) -> str | None:
        """Why the allow-list refuses what this note or command asks, or None."""
        if self.allowed_users is None:
            return None
        if source == SWEEP:
            who = self.refusals.refused_by(ref, note) if (
                self.refusals is not None and note is not None
            ) else None
            if who is None:
                return None
            return f"saved by {who!r}, who may not issue commands (--allowed-users)" if who \
                else "saved without a user name, so it may not issue commands (--allowed-users)"
        if self.may_act(user):
            return None
        if user is None:
            return "no user name came with the request, so it may not issue commands " \
                "(--allowed-users needs --user-header or basic auth)"
        return f"user {user!r} may not issue commands (--allowed-users)"

    def reason_of(self, body: str) -> str | None:
        """The reason a note gives for its command: the line just before the line the last
        command word stands on alone (as the buttons, the bulk action and scripts write it:
        ``reason\nPRUNE``); None when there is none."""
        lines = body.rstrip().split("\n")
        for i in range(len(lines) - 1, 0, -1):
            line = lines[i]
            if self.parser.parse(line) is not None and not self.parser.strip(line).strip():
                before = lines[i - 1].strip()
                return before[:MAX_REASON] or None
        return None

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
        if source != SWEEP:
            # Read before the note was saved: the sweep or the worker may have changed
            # the trial since, and this answer takes the note off the sweep's queue.
            fresh = self.store.trials([ref.trial_id]).get(ref.trial_id)
            if fresh is None:
                return Outcome("nothing to do", "the trial is gone", ref.trial_id)
            if command is None and not self.needs_history(ref) and not self.needs_history(fresh):
                # Most saves: no command, on a trial we never ended. Nothing to do now; nothing
                # the sweep can have done for this note meanwhile (no record to claim), nor can
                # do later (the note stays on its queue, and the sweep finds the same), so the
                # save costs no write of ours.
                decision, _ = self._decide(fresh, None, None, source=source)
                return Outcome(decision.action.value, decision.reason, fresh.trial_id)
            ref = fresh
        outcome = self._carry_out(
            ref, command, note.version,
            source=source, user=user, last_change=last_change,
            refusal=self._refusal(ref, note, source, user),
            reason=self.reason_of(note.body),
        )
        if source != SWEEP and outcome.action in HANDLED and not self.dry_run:
            try:
                self.store.handled(ref, note.version)
            except Exception as exc:  # the sweep applies it once more, to no effect
                logger.warning("could not take note v%d of trial id %d off the sweep's queue "
                               "(%s)", note.version, ref.trial_id, exc)
        return outcome

    @property
    def saves_notes(self) -> bool:
        """Whether note saves go through ``save`` (the store writes notes itself)."""
        return isinstance(self.store, NoteSaver)

    def save(self, ref: TrialRef, note: Note, *, user: str | None,
             source: str = NOTE_SAVE) -> Outcome | Note | None:
        """Save a note from the dashboard's editor, as its note API would, in one transaction;
        when the note forces a state, with the change and its audit row in that transaction.

        ``ref`` is the trial as read just now. Returns the outcome when the note was applied
        with its save (the sweep never sees it); the stored note when ``note.version`` is not
        its version + 1 (nothing is saved: the dashboard's 409); None when the note was saved
        alone, for the caller to ``apply(ref, note, source=NOTE_SAVE)`` as after any save:
        nothing to do, asking the worker, a refusal, a dry run, a trial that changed under us.
        ``source``: the path that saves it, for the audit row (a script or a bulk action saves
        its notes this way too).
        """
        store = self.store
        assert isinstance(store, NoteSaver), "saves_notes is False: the dashboard saves notes"
        command = self.parser.parse(note.body)
        # Only a command, or taking one out of a note on a trial we ended (undo), can force.
        can_force = command is not None or self.needs_history(ref)
        if (can_force and self.monitors(ref.study_name) and not self.dry_run
                and self._refusal(ref, note, source, user) is None):
            decision, _ = self._decide(ref, command, None, source=source)
            if decision.action is Action.APPLY:
                change = _Change.of(ref, command, note.version, decision, source=source,
                                    user=user, reason=self.reason_of(note.body))
                try:
                    stored = store.save_note(ref, note, change.entry)
                except LostRace:
                    pass  # the trial changed since we read it: save, then decide again
                else:
                    if stored is not None:
                        return stored
                    logger.info("changed %s", change.entry.describe())
                    self._on_change(ref.study_id, [change.entry])
                    return change.outcome()
        return store.save_note(ref, note)

    def save_many(self, notes: Sequence[tuple[TrialRef, Note]], *, user: str | None,
                  source: str) -> list[Outcome | Note | None]:
        """``save`` for many notes of one study (the bulk action), in the order given: the same
        decisions, with their facts read for all the trials at once, and the notes with the
        changes they force written in one transaction (SqlStore.save_notes). When that cannot
        be done (a trial or note changed under us), each note is saved alone by ``save``.

        In a dry run nothing is saved, and each entry is the outcome its note would have.
        """
        store = self.store
        assert isinstance(store, NoteSaver), "saves_notes is False: the dashboard saves notes"
        todo = [(ref, note, self.parser.parse(note.body)) for ref, note in notes
                if self.monitors(ref.study_name)]
        known = _Known(
            history=store.last_changes(
                ref.trial_id for ref, _, _ in todo if self.needs_history(ref)),
            workers=store.workers([ref for ref, _, command in todo if _has_worker(ref, command)],
                                  alive_for=worker_alive_for(self.grace)),
        )
        results: dict[int, Outcome | Note | None] = {}
        items: list[tuple[TrialRef, Note, AuditEntry | None]] = []
        changes: dict[int, _Change] = {}
        for ref, note, command in todo:
            refusal = self._refusal(ref, note, source, user)
            if self.dry_run:
                step = self._plan(ref, command, note.version, source=source, user=user,
                                  refusal=refusal, known=known, reason=self.reason_of(note.body))
                assert isinstance(step, Outcome)  # a dry run writes nothing
                results[ref.trial_id] = step
                continue
            entry = None
            if refusal is None and (command is not None or self.needs_history(ref)):
                decision, _ = self._decide(ref, command, None, source=source, known=known)
                if decision.action is Action.APPLY:
                    change = _Change.of(ref, command, note.version, decision, source=source,
                                        user=user, reason=self.reason_of(note.body))
                    changes[ref.trial_id] = change
                    entry = change.entry
            items.append((ref, note, entry))
        if not self.dry_run:
            conflicts = store.save_notes(items) if hasattr(store, "save_notes") else None
            if conflicts is None:
                for ref, note, _ in items:
                    results[ref.trial_id] = self.save(ref, note, user=user, source=source)
            else:
                applied = []
                for ref, _, entry in items:
                    if ref.trial_id in conflicts:
                        results[ref.trial_id] = conflicts[ref.trial_id]
                    elif entry is not None:
                        logger.info("changed %s", entry.describe())
                        applied.append(entry)
                        results[ref.trial_id] = changes[ref.trial_id].outcome()
                    else:
                        results[ref.trial_id] = None  # saved alone: apply it as after a save
                for study_id in {e.study_id for e in applied}:
                    self._on_change(study_id, [e for e in applied if e.study_id == study_id])
        return [results.get(ref.trial_id) for ref, _ in notes]

    def command(self, ref: TrialRef, command: Command, *, source: str,
                user: str | None = None, note_version: int | None = None) -> Outcome:
        """Apply a command that comes without a note (the dashboard's Fail Trial button), or
        from a note read earlier (``note_version``: a request the sweep settles)."""
        if not self.monitors(ref.study_name):
            return Outcome(
                "not monitored", f"study {ref.study_name!r} is outside --study", ref.trial_id
            )
        return self._carry_out(
            ref, command, note_version, source=source, user=user,
            refusal=self._refusal(ref, None, source, user),
        )

    def human_told(self, ref: TrialRef, state: TrialState, user: str | None) -> Outcome | None:
        """A human ends this trial in the dashboard itself (the trial's form: tell Complete).

        Call it before the dashboard carries out the tell. That decision is the latest one on
        the trial, so an open request to its worker (from an earlier Prune or Fail) is dropped:
        otherwise the sweep would find the trial COMPLETE and relabel it as the outdated
        request asked. Returns what became of the request; None when there was none.
        """
        request = next(
            (r for r, _ in self.store.requests({ref.study_id}) if r.trial_id == ref.trial_id),
            None,
        )
        if request is None or not self.monitors(ref.study_name) or self.dry_run:
            return None
        asked = actor(request.source, request.user, request.note_version)
        if not self.may_act(user):
            # The dashboard does the tell; the request of someone who may act still stands.
            reason = (
                f"{self._refusal(ref, None, FAIL_BUTTON, user)}: the request of {asked} to end "
                f"it as {request.target.name} stands"
            )
            logger.warning("study %r trial #%d: %s", ref.study_name, ref.number, reason)
            return Outcome(Action.REFUSE.value, reason, ref.trial_id)
        who = repr(user) if user else "a human"
        reason = (
            f"{who} told it {state.name} in the dashboard, after {asked} asked its worker to "
            f"end it as {request.target.name}: the later decision wins, the request is dropped"
        )
        if self.store.settle(request, None):
            logger.info("study %r trial #%d: %s", ref.study_name, ref.number, reason)
            return Outcome("dropped", reason, ref.trial_id)
        return None  # settled a moment earlier: the trial ended before the human's tell

    def preview(
        self, ref: TrialRef, command: Command | None, *, last_change: LastChange | None = None
    ) -> Decision:
        """What a note carrying ``command`` would do to this trial now; nothing is changed."""
        return self._decide(ref, command, last_change, source=NOTE_SAVE)[0]

    def apply_many(self, notes: Sequence[tuple[TrialRef, Note]]) -> list[Outcome]:
        """``apply(ref, note, source=SWEEP)`` for each note, in a few statements: what the
        sweep runs.

        The same decisions as ``apply`` (allow-list, ``decide()``, audit rows, undo); only the
        reading and the writing are batched. The facts ``decide()`` needs (our last change to
        each trial, its worker) are read for all the trials at once, and the changes to force
        are written in one transaction, each still a compare-and-set on the state read. When a
        trial changed under us that transaction writes nothing, and each change is carried out
        alone, as ``apply`` does: the trial that changed is decided again. Asking a worker
        stays one trial at a time. Returns the outcomes in the order of ``notes``.
        """
        outcomes: dict[int, Outcome] = {}
        todo: list[tuple[TrialRef, Note, Command | None]] = []
        for ref, note in notes:
            if self.monitors(ref.study_name):
                todo.append((ref, note, self.parser.parse(note.body)))
            else:
                outcomes[ref.trial_id] = Outcome(
                    "not monitored", f"study {ref.study_name!r} is outside --study", ref.trial_id
                )
        known = _Known(
            history=self.store.last_changes(
                ref.trial_id for ref, _, _ in todo if self.needs_history(ref)
            ),
            workers=self.store.workers(
                [ref for ref, _, command in todo if _has_worker(ref, command)],
                alive_for=worker_alive_for(self.grace),
            ),
        )
        changes: list[_Change] = []
        for ref, note, command in todo:
            step = self._plan(
                ref, command, note.version, source=SWEEP, user=None,
                refusal=self._refusal(ref, note, SWEEP, None), known=known,
                reason=self.reason_of(note.body),
            )
            if isinstance(step, _Change):
                changes.append(step)
            else:
                outcomes[ref.trial_id] = step
        outcomes.update(self._write_many(changes))
        return [outcomes[ref.trial_id] for ref, _ in notes]

    def _decide(
        self, ref: TrialRef, command: Command | None, last_change: LastChange | None, *,
        source: str, known: _Known | None = None,
    ) -> tuple[Decision, Worker | None]:
        if known is not None:
            last_change = known.history.get(ref.trial_id)
        elif last_change is None and self.needs_history(ref):
            last_change = self.store.last_changes([ref.trial_id]).get(ref.trial_id)
        # Only a running trial has a worker to ask, and only a command needs one.
        worker = None
        if _has_worker(ref, command):
            worker = known.workers.get(ref.trial_id) if known is not None else None
            if worker is None:
                worker = self.store.worker(ref, alive_for=worker_alive_for(self.grace))
        decision = decide(
            ref.state,
            command,
            last_change,
            retroactive_allowed=self.retroactive,
            retroactive_supported=self.store.retroactive_supported,
            worker=worker,
            what="Fail Trial button" if source == FAIL_BUTTON else None,
        )
        return decision, worker

    def _carry_out(
        self,
        ref: TrialRef,
        command: Command | None,
        note_version: int | None,
        *,
        source: str,
        user: str | None,
        last_change: LastChange | None = None,
        retry: bool = True,
        refusal: str | None = None,
        reason: str | None = None,
    ) -> Outcome:
        step = self._plan(ref, command, note_version, source=source, user=user,
                          last_change=last_change, retry=retry, refusal=refusal, reason=reason)
        return step if isinstance(step, Outcome) else self._write(step, retry=retry)

    def _plan(
        self,
        ref: TrialRef,
        command: Command | None,
        note_version: int | None,
        *,
        source: str,
        user: str | None,
        last_change: LastChange | None = None,
        retry: bool = True,
        refusal: str | None = None,
        known: _Known | None = None,
        reason: str | None = None,
    ) -> Outcome | _Change:
        """Decide, and do all but forcing a state: the outcome, or the change to write."""
        decision, worker = self._decide(ref, command, last_change, source=source, known=known)
        if decision.action is Action.NOOP:
            if refusal is None:
                claimed = self._claim(ref, command, note_version, source=source, user=user)
                if claimed is not None:
                    return claimed
            return Outcome(
                decision.action.value, self._noop_reason(ref, command, decision, worker),
                ref.trial_id,
            )
        if refusal is not None and decision.action is not Action.REFUSE:
            # Only what would change a trial is refused: the note itself stays saved.
            logger.warning(
                "not changing study %r trial #%d: %s", ref.study_name, ref.number, refusal
            )
            return Outcome(Action.REFUSE.value, refusal, ref.trial_id)
        if decision.action is Action.REFUSE:
            if command is not None:
                logger.warning(
                    "not applying %s to study %r trial #%d: %s",
                    command.value, ref.study_name, ref.number, decision.reason,
                )
            return Outcome(decision.action.value, decision.reason, ref.trial_id)

        assert decision.source is not None and decision.target is not None
        if decision.action is Action.ASK:
            try:
                return self._ask(
                    ref, decision.target, note_version, source=source, user=user,
                    replaces=worker.requested if worker is not None else None,
                    evidence=worker.evidence if worker is not None else "", reason=reason,
                )
            except LostRace:
                # Another server, or our sweep, asked between our read and our write.
                return self._again(ref, command, note_version, source=source, user=user,
                                   retry=retry, reason=reason)
        change = _Change.of(ref, command, note_version, decision, source=source, user=user,
                            reason=reason)
        if self.dry_run:
            logger.info("dry run, would change %s", change.entry.describe())
            return Outcome(
                "dry run", f"would change: {decision.reason}", ref.trial_id,
                decision.source, decision.target,
            )
        return change

    def _write(self, change: _Change, *, retry: bool) -> Outcome:
        """Force one change decided on, as a compare-and-set."""
        if not self._transition(change.entry):
            # Often the sweep (or another server) applied this very note a moment earlier.
            entry = change.entry
            return self._again(change.ref, change.command, entry.note_version,
                               source=entry.source, user=entry.user, retry=retry,
                               reason=entry.reason)
        return change.outcome()

    def _write_many(self, changes: list[_Change]) -> dict[int, Outcome]:
        """Force the changes decided on in one transaction; those it could not write (a trial
        changed under us) one at a time, each decided again if it lost."""
        if len(changes) < 2:  # a batch of one is the single write, statement for statement
            return {change.ref.trial_id: self._write(change, retry=True) for change in changes}
        lost = {entry.trial_id for entry in self.store.transition_many(
            [change.entry for change in changes]
        )}
        if lost:
            logger.info("%d of %d trials changed while we acted; applying them one at a time",
                        len(lost), len(changes))
        outcomes: dict[int, Outcome] = {}
        changed: dict[int, list[AuditEntry]] = {}
        for change in changes:
            if change.ref.trial_id in lost:
                outcomes[change.ref.trial_id] = self._write(change, retry=True)
                continue
            logger.info("changed %s", change.entry.describe())
            changed.setdefault(change.entry.study_id, []).append(change.entry)
            outcomes[change.ref.trial_id] = change.outcome()
        for study_id, entries in changed.items():  # once per study, however many trials
            self._on_change(study_id, entries)
        return outcomes

    def _again(self, ref: TrialRef, command: Command | None, note_version: int | None, *,
               source: str, user: str | None, retry: bool,
               reason: str | None = None) -> Outcome:
        """Decide once more, on the trial as it is now, after losing a compare-and-set.

        When the sweep carried out this very note meanwhile, the second decision finds
        nothing to do and claims the sweep's record (``_claim``): the save keeps its answer,
        its source and its user.
        """
        fresh = self.store.trials([ref.trial_id]).get(ref.trial_id) if retry else None
        if fresh is None:
            return Outcome("lost race", "the trial changed meanwhile", ref.trial_id)
        return self._carry_out(fresh, command, note_version, source=source, user=user,
                               retry=False, reason=reason)

    def _claim(self, ref: TrialRef, command: Command | None, note_version: int | None, *,
               source: str, user: str | None) -> Outcome | None:
        """Make the save's own what the sweep did for this very note version, and answer so.

        The dashboard commits a note before our apply runs, and the sweep (of this server or
        another) may carry it out in between: it asks the worker, or changes the trial, under
        its own name (source sweep, no user). The save that finds its note carried out
        relabels the sweep's request or audit row as its own, and answers as if it had acted.
        """
        if note_version is None or source == SWEEP or self.dry_run:
            return None
        target = command.target if command is not None else TrialState.COMPLETE
        claimed = self.store.claim(ref, note_version, target, source, user)
        if claimed is None:
            return None
        what = "Fail Trial button" if source == FAIL_BUTTON else (
            f"{command.value} note" if command is not None else "command removed from the note"
        )
        if isinstance(claimed, Request):
            logger.info(
                "study %r trial #%d (id %d): the sweep asked its worker to end it as %s a moment "
                "before the note save returned; the request is recorded as by %s",
                ref.study_name, ref.number, ref.trial_id, target.name,
                actor(source, user, note_version),
            )
            # The answer the save would have given had it asked first: whoever asked, the
            # human reads the same, with why the worker was asked.
            worker = self.store.worker(ref, alive_for=worker_alive_for(self.grace))
            return Outcome(Action.ASK.value, self._asked(worker.evidence), ref.trial_id,
                           TrialState.RUNNING, target)
        # The sweep may be another server's: refresh our cache.
        self._refresh(ref.study_id, [claimed])
        logger.info("recorded as the note save's: %s", claimed.describe())
        if claimed.how == FORCED:
            reason = (
                "command removed from the note: undo" if claimed.undo
                else "retroactive relabel" if claimed.retroactive else what
            )
            return Outcome(Action.APPLY.value, reason, ref.trial_id, claimed.from_state,
                           claimed.to_state)
        return Outcome(
            Action.ASK.value,
            f"{what}: asked its worker; "
            + ("it has ended the trial" if claimed.how == BY_WORKER
               else "forced after the grace period"),
            ref.trial_id, claimed.from_state, claimed.to_state,
        )

    def _noop_reason(self, ref: TrialRef, command: Command | None, decision: Decision,
                     worker: Worker | None) -> str:
        """Why nothing is done; when the worker was asked already, by whom."""
        if command is None or worker is None or worker.requested != command.target:
            return decision.reason
        request = next(
            (r for r, _ in self.store.requests({ref.study_id}) if r.trial_id == ref.trial_id),
            None,
        )
        if request is None or request.target != command.target:
            return decision.reason
        return f"{decision.reason} by {actor(request.source, request.user, request.note_version)}"

    def _ask(self, ref: TrialRef, target: TrialState, note_version: int | None, *,
             source: str, user: str | None, replaces: TrialState | None,
             evidence: str = "", reason: str | None = None) -> Outcome:
        now = datetime.datetime.now(datetime.timezone.utc)
        request = Request(
            trial_id=ref.trial_id,
            study_id=ref.study_id,
            study_name=ref.study_name,
            trial_number=ref.number,
            target=target,
            note_version=note_version,
            user=user,
            source=source,
            requested_at=now,
            deadline=now + datetime.timedelta(seconds=self.grace),
            reason=reason,
        )
        what = (
            f"study {ref.study_name!r} trial #{ref.number} (id {ref.trial_id}): asked its worker "
            f"{f'({evidence}) ' if evidence else ''}"
            f"to end it as {target.name}{f' (for {user})' if user else ''}, via {source}; forced "
            f"if still RUNNING after {self.grace:g} s"
        )
        if self.dry_run:
            logger.info("dry run, would ask: %s", what)
            return Outcome("dry run", "would ask its worker", ref.trial_id, ref.state, target)
        self.store.ask(request, replaces)
        logger.info("%s", what)
        return Outcome(Action.ASK.value, self._asked(evidence), ref.trial_id, ref.state, target)

    def _asked(self, evidence: str) -> str:
        """The answer to a human whose command asked the trial's worker."""
        return (f"asked its worker ({evidence}); forced after {self.grace:g} s" if evidence
                else f"asked its worker; forced after {self.grace:g} s")

    def settle(self, request: Request, state: TrialState | None,
               now: datetime.datetime) -> Outcome:
        """Close an open request once its worker answered, or force it after the grace period."""
        verdict = settle(request.target, state, request.deadline, now)
        if verdict is Settle.WAIT:
            return Outcome("waiting", "the worker has until the deadline", request.trial_id)
        if self.dry_run:
            # A dry run asks nobody, so a request here is a real server's: leave it to that one.
            return Outcome("dry run", f"would settle: {verdict.value}", request.trial_id)
        if verdict is Settle.RELABEL:
            ref = self.store.trials([request.trial_id]).get(request.trial_id)
            # The request's note version goes with it into the audit row.
            outcome = (
                self.command(ref, _command_for(request.target), source=request.source,
                             user=request.user, note_version=request.note_version)
                if ref is not None else None
            )
            if outcome is None or outcome.action != "applied":
                self.store.settle(request, None)  # refused (--active-only) or gone: close it
            logger.info(
                "study %r trial #%d completed before its worker read the request to end it "
                "as %s", request.study_name, request.trial_number, request.target.name,
            )
            return outcome or Outcome("dropped", "the trial is gone", request.trial_id)
        entry = AuditEntry(
            study_id=request.study_id,
            study_name=request.study_name,
            trial_id=request.trial_id,
            trial_number=request.trial_number,
            from_state=TrialState.RUNNING,
            to_state=request.target,
            note_version=request.note_version,
            user=request.user,
            source=request.source,
            retroactive=False,
            undo=False,
            how=AFTER_GRACE if verdict is Settle.FORCE else BY_WORKER,
            reason=request.reason or self._request_reason(request),
        )
        if verdict is Settle.FORCE:
            # Only the request as read: a note save may have claimed it since (see _claim).
            if not self._transition(entry, request):
                return Outcome("lost race", "the trial changed meanwhile", request.trial_id)
            return Outcome("applied", "forced after the grace period", request.trial_id,
                           TrialState.RUNNING, request.target)
        if verdict is Settle.BY_WORKER:
            if self.store.settle(request, entry):
                logger.info("changed %s", entry.describe())
                self._on_change(request.study_id, [entry])
            return Outcome("applied", "ended by its worker on request", request.trial_id,
                           TrialState.RUNNING, request.target)
        # Settle.DROP
        if self.store.settle(request, None):
            logger.info(
                "study %r trial #%d: its worker ended it as %s before reading the request to end "
                "it as %s; the worker's verdict stands", request.study_name,
                request.trial_number, state.name if state else "(deleted)", request.target.name,
            )
        return Outcome("dropped", "the worker ended the trial otherwise", request.trial_id)

    def _request_reason(self, request: Request) -> str | None:
        """For a request recorded without its reason (by a version before 0.2, or with none):
        the reason of the note that asked the worker, while the note is still that one."""
        if request.note_version is None:
            return None
        note = self.store.notes(request.study_id, [request.trial_id]).get(request.trial_id)
        if note is None or note.version != request.note_version:
            return None
        return self.reason_of(note.body)

    def _transition(self, entry: AuditEntry, request: Request | None = None) -> bool:
        try:
            self.store.transition(entry, request)
        except LostRace:
            logger.info(
                "study %r trial #%d changed while we acted; the sweep looks again",
                entry.study_name, entry.trial_number,
            )
            return False
        logger.info("changed %s", entry.describe())
        self._on_change(entry.study_id, [entry])
        return True


def _and(on_change: Callable[[int, list[AuditEntry]], None],
         on_audit: Callable[[list[AuditEntry]], None]) -> Callable[[int, list[AuditEntry]], None]:
    def both(study_id: int, entries: list[AuditEntry]) -> None:
        on_audit(entries)  # queues only, never raises: first, so no error elsewhere skips it
        on_change(study_id, entries)

    return both


def _command_for(target: TrialState) -> Command:
    return Command.PRUNE if target == TrialState.PRUNED else Command.FAIL


def _has_worker(ref: TrialRef, command: Command | None) -> bool:
    """Whether deciding ``command`` needs to know the trial's worker (only a running one)."""
    return command is not None and ref.state == TrialState.RUNNING


@dataclasses.dataclass(frozen=True)
class _Known:
    """The facts decide() needs, read for many trials at once (Applier.apply_many)."""

    # Our last change to each trial that needs one (Applier.needs_history); none: no row.
    history: Mapping[int, LastChange]
    workers: Mapping[int, Worker]


@dataclasses.dataclass(frozen=True)
class _Change:
    """A state to force, decided on and not yet written."""

    ref: TrialRef
    command: Command | None
    entry: AuditEntry
    decision: Decision

    @classmethod
    def of(cls, ref: TrialRef, command: Command | None, note_version: int | None,
           decision: Decision, *, source: str, user: str | None,
           reason: str | None = None) -> _Change:
        assert decision.source is not None and decision.target is not None
        entry = AuditEntry(
            study_id=ref.study_id,
            study_name=ref.study_name,
            trial_id=ref.trial_id,
            trial_number=ref.number,
            from_state=decision.source,
            to_state=decision.target,
            note_version=note_version,
            user=user,
            source=source,
            retroactive=decision.retroactive,
            undo=decision.undo,
            # An undo takes the command out: the reason was the command's.
            reason=None if decision.undo else reason,
        )
        return cls(ref, command, entry, decision)

    def outcome(self) -> Outcome:
        decision = self.decision
        return Outcome(decision.action.value, decision.reason, self.ref.trial_id,
                       decision.source, decision.target)
