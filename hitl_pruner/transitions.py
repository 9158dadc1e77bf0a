"""Which state change a note asks for, given the trial's state and its history with us.

Pure rules, no I/O: the applier reads the facts, asks :func:`decide`, and carries it out.
"""

from __future__ import annotations

import dataclasses
import enum

from optuna.trial import TrialState

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
    """The newest audited change we made to a trial."""

    to_state: TrialState
    retroactive: bool


@dataclasses.dataclass(frozen=True)
class Worker:
    """What we know of a RUNNING trial's worker."""

    # It runs HumanInTheLoopPruner, so it reads our requests: ask it instead of forcing.
    cooperates: bool
    # The state we already asked it to end the trial in, if any.
    requested: TrialState | None = None


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
) -> Decision:
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
    if state == target:
        return Decision(Action.NOOP, f"trial is already {target.name}")
    if state == TrialState.RUNNING and worker is not None and worker.cooperates:
        # Its worker ends the trial itself, through Optuna, and carries on with its next one;
        # ending it from here would crash the worker's study.optimize.
        if worker.requested == target:
            return Decision(Action.NOOP, f"its worker was already asked to end it as {target.name}")
        return Decision(Action.ASK, f"{command.value}: asked its worker", state, target)
    if state in ACTIVE:
        return Decision(Action.APPLY, f"{command.value} note", state, target)
    if state == TrialState.COMPLETE or relabelled:
        return _finished_change(
            state,
            target,
            undo=False,
            retroactive_allowed=retroactive_allowed,
            retroactive_supported=retroactive_supported,
        )
    return Decision(
        Action.REFUSE,
        f"trial is {state.name}: its worker ended it, and only RUNNING, WAITING or COMPLETE "
        "trials can be changed",
    )


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
            "storage is append-only; use an RDB storage (SQLite, PostgreSQL, MySQL) for "
            "retroactive changes",
        )
    if not retroactive_allowed:
        return Decision(
            Action.REFUSE,
            f"trial is {state.name} and retroactive changes are off (--active-only)",
        )
    reason = "command removed from the note: undo" if undo else "retroactive relabel"
    return Decision(Action.APPLY, reason, state, target, retroactive=True, undo=undo)
