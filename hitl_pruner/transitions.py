"""Which state change a note asks for, given the trial's state and its history with us.

Pure rules, no I/O: the applier reads the facts, asks :func:`decide`, and carries it out.
"""

from __future__ import annotations

import dataclasses
import enum

from optuna.trial import TrialState

from .audit import AFTER_GRACE
from .audit import BY_WORKER
from .audit import FORCED
from .audit import actor
from .commands import Command

ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


class Action(enum.Enum):
    APPLY = "applied"
    # Record the request where the trial's worker reads it, and let the worker end the trial.
    ASK = "requested"
    NOOP = "nothing to do"
    REFUSE = "refused"


@dataclasses.dataclass(frozen=True)
class LastChange:
    """The newest audited change we made to a trial, and who asked for it (its audit row)."""

    to_state: TrialState
    retroactive: bool
    # None where the history was made by hand (tests): then nobody is named.
    source: str | None = None
    user: str | None = None
    how: str = FORCED
    from_state: TrialState | None = None
    note_version: int | None = None

    def ended_by(self) -> str:
        """Who ended the trial while it ran, in words, e.g. "'bob' with the dashboard's Fail
        Trial button ended it while RUNNING"."""
        who = (
            actor(self.source, self.user, self.note_version) if self.source is not None
            else "a human"
        )
        was = self.from_state.name if self.from_state is not None else "it ran"
        if self.how == BY_WORKER:
            return f"its worker ended it while {was}, as asked by {who}"
        if self.how == AFTER_GRACE:
            return f"{who} ended it while {was} (forced after its worker's grace period)"
        return f"{who} ended it while {was}"


@dataclasses.dataclass(frozen=True)
class Worker:
    """What we know of a RUNNING trial's worker."""

    # It runs HumanInTheLoopPruner, so it reads our requests: ask it instead of forcing.
    cooperates: bool
    # The state we already asked it to end the trial in, if any.
    requested: TrialState | None = None
    # Why we believe it reads requests, in words for the answer (requests.evidence).
    evidence: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    source: TrialState | None = None
    target: TrialState | None = None
    # True when the trial finished COMPLETE and we relabel it: such a change is undoable.
    retroactive: bool = False
    undo: bool = False


def decide(
    state: TrialState,
    command: Command | None,
    last_change: LastChange | None,
    *,
    retroactive_allowed: bool,
    retroactive_supported: bool,
    worker: Worker | None = None,
    what: str | None = None,
) -> Decision:
    """What ``command`` does to a trial in ``state``.

    ``what`` names where the command came from in the reasons ("FAIL note" by default; the
    applier says "Fail Trial button" for the dashboard's button). A refusal to change a
    finished trial names who ended it, from ``last_change`` (our audit row); only a trial we
    have no row for is said to be ended by its worker.
    """
    # We moved this trial from COMPLETE to its current state, and nobody changed it since.
    relabelled = (
        last_change is not None
        and last_change.retroactive
        and last_change.to_state == state
        and state != TrialState.COMPLETE
    )
    if command is None:
        if relabelled:
            return _finished_change(
                state,
                TrialState.COMPLETE,
                undo=True,
                retroactive_allowed=retroactive_allowed,
                retroactive_supported=retroactive_supported,
            )
        return Decision(Action.NOOP, "the note carries no command")

    target = command.target
    what = what or f"{command.value} note"
    if state == target:
        return Decision(Action.NOOP, f"trial is already {target.name}{_whose(last_change, state)}")
    if state == TrialState.RUNNING and worker is not None and worker.cooperates:
        # Its worker ends the trial itself, through Optuna, and carries on with its next one;
        # ending it from here would crash the worker's study.optimize.
        if worker.requested == target:
            return Decision(Action.NOOP, f"its worker was already asked to end it as {target.name}")
        return Decision(Action.ASK, f"{what}: asked its worker", state, target)
    if state in ACTIVE:
        return Decision(Action.APPLY, what, state, target)
    if state == TrialState.COMPLETE or relabelled:
        return _finished_change(
            state,
            target,
            undo=False,
            retroactive_allowed=retroactive_allowed,
            retroactive_supported=retroactive_supported,
        )
    if last_change is not None and not last_change.retroactive and (
        last_change.to_state == state
    ):
        # Our audit says a human ended it while it ran: say so. Such a trial stays ended, as a
        # worker's verdict does: it has no COMPLETE state and values to switch from or back to.
        return Decision(
            Action.REFUSE,
            f"trial is {state.name}: {last_change.ended_by()}; a trial ended while running "
            "stays ended (only RUNNING, WAITING or COMPLETE trials, and those relabelled from "
            "COMPLETE, can be changed)",
        )
    # No audit row of ours for this state: nobody ended it through us.
    return Decision(
        Action.REFUSE,
        f"trial is {state.name}: its worker ended it, and only RUNNING, WAITING or COMPLETE "
        "trials can be changed",
    )


def _whose(last_change: LastChange | None, state: TrialState) -> str:
    """Who put the trial in ``state``, from our audit row, as " (...)"; "" when we did not."""
    if last_change is None or last_change.to_state != state or last_change.source is None:
        return ""
    if last_change.retroactive:
        who = actor(last_change.source, last_change.user, last_change.note_version)
        return f" (relabelled by {who})"
    return f" ({last_change.ended_by()})"


def _finished_change(
    state: TrialState,
    target: TrialState,
    *,
    undo: bool,
    retroactive_allowed: bool,
    retroactive_supported: bool,
) -> Decision:
    if not retroactive_supported:
        return Decision(
            Action.REFUSE,
            f"this storage cannot change a finished ({state.name}) trial: Optuna's journal "
            "storage is append-only, and its InMemoryStorage refuses it too; use an RDB storage "
            "(SQLite, PostgreSQL, MySQL) for retroactive changes",
        )
    if not retroactive_allowed:
        return Decision(
            Action.REFUSE,
            f"trial is {state.name} and retroactive changes are off (--active-only)",
        )
    reason = "command removed from the note: undo" if undo else "retroactive relabel"
    return Decision(Action.APPLY, reason, state, target, retroactive=True, undo=undo)
