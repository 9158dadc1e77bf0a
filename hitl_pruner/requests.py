"""What the server asked a cooperative worker to do, and how each request ends.

A worker running :class:`hitl_pruner.HumanInTheLoopPruner` reads its trial's open request in
``should_prune()`` and ends the trial itself, through Optuna, so its ``study.optimize`` goes
on. The sweep then settles the request by the pure rules of :func:`settle`: it records that the
worker did it, or forces the state once the grace period is over, so a hung worker loses no
command.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum

from optuna.trial import TrialState

# Written by HumanInTheLoopPruner: as a trial system attr on each trial whose worker reads our
# requests, and as a study system attr once such a worker has checked in on the study.
COOPERATIVE_ATTR = "hitl:cooperative"


def cooperates(*, marked: bool, study_has_cooperative_workers: bool, reported: bool) -> bool:
    """Whether to ask a RUNNING trial's worker rather than force the state at once.

    Optuna calls a pruner only from ``should_prune()``, so a worker marks its trial on its
    first ``should_prune()``, after the first ``report()``. A trial that has reported nothing
    yet may belong to a cooperative worker that has not had the chance to mark it: in a study
    where such workers have checked in, it gets the grace period too (a plain worker's trial is
    forced when the grace period is over instead of at once). A trial that reported without
    marking itself runs in a worker without the wrapper.
    """
    return marked or (study_has_cooperative_workers and not reported)


@dataclasses.dataclass(frozen=True)
class Request:
    """An open request: end this RUNNING trial as ``target`` (row of ``hitl_requests``)."""

    trial_id: int
    study_id: int
    study_name: str
    trial_number: int
    target: TrialState
    note_version: int | None
    user: str | None
    source: str
    requested_at: datetime.datetime
    # Past this instant (UTC) the sweep forces the state itself.
    deadline: datetime.datetime


class Settle(enum.Enum):
    WAIT = "wait"
    # The worker ended the trial as asked: record it and close the request.
    BY_WORKER = "by worker"
    # Still running past the deadline: force the state.
    FORCE = "force"
    # The worker completed it first: a command on a COMPLETE trial is a relabel.
    RELABEL = "relabel"
    # The worker ended it some other way first (its own pruner, a crash): its verdict stands.
    DROP = "drop"


def settle(target: TrialState, state: TrialState | None, deadline: datetime.datetime,
           now: datetime.datetime) -> Settle:
    """What to do with a request for ``target`` on a trial now in ``state`` (None: gone)."""
    if state is None:
        return Settle.DROP
    if state == target:
        return Settle.BY_WORKER
    if state == TrialState.RUNNING:
        return Settle.FORCE if now >= deadline else Settle.WAIT
    if state == TrialState.COMPLETE:
        return Settle.RELABEL
    return Settle.DROP
