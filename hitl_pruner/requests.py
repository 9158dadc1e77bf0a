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

# Written by HumanInTheLoopPruner (and hitl_pruner.ask) as a trial system attr on each trial
# whose worker reads our requests. (Earlier versions also wrote it as a study system attr, for
# good; that one is ignored: it said a wrapped worker once ran, not that one runs now.)
COOPERATIVE_ATTR = "hitl:cooperative"
# The open request, where any worker reads it through Optuna's storage API (gRPC proxy,
# journal): a trial system attr on the RUNNING trial, {"target": "PRUNED" | "FAIL", ...},
# written by the server with the request (on an RDB, in the same transaction as its
# hitl_requests row) and set to None when the request is dropped while the trial runs.
REQUEST_ATTR = "hitl:request"
# A wrapped worker that reaches the storage only through its API beats here instead of in
# hitl_workers: study system attr "hitl:worker:<host:pid:token>" = its wall-clock time.time()
# (None once it exited). The server reads it with its own clock, so clocks must agree to well
# within worker_alive_for() (NTP does).
WORKER_ATTR_PREFIX = "hitl:worker:"
# A wrapped worker refreshes its heartbeat (a hitl_workers row, or a WORKER_ATTR_PREFIX study
# system attr, per process and study) at most
# this often, and only while it checks: so a check costs a write at most once per this many
# seconds.
HEARTBEAT_EVERY = 5.0


def worker_alive_for(grace: float) -> float:
    """How many seconds a wrapped worker's heartbeat shows it alive, for a server with ``grace``.

    A wrapped worker is meant to call ``should_prune()`` at least once per grace period (the
    README says so: a slower one is forced anyway), and it refreshes the heartbeat at most once
    per ``HEARTBEAT_EVERY`` seconds. A worker silent for longer has stopped or hung.
    """
    return grace + HEARTBEAT_EVERY


# For a store asked without a grace period to go by: the default grace period's (3 x 10 s).
DEFAULT_ALIVE_FOR = worker_alive_for(30.0)


def evidence(*, marked: bool, reported: bool, seen_ago: float | None,
             alive_for: float) -> str | None:
    """Why a RUNNING trial's worker reads requests, in words for the answer; None: it does not.

    Only evidence counts: the trial's own mark, or a wrapped worker of the study alive now.
    Optuna calls a pruner only from ``should_prune()``, so a wrapper marks its trial on the
    first ``should_prune()``, after the first ``report()``: a trial that has reported nothing
    yet may belong to a wrapped worker that has not had the chance to mark it. It is asked if
    such a worker checked in within ``alive_for`` seconds (``seen_ago``; None: no worker of the
    study is checking in), and forced at once otherwise. A trial that reported without marking
    itself runs in a worker without the wrapper.
    """
    if marked:
        return "the trial is marked by HumanInTheLoopPruner or hitl_pruner.ask"
    if reported or seen_ago is None or seen_ago > alive_for:
        return None
    ago = "less than 1 s" if seen_ago < 1 else f"{seen_ago:.0f} s"
    return (
        f"a worker of this study running HumanInTheLoopPruner was seen {ago} ago; this trial "
        "has not reported yet"
    )


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
    # The reason the note gave with its command when it asked (Applier.reason_of), kept for
    # the audit row written when the request settles: the note may be edited before that.
    reason: str | None = None


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


def request_value(target: TrialState) -> dict[str, str]:
    """The REQUEST_ATTR value asking a worker to end its trial as ``target``."""
    return {"target": target.name}


def requested_target(value: object) -> TrialState | None:
    """The state a REQUEST_ATTR value asks for; None for a dropped request or anything else."""
    if isinstance(value, dict) and value.get("target") in ("PRUNED", "FAIL"):
        return TrialState[value["target"]]
    return None


def newest_beat(attrs: dict[str, object]) -> float | None:
    """The newest WORKER_ATTR_PREFIX heartbeat among a study's system attrs (time.time())."""
    beats = [
        float(v) for k, v in attrs.items()
        if k.startswith(WORKER_ATTR_PREFIX) and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]
    return max(beats, default=None)
