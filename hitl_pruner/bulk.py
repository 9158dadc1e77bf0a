"""Act on many trials at once: ``POST /hitl/api/studies/<study_id>/bulk``.

The body is JSON::

    {"action": "prune" | "fail" | "undo",
     "trials": [3, 5, "7-9"],                       # trial numbers, and/or
     "filter": {"state": "RUNNING",                 # a state or a list of states
                "param": {"name": "lr", "min": 0.1, "max": 1}},   # min and max inclusive
     "reason": "bad data split",                    # optional, one line, prune/fail only
     "dry_run": false}

``trials`` and ``filter`` together select the trials in both. Each selected trial goes
through the note-save path, as if its note had been saved in the dashboard (script.act): its
note gets its next version, with the command word appended (the reason on the line before it)
or, for undo, the command words taken out; the applier then decides, with its allow-list,
compare-and-set and audit row (source ``bulk``), exactly as for one note. A trial the applier
refuses is reported as refused; the others still act. ``dry_run`` saves nothing and says what
each note would do.

The answer is 200 with ``{"study_id", "study_name", "action", "dry_run", "matched",
"counts": {outcome: n}, "results": [{"number", "trial_id", "action", "reason", "from", "to",
"note_version"}, ...]}``, one result per trial in trial-number order. Nothing is changed,
and the answer is a 4xx ``{"reason": ...}``, for a body that is not such an object (400), an
unknown action (400), trial numbers the study lacks (400, naming them), more than
``MAX_TRIALS`` trials selected (400: narrow the filter or split the list), a study that does
not exist (404), a user the allow-list refuses (403) or a study outside ``--study`` (409).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from typing import Sequence

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from .applier import Applier
from .audit import BULK
from .commands import Command
from .script import TrialResult
from .script import UsageError
from .script import act
from .script import parse_trials

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

# Trials one action may select. 500 take about 0.2 s on PostgreSQL here, in 22 statements
# (scripts/bench_bulk.py); the cap keeps one request from holding a gunicorn thread and a
# transaction's row locks for long: a bigger batch is split by the caller.
MAX_TRIALS = 1000
MAX_BODY = 64 * 1024
MAX_REASON = 500
ACTIONS: dict[str, Command | None] = {"prune": Command.PRUNE, "fail": Command.FAIL, "undo": None}
STATES = {s.name: s for s in TrialState}


class BulkError(Exception):
    """A request refused as a whole, before anything changed: the status and the reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _bad(reason: str) -> BulkError:
    return BulkError("400 Bad Request", reason)


class Selection:
    """The trials a request names: numbers, states, a parameter range (all that are given)."""

    def __init__(self, numbers: Sequence[int] | None, states: frozenset[TrialState] | None,
                 param: tuple[str, float | None, float | None] | None) -> None:
        self.numbers = numbers
        self.states = states
        self.param = param

    def matches(self, trial: FrozenTrial) -> bool:
        if self.states is not None and trial.state not in self.states:
            return False
        if self.param is not None:
            name, low, high = self.param
            value = trial.params.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return False
            if (low is not None and value < low) or (high is not None and value > high):
                return False
        return True


def read_request(environ: WSGIEnvironment) -> dict[str, Any]:
    """The JSON object in the body; BulkError for anything else."""
    if not environ.get("CONTENT_TYPE", "").startswith("application/json"):
        raise BulkError("415 Unsupported Media Type",
                        "send Content-Type: application/json (a plain form post is refused)")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY:
        raise BulkError("413 Request Entity Too Large",
                        f"the request is over {MAX_BODY // 1024} KiB; name fewer trials")
    raw = environ["wsgi.input"].read(length) if length > 0 else b""
    try:
        payload = json.loads(raw)
    except ValueError:
        raise _bad('the body is not JSON; send {"action": "prune", "trials": [3, 5]}') from None
    if not isinstance(payload, dict):
        raise _bad('the body must be a JSON object like {"action": "prune", "trials": [3, 5]}')
    return payload


def parse(payload: dict[str, Any]) -> tuple[str, Selection, str | None, bool]:
    """(action, selection, reason, dry_run) from the request's object; BulkError if bad."""
    unknown = sorted(set(payload) - {"action", "trials", "filter", "reason", "dry_run"})
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are action, "
                   "trials, filter, reason and dry_run")
    action = payload.get("action")
    if action not in ACTIONS:
        raise _bad(f"action must be one of {', '.join(map(repr, ACTIONS))}, not {action!r}")
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _bad(f"dry_run must be true or false, not {dry_run!r}")
    reason = payload.get("reason")
    if reason is not None:
        if not isinstance(reason, str):
            raise _bad("reason must be a string")
        reason = reason.strip() or None
    if reason is not None:
        if action == "undo":
            raise _bad("undo takes no reason: it takes the command words out of the notes")
        if "\n" in reason or "\r" in reason:
            raise _bad("reason must be one line of text")
        if len(reason) > MAX_REASON:
            raise _bad(f"reason is longer than {MAX_REASON} characters")
    numbers = _numbers(payload["trials"]) if payload.get("trials") is not None else None
    states, param = _filter(payload.get("filter"))
    if numbers is None and states is None and param is None:
        raise _bad('name the trials ("trials": [3, "7-9"]) or a filter ("filter": {"state": '
                   '"RUNNING"}); an action on every trial of a study is not offered')
    return action, Selection(numbers, states, param), reason, dry_run


def _numbers(raw: object) -> list[int]:
    if not isinstance(raw, list) or not raw:
        raise _bad('trials must be a non-empty list of trial numbers or ranges: [3, 5, "7-9"]')
    count = 0
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise _bad(f'trials: {item!r} is not a trial number or a range like "7-9"')
        low, _, high = str(item).strip().partition("-")
        if low.isascii() and low.isdigit() and (not high or (high.isascii() and high.isdigit())):
            count += max(int(high) - int(low) + 1, 1) if high else 1
        if count > MAX_TRIALS:
            raise _bad(f"trials: more than {MAX_TRIALS} trials in one action; split the list")
    try:
        return parse_trials(raw)
    except UsageError as exc:
        raise _bad(str(exc).replace("--trials: ", "trials: ")) from None


def _filter(raw: object) -> tuple[frozenset[TrialState] | None,
                                  tuple[str, float | None, float | None] | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise _bad('filter must be an object like {"state": "RUNNING"}')
    unknown = sorted(set(raw) - {"state", "param"})
    if unknown:
        raise _bad(f"filter: unknown field(s) {', '.join(map(repr, unknown))}; "
                   "the fields are state and param")
    states = None
    if raw.get("state") is not None:
        names = raw["state"] if isinstance(raw["state"], list) else [raw["state"]]
        if not names or not all(isinstance(n, str) and n.upper() in STATES for n in names):
            raise _bad(f"filter.state must be one of {', '.join(STATES)} (or a list of them), "
                       f"not {raw['state']!r}")
        states = frozenset(STATES[n.upper()] for n in names)
    param = None
    if raw.get("param") is not None:
        p = raw["param"]
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            raise _bad('filter.param must be {"name": "lr", "min": 0.1, "max": 1}')
        extra = sorted(set(p) - {"name", "min", "max"})
        if extra:
            raise _bad(f"filter.param: unknown field(s) {', '.join(map(repr, extra))}")
        low, high = p.get("min"), p.get("max")
        for key, value in (("min", low), ("max", high)):
            if value is not None and not (_number(value) and math.isfinite(value)):
                raise _bad(f"filter.param.{key} must be a finite number, not {value!r}")
        if low is None and high is None:
            raise _bad("filter.param needs min, max or both")
        if low is not None and high is not None and low > high:
            raise _bad(f"filter.param: min {low} is above max {high}")
        param = (p["name"], low, high)
    return states, param


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def select(storage: BaseStorage, study_id: int, selection: Selection) -> dict[int, int]:
    """{number: trial_id} of the selected trials, by number; BulkError when a named number
    does not exist or more than MAX_TRIALS match."""
    states = tuple(selection.states) if selection.states is not None else None
    # One read of the study's trials (only those in the states asked for), not one per number.
    trials = storage.get_all_trials(study_id, deepcopy=False, states=states)
    if selection.numbers is not None:
        by_number = {t.number: t for t in trials}
        if states is not None:  # a named trial in another state is known, just not selected
            known = {t.number for t in storage.get_all_trials(study_id, deepcopy=False)}
        else:
            known = set(by_number)
        missing = [n for n in selection.numbers if n not in known]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise _bad(f"the study has no trial numbered {shown}; nothing was changed")
        trials = [by_number[n] for n in selection.numbers if n in by_number]
    chosen = sorted((t for t in trials if selection.matches(t)), key=lambda t: t.number)
    if len(chosen) > MAX_TRIALS:
        raise _bad(f"{len(chosen)} trials match, more than {MAX_TRIALS} in one action; narrow "
                   "the filter or split the action")
    return {t.number: t._trial_id for t in chosen}


def run(storage: BaseStorage, applier: Applier, study_id: int, payload: dict[str, Any], *,
        user: str | None) -> dict[str, Any]:
    """Carry out a bulk request on the study; the answer's JSON. BulkError when refused."""
    action, selection, reason, dry_run = parse(payload)
    try:
        study_name = storage.get_study_name_from_id(study_id)
    except KeyError:
        raise BulkError("404 Not Found", f"no study with study_id={study_id}") from None
    if not applier.monitors(study_name):
        raise BulkError("409 Conflict", f"study {study_name!r} is outside --study: this server "
                                        "changes none of its trials")
    if not applier.may_act(user):
        # Deny by default: refused as a whole, with no note saved (one note would be refused
        # by the same allow-list, after its save).
        who = f"user {user!r}" if user else "a request without a user name"
        raise BulkError("403 Forbidden",
                        f"{who} may not issue commands (--allowed-users); nothing was changed")
    ids = select(storage, study_id, selection)
    results = act(storage, applier, ids, ACTIONS[action], reason=reason, user=user,
                  source=BULK, dry_run=dry_run)
    return {
        "study_id": study_id,
        "study_name": study_name,
        "action": action,
        "dry_run": dry_run or applier.dry_run,
        "matched": len(results),
        "counts": counts(results),
        "results": [r.to_json() for r in results],
    }


def counts(results: Iterable[TrialResult]) -> dict[str, int]:
    found: dict[str, int] = {}
    for result in results:
        found[result.action] = found.get(result.action, 0) + 1
    return found
